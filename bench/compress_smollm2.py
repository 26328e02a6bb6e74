"""CoMe vs ShortGPT vs dense on SmolLM2-135M: compression cost and held-out perplexity, in one run.

Each `come compress` runs as its own process so its wall time and peak RSS
(from the OS, via wait4) are its own. Perplexity is measured on the held-out
Wikipedia split, which never overlaps the calibration split.

    python bench/compress_smollm2.py --ratios 0.25,0.3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _results  # bench/ is on sys.path when a bench script runs
import torch

HERE = Path(__file__).resolve().parent


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {shlex.join(cmd)}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.25,0.3")
    parser.add_argument("--methods", default="come,shortgpt")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=None, help="held-out Wikipedia tokens (default: all)")
    parser.add_argument("--workdir", default=None, help="where compressed models go (default: a temp dir)")
    parser.add_argument("--results", default=str(HERE / "results" / "compress_smollm2"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from come.engine.models import load_model
    from come.evaluation.data import eval_tokens
    from come.evaluation.perplexity import perplexity

    dense = load_model(None)  # converts and caches the GGUF once, outside the timed runs
    tokens = eval_tokens(dense.tokenizer, "wikipedia", max_tokens=args.ppl_tokens)
    dense_params = sum(p.numel() for p in {id(p): p for p in dense.model.parameters()}.values())
    rows = [
        {
            "method": "dense",
            "ratio": 0.0,
            "layers": dense.model.config.num_hidden_layers,
            "removed_params": 0.0,
            "wall_s": "",
            "peak_rss_mib": "",
            "wiki_ppl": perplexity(dense.model, tokens, seqlen=args.seqlen)["ppl"],
        }
    ]
    del dense
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="come-bench-"))
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            out = workdir / f"{method}-{ratio}"
            cmd = [
                sys.executable, "-m", "come.cli", "compress", "--ratio", str(ratio), "--method", method,
                "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(out), "--overwrite",
            ]
            print("+", shlex.join(cmd), flush=True)
            wall, rss = run_measured(cmd)
            plan = json.loads((out / "come_plan.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "layers": plan["final_layers"],
                    "removed_params": plan["removed_parameter_fraction"],
                    "wall_s": round(wall, 1),
                    "peak_rss_mib": round(rss),
                    "wiki_ppl": perplexity(model, tokens, seqlen=args.seqlen)["ppl"],
                }
            )
            del model
            print(rows[-1], flush=True)

    dense_ppl = rows[0]["wiki_ppl"]
    lines = [
        "# SmolLM2-135M-Instruct: CoMe vs ShortGPT (layer removal by lowest BI)",
        "",
        f"Command: `{_results.command_line()}`  ",
        f"Machine: {_results.machine()}.  ",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of the Wikipedia calibration split (seed 0). "
        f"Perplexity: {tokens.numel()} tokens of the held-out Wikipedia split, windows of {args.seqlen}. "
        f"Dense model: {dense_params:,} parameters.",
        "",
        "| method | --ratio | layers | params removed | wall s | peak RSS MiB | wiki ppl | ppl / dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['layers']} | {r['removed_params']:.1%} | {r['wall_s']} | "
            f"{r['peak_rss_mib']} | {r['wiki_ppl']:.2f} | {r['wiki_ppl'] / dense_ppl:.2f}x |"
        )
    _results.write(args.results, lines, rows=rows)


if __name__ == "__main__":
    main()
