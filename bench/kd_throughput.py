"""Training tokens per second of one end-to-end KD step (teacher forward + student forward/backward), by precision,
sequence length and trainable set, alternated in one run. Which settings make a CPU-minute of distillation go furthest?

    python bench/kd_throughput.py runs/c03 --repeats 3 --results bench/results/kd_throughput
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch


def step(teacher, student, ids, params, autocast: bool) -> None:
    from come.distill import _kl
    from come.engine.precision import autocast_context

    with autocast_context(torch.device("cpu"), "on" if autocast else "off")():
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits
        loss = _kl(student(input_ids=ids, use_cache=False).logits, t, 1.0)
    loss.backward()
    for p in params:
        p.grad = None


def main() -> None:
    from come.core.adapters import adapter_for
    from come.engine.models import load_model
    from come.evaluation.evaluate import reference_source

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compressed", type=Path)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", type=Path, default=Path("bench/results/kd_throughput"))
    args = p.parse_args()
    import json

    plan = json.loads((args.compressed / "come_plan.json").read_text())
    teacher = load_model(reference_source(plan)).model.requires_grad_(False)
    student = load_model(str(args.compressed)).model
    merged = [k for k, rec in enumerate(plan["layers"]) if len(rec["covers"]) > 1]
    layers = adapter_for(student.config).layers(student)
    settings = [(seq, ac, train) for train in ("all", "merged") for seq in (512, 256) for ac in (False, True)]
    best: dict = {}
    for r in range(args.repeats):  # settings alternate, best of the repeats
        for seq, ac, train in settings:
            student.requires_grad_(train == "all")
            if train == "merged":
                for k in merged:
                    layers[k].requires_grad_(True)
            params = [q for q in student.parameters() if q.requires_grad]
            ids = torch.randint(0, student.config.vocab_size, (args.batch_size, seq), generator=torch.Generator().manual_seed(r))
            if r == 0:
                step(teacher, student, ids, params, ac)  # warm-up
            start = time.perf_counter()
            step(teacher, student, ids, params, ac)
            tps = args.batch_size * seq / (time.perf_counter() - start)
            best[(seq, ac, train)] = max(best.get((seq, ac, train), 0.0), tps)
    lines = ["# End-to-end KD step throughput on CPU (SmolLM2-135M teacher, compressed student)", "",
             f"Command: `python bench/kd_throughput.py {args.compressed} --batch-size {args.batch_size} --repeats {args.repeats}`  ",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}. "
             "One step = teacher forward (no grad) + student forward and backward of the full-vocabulary KL; best of the "
             "repeats, settings alternated.", "",
             "| trainable | seqlen | precision | tokens/s | vs float32 |", "|---|---|---|---|---|"]
    for seq, ac, train in settings:
        base = best[(seq, False, train)]
        lines.append(f"| {train} | {seq} | {'bf16 autocast' if ac else 'float32'} | {best[(seq, ac, train)]:.1f} | {best[(seq, ac, train)] / base:.2f}x |")
    args.results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
