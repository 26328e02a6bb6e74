"""Recovery ablation: which distillation settings lower the held-out KL to the dense model most per CPU-minute.

Every config distils the same compressed model (e.g. `come compress --ratio 0.3 --out runs/c03`) from the
built-in SmolLM2-135M with its own options, and records the held-out KL before and after (come distill's
own check: windows of the Wikipedia calib split never trained on), wall and CPU seconds. Resumable: a
config whose result file exists is skipped. Results: RESULTS.md / RESULTS.csv / RESULTS_cells/*.json.

    python bench/recovery_smollm2.py runs/c03 --configs s2-merged,s2-all-kd --steps 40 --batch-size 2 \
        --results bench/results/recovery_smollm2
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

# Named option sets (DistillOptions fields); every config gets the same token budget from the command line.
CONFIGS = {
    "s1-mse": {"layers": "merged", "loss": "mse", "lr": 1e-4, "global_steps": 0},  # stage 1 only (each merged layer, teacher-forced)
    "s1-mse+s2": {"layers": "merged", "loss": "mse", "lr": 1e-4, "stage2": True, "train": "merged", "global_lr": 1e-4, "lora": 0},
    "s2-merged": {"layers": "none", "stage2": True, "train": "merged", "global_lr": 1e-4, "hidden_weight": 1.0, "lora": 0},
    "s2-merged-kd": {"layers": "none", "stage2": True, "train": "merged", "global_lr": 1e-4, "hidden_weight": 0.0, "lora": 0},
    "s2-neighbours-kd": {"layers": "none", "stage2": True, "train": "neighbours", "global_lr": 1e-4, "hidden_weight": 0.0, "lora": 0},
    "s2-all-kd": {"layers": "none", "stage2": True, "train": "all", "global_lr": 1e-4, "hidden_weight": 0.0, "lora": 0},
    "s2-all-kd-lr3e-4": {"layers": "none", "stage2": True, "train": "all", "global_lr": 3e-4, "hidden_weight": 0.0, "lora": 0},
    "s2-all-kd-lr3e-5": {"layers": "none", "stage2": True, "train": "all", "global_lr": 3e-5, "hidden_weight": 0.0, "lora": 0},
    "s2-all-kd-seq256": {"layers": "none", "stage2": True, "train": "all", "global_lr": 1e-4, "hidden_weight": 0.0, "seqlen": 256, "lora": 0},
    "s2-lora16-kd": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 1e-3, "hidden_weight": 0.0},
    "s2-lora16-kd-lr3e-4": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-4, "hidden_weight": 0.0},
    "s2-lora16-kd-lr3e-3": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0},
    "s2-lora16-kd-lr6e-3": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 6e-3, "hidden_weight": 0.0},
    "s2-lora16-kd-lr1e-2": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 1e-2, "hidden_weight": 0.0},
    "s2-lora16v-kd-lr3e-3": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "lora_vectors": True, "global_lr": 3e-3, "hidden_weight": 0.0},
    # the default (LoRA 16 at 3e-3, all layers) with shorter sequences, or with only some layers trained
    "s2-lora16-kd-lr3e-3-seq256": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0, "seqlen": 256},
    "s2-lora16-neighbours-kd-lr3e-3": {"layers": "none", "stage2": True, "train": "neighbours", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0},
    "s2-lora16-merged-kd-lr3e-3": {"layers": "none", "stage2": True, "train": "merged", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0},
    # the default with its forward passes under bfloat16 autocast (faster on CPUs with AMX or AVX512-BF16)
    "s2-lora16-kd-lr3e-3-bf16": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0, "autocast": "on"},
    # ... and with shorter training windows, the same tokens per optimizer step (held-out windows stay --seqlen long)
    "s2-lora16-kd-lr3e-3-bf16-seq256": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0, "autocast": "on",
                                        "seqlen": 256, "batch_size": 4},
    "s2-lora16-kd-lr3e-3-bf16-seq128": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0, "autocast": "on",
                                        "seqlen": 128, "batch_size": 8},
    # ... with the same steps over half the text, seen twice (what repeated text is worth against fresh text)
    "s2-lora16-kd-lr3e-3-bf16-2pass": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0, "autocast": "on",
                                       "passes": 2},
    # ... and one training knob changed at a time: KD temperature, no gradient clipping, no warm-up, rank 32
    "s2-lora16-kd-lr3e-3-bf16-T2": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0, "autocast": "on",
                                    "temperature": 2.0},
    "s2-lora16-kd-lr3e-3-bf16-noclip": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0, "autocast": "on",
                                        "max_grad_norm": 0.0},
    "s2-lora16-kd-lr3e-3-bf16-warm0": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "global_lr": 3e-3, "hidden_weight": 0.0, "autocast": "on",
                                       "warmup": 0.0},
    "s2-lora32-kd-lr3e-3-bf16": {"layers": "none", "stage2": True, "train": "all", "lora": 32, "global_lr": 3e-3, "hidden_weight": 0.0, "autocast": "on"},
    # LoRA+: the B matrices (zero at the start) at a multiple of the rate of A
    "s2-lora16plus4-kd-lr1.5e-3": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "lora_plus": 4.0, "global_lr": 1.5e-3, "hidden_weight": 0.0},
    "s2-lora16plus16-kd-lr5e-4": {"layers": "none", "stage2": True, "train": "all", "lora": 16, "lora_plus": 16.0, "global_lr": 5e-4, "hidden_weight": 0.0},
    "s2-lora64-kd-lr2e-3": {"layers": "none", "stage2": True, "train": "all", "lora": 64, "global_lr": 2e-3, "hidden_weight": 0.0},
}


def run_config(name: str, compressed: Path, work: Path, args) -> dict:
    from come.distill import distill

    opts = dict(CONFIGS[name])
    opts.setdefault("autocast", "off")  # float32 unless the config says otherwise, whatever the machine
    stage2 = opts.pop("stage2", False)
    seqlen = opts.pop("seqlen", args.seqlen)
    batch_size = opts.pop("batch_size", args.batch_size)
    passes = opts.pop("passes", 1)
    step_tokens = batch_size * seqlen
    budget = args.steps * args.batch_size * args.seqlen  # the same tokens for every config
    if stage2:
        opts["global_steps"] = max(1, budget // step_tokens)
    # Stage 1 trains on `tokens` per layer; with stage 2 as well both share the budget's text.
    tokens, heldout = budget, None
    if seqlen != args.seqlen or passes != 1:
        tokens, heldout = same_draw(compressed, budget, seqlen, passes, args)
    out = work / name
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    summary = distill(compressed, out, tokens=tokens, heldout=heldout, seqlen=seqlen, batch_size=batch_size,
                      heldout_tokens=args.heldout_tokens, eval_every=args.eval_every, overwrite=True,
                      progress=not args.quiet, seed=args.seed, **opts)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    sel = summary["selection"]
    shutil.rmtree(out, ignore_errors=True)  # the model is not needed: the numbers are
    return {
        "config": name,
        "options": {**CONFIGS[name], **opts},
        "training_tokens": budget,
        "batch_size": batch_size,
        "kl_before": sel["kl_before"],
        "kl_after": sel["kl_after"],
        "kl_drop_pct": 100 * (1 - sel["kl_after"] / sel["kl_before"]),
        "top1_before": sel["candidates"]["input"]["top1"],
        "top1_after": sel["candidates"][sel["chosen"]]["top1"],
        "nll_after": sel["candidates"][sel["chosen"]]["nll"],
        "chosen": sel["chosen"],
        "candidates": sel["candidates"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "kl_drop_pct_per_cpu_min": 100 * (1 - sel["kl_after"] / sel["kl_before"]) / max(cpu / 60, 1e-9),
        "cpu": cpu_kind(),
    }


def same_draw(compressed: Path, budget: int, seqlen: int, passes: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows of `seqlen`, held-out windows of --seqlen): the windows come distill draws for a
    config at --seqlen, the training ones cut into `seqlen`-token pieces, and only the first 1/`passes` of
    them kept (stage 2 goes over them `passes` times in the budget's steps). So such a config trains on the
    same text (or part of it) and is judged on the same held-out windows as the others."""
    from transformers import AutoTokenizer

    from come.distill.options import DistillOptions
    from come.distill.run import _draw, _heldout_rows, _split_off

    if args.seqlen % seqlen:
        sys.exit(f"error: a config's seqlen {seqlen} must divide --seqlen {args.seqlen}")
    o = DistillOptions(seqlen=args.seqlen, heldout_tokens=args.heldout_tokens, seed=args.seed)
    nsamples, n_held = -(-budget // args.seqlen), _heldout_rows(o, args.seqlen)
    both = _draw(AutoTokenizer.from_pretrained(compressed), o.data, nsamples + n_held, o, "the budget")
    train, held = _split_off(both, n_held, o.seed, "the drawn text")
    return train[: train.shape[0] // passes].reshape(-1, seqlen), held


def cpu_kind() -> str:
    """The CPU's vector unit as torch sees it, and whether it computes bfloat16 natively: seconds measured on
    different CPUs do not compare."""
    from come.engine.precision import native_bf16

    return torch.backends.cpu.get_cpu_capability() + (", native bf16" if native_bf16(torch.device("cpu")) else "")


def write_tables(results: Path, rows: list[dict], command: str) -> None:
    cols = ["config", "training_tokens", "batch_size", "kl_before", "kl_after", "kl_drop_pct", "top1_before", "top1_after", "chosen", "wall_s", "cpu_s",
            "kl_drop_pct_per_cpu_min", "cpu"]
    with open(results.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Recovery ablation on SmolLM2-135M (come-search, ratio 0.3)", "",
        "Each cell: `python bench/recovery_smollm2.py COMPRESSED --configs CONFIG --steps STEPS --batch-size BATCH --quiet` "
        "(tokens = steps x batch x 512), in its own invocation; the table lists every finished cell and was written by "
        f"`{command}`.  ",
        f"Machine: {platform.machine()}, torch {torch.__version__}, table written {time.strftime('%Y-%m-%d')}.  ",
        "KL: mean per-token KL(dense || student) in nats on come distill's held-out windows (Wikipedia calib split, never "
        "trained on). `chosen`: what the run returned (the lowest held-out KL among the input and every check). cpu_s: "
        "process CPU time (all threads). cpu: the machine's vector unit (cells recorded before this column ran on an "
        "AVX2 machine); seconds compare only between cells of the same cpu.", "",
        "| config | options | tokens | batch | KL before | KL after | KL drop % | top-1 before | top-1 after | chosen | wall s | CPU s | KL drop % per CPU-min | cpu |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(f"| {r['config']} | {opts} | {r['training_tokens']} | {r.get('batch_size', 2)} | {r['kl_before']:.4f} | {r['kl_after']:.4f} | {r['kl_drop_pct']:.1f} | "
                     f"{r['top1_before']:.3f} | {r['top1_after']:.3f} | {r['chosen']} | {r['wall_s']} | {r['cpu_s']} | "
                     f"{r['kl_drop_pct_per_cpu_min']:.2f} | {r.get('cpu', 'AVX2')} |")
    md = results.with_suffix(".md")
    notes = md.read_text().partition("\n## Notes")[1:] if md.is_file() else ("", "")  # hand-written notes survive a rewrite
    md.write_text("\n".join(lines) + "\n" + "".join(notes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compressed", type=Path, help="a come compress output folder (its plan names the teacher)")
    p.add_argument("--configs", default="s2-merged,s2-all-kd,s2-lora16-kd,s1-mse", help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=40, help="token budget = steps x batch-size x seqlen, the same for every config")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--heldout-tokens", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("runs/recovery"))
    p.add_argument("--results", type=Path, default=Path("bench/results/recovery_smollm2"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    cells = args.results.parent / (args.results.name + "_cells")
    cells.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    for name in args.configs.split(","):
        # batch sizes other than the first ablation's 2 are part of the cell's name
        cell = cells / (f"{name}-t{args.steps * args.batch_size * args.seqlen}" + (f"-b{args.batch_size}" if args.batch_size != 2 else "") + ".json")
        if not cell.is_file():
            row = run_config(name, args.compressed, args.work, args)
            cell.write_text(json.dumps(row, indent=1))
            print(f"{name}: KL {row['kl_before']:.4f} -> {row['kl_after']:.4f} ({row['kl_drop_pct']:.1f}%), {row['cpu_s']} CPU-s", flush=True)
        # The table: every finished cell (earlier invocations' too), by budget, then name.
        rows = [json.loads(c.read_text()) for c in cells.glob("*.json")]
        rows.sort(key=lambda r: (r["training_tokens"], r["config"], r.get("batch_size", 2)))
        write_tables(args.results, rows, command)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
