"""Hierarchical distillation on SmolLM2-135M: quality before/after stage 1 and stage 2, in one run.

CoMe at --ratio R and ShortGPT at the same budget (its control: the kept layer
before each removed span is trained to cover it), each evaluated compressed,
after stage 1 and after stage 2, next to the dense model.

    python bench/distill_smollm2.py --ratio 0.3 --tokens 32768 --global-steps 4 --limit 25
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _results  # bench/ is on sys.path when a bench script runs

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--methods", default="come,shortgpt")
    parser.add_argument("--nsamples", type=int, default=32, help="compression calibration sequences")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32768, help="stage-1 training tokens per layer")
    parser.add_argument("--global-steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--loss", default="mse")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--limit", type=int, default=25, help="documents per zero-shot task")
    parser.add_argument("--compressed", default=None, help="folder with METHOD-RATIO compressed models to reuse")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--results", default=str(HERE / "results" / "distill_smollm2"))
    args = parser.parse_args()

    from come.distill import distill
    from come.engine.pipeline import compress
    from come.evaluation.evaluate import evaluate
    from come.evaluation.tasks import PAPER_TASKS

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="come-distill-"))

    def measure(model_dir, method, stage, tokens_used, seconds):
        r = evaluate(
            str(model_dir) if model_dir else None, ["wikipedia", "lambada"], list(PAPER_TASKS),
            limit=args.limit, seqlen=args.seqlen, max_tokens=args.ppl_tokens,
        )
        row = {
            "method": method,
            "stage": stage,
            "layers": r["layers"],
            "tokens": tokens_used,
            "wall_s": round(seconds, 1) if seconds is not None else "",
            "ppl_wikipedia": r["perplexity"]["wikipedia"]["ppl"],
            "ppl_lambada": r["perplexity"]["lambada"]["ppl"],
            "avg_acc": r["zero_shot"]["average"],
        }
        print(row, flush=True)
        return row

    rows = [measure(None, "dense", "-", 0, None)]
    for method in args.methods.split(","):
        compressed = Path(args.compressed) / f"{method}-{args.ratio}" if args.compressed else None
        if compressed is None or not (compressed / "come_plan.json").is_file():
            compressed = workdir / f"{method}-{args.ratio}"
            start = time.perf_counter()
            compress(None, ratio=args.ratio, method=method, out=compressed, overwrite=True,
                     nsamples=args.nsamples, seqlen=args.seqlen)
            print(f"compressed {method} in {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(measure(compressed, method, "compressed", 0, None))

        stage1 = workdir / f"{method}-stage1"
        start = time.perf_counter()
        # The settings of the committed results (distill's defaults before end-to-end LoRA became the default).
        s1 = distill(compressed, stage1, tokens=args.tokens, seqlen=args.seqlen, loss=args.loss, overwrite=True, layers="merged",
                     global_steps=0, batch_size=8)
        rows.append(measure(stage1, method, "stage 1", s1["stage1"]["tokens_per_layer"], time.perf_counter() - start))

        stage2 = workdir / f"{method}-stage2"
        start = time.perf_counter()
        global_tokens = args.global_steps * args.global_batch * args.seqlen
        s2 = distill(stage1, stage2, tokens=global_tokens, seqlen=args.seqlen, layers="none",
                     global_steps=args.global_steps, batch_size=args.global_batch, overwrite=True, train="merged", lora=0,
                     global_lr=2e-5, hidden_weight=1.0)
        rows.append(measure(stage2, method, "stage 1 + 2", s2["stage2"]["tokens"], time.perf_counter() - start))

    dense_acc = rows[0]["avg_acc"]
    lines = [
        "# SmolLM2-135M-Instruct: hierarchical distillation after compression",
        "",
        f"Command: `{_results.command_line()}`  ",
        f"Machine: {_results.machine()}.  ",
        f"Perplexity: first {args.ppl_tokens} tokens of each held-out source, windows of {args.seqlen}. "
        f"Zero-shot: 7 tasks, first {args.limit} documents each (acc_norm for ARC-c, HellaSwag, OBQA; acc otherwise). "
        f"Stage 1: `--loss {args.loss}`, {args.tokens} tokens per trained layer from the Wikipedia calibration split. "
        f"Stage 2: {args.global_steps} steps of {args.global_batch} x {args.seqlen} tokens (logit KD + hidden alignment, merged layers).",
        "",
        "| method | stage | layers | training tokens (per layer in stage 1) | wall s | wiki ppl | lambada ppl | avg acc | acc retained vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['stage']} | {r['layers']} | {r['tokens']} | {r['wall_s']} | {r['ppl_wikipedia']:.2f} | "
            f"{r['ppl_lambada']:.2f} | {r['avg_acc']:.4f} | {r['avg_acc'] / dense_acc:.1%} |"
        )
    _results.write(args.results, lines, rows=rows)


if __name__ == "__main__":
    main()
