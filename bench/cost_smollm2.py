"""Compression cost of the default method against the paper's CoMe, measured in one run.

Both compress SmolLM2-135M at the same ratio from the same calibration set (the default method's:
128 x 128 Wikipedia tokens), one after the other in this process, alternating `--repeats` times so that a
change in machine load hits both; reports wall seconds, decoder-layer passes and the ratio.

    python bench/cost_smollm2.py --ratio 0.3 --repeats 1 --results bench/results/cost_smollm2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _results  # bench/ is on sys.path when a bench script runs
import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", default=str(HERE / "results" / "cost_smollm2"))
    args = parser.parse_args()

    import come
    from come.data import calibration_tokens
    from come.methods import DEFAULT_METHOD, method_defaults
    from come.models import load_model
    from come.options import resolve_options

    loaded = load_model(None)
    calib = resolve_options(method_defaults(DEFAULT_METHOD), {})
    tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
    runs = {"come (paper)": {"method": "come", "allow_remerge": False}, "come-search (default)": {"method": "come-search"}}
    rows = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, options in runs.items():
            model = load_model(None)
            start = time.perf_counter()
            result = come.compress(model, ratio=args.ratio, tokens=tokens, progress=False, **options)
            seconds = time.perf_counter() - start
            rows[name].append({"seconds": seconds, "layer_passes": result.plan["execution"]["layer_passes"],
                               "final_layers": result.plan["final_layers"]})
            print(f"{name}: {seconds:.1f} s, {result.plan['execution']['layer_passes']} layer passes", flush=True)
    best = {name: min(r["seconds"] for r in rs) for name, rs in rows.items()}
    ratio = best["come-search (default)"] / best["come (paper)"]
    lines = [
        "# Compression cost: default method vs the paper's CoMe (SmolLM2-135M, one run)",
        "",
        f"Command: `{_results.command_line()}`  ",
        f"Machine: {_results.machine(torch.get_num_threads())}. Calibration: {calib.nsamples} x {calib.seqlen} Wikipedia tokens (seed 0), ratio {args.ratio}.",
        "",
        "| method | layers | best wall s | decoder-layer passes (whole-set equivalents) |",
        "|---|---|---|---|",
    ]
    for name, rs in rows.items():
        lines.append(f"| {name} | {rs[0]['final_layers']} | {best[name]:.1f} | {rs[0]['layer_passes']} |")
    lines += ["", f"Time ratio (default / paper): **{ratio:.2f}x**."]
    _results.write(args.results, lines, data={"rows": rows, "ratio": ratio})


if __name__ == "__main__":
    main()
