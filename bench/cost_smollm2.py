"""Compression cost of the default method against the paper's CoMe, measured in one run.

Both compress SmolLM2-135M at the same ratio from the same calibration set (the default method's:
128 x 128 Wikipedia tokens), alternating `--repeats` times so that a change in machine load hits both.
Each compression runs in its own process (`--worker`), so that its peak RSS and CPU time are its own:
model load, calibration and search included, saving excluded. Reports wall and CPU seconds, peak RSS,
decoder-layer passes, the time ratio, and whether the default's plan (layer covers, kept channels) equals
the committed cell `smollm2_methods/cells/come-search-r<ratio>.json` when it exists. On a CPU with native
bfloat16 three more runs go beside them: the paper's CoMe with the default's bfloat16 layer passes
(`--autocast on`), and the default with float32 layer passes (`--autocast off`), and with float32 candidate
losses too (`--search-autocast off`).

    OMP_NUM_THREADS=1 python bench/cost_smollm2.py --ratio 0.3 --repeats 1 --results bench/results/cost_smollm2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import _results  # bench/ is on sys.path when a bench script runs
import torch

HERE = Path(__file__).resolve().parent
PAPER, DEFAULT = "come (paper)", "come-search (default)"
PAPER_BF16 = "come (paper), bfloat16 layer passes"
FLOAT32_PASSES = "come-search (float32 layer passes)"
FLOAT32_ALL = "come-search (float32 layer passes and candidate losses)"
RUNS = {PAPER: {"method": "come", "allow_remerge": False},
        PAPER_BF16: {"method": "come", "allow_remerge": False, "autocast": "on"},
        DEFAULT: {"method": "come-search"},
        FLOAT32_PASSES: {"method": "come-search", "autocast": "off"},
        FLOAT32_ALL: {"method": "come-search", "autocast": "off", "search_autocast": "off"}}
# Where the CPU computes bfloat16 natively the default runs its layer passes and ranks its candidates in
# bfloat16: these runs show what each saves, and what the paper's CoMe gets from the same layer passes.
# Elsewhere they are the same runs as the paper's CoMe or the default, and are left out.
NATIVE_ONLY = (PAPER_BF16, FLOAT32_PASSES, FLOAT32_ALL)


def worker(name: str, ratio: float) -> dict:
    import come
    from come.engine.allocator import keep_freed_memory
    from come.engine.models import load_model
    from come.engine.options import resolve_options
    from come.evaluation.data import calibration_tokens
    from come.methods import DEFAULT_METHOD, method_defaults

    keep_freed_memory()  # the allocator policy of the `come` command, whose process this one stands for

    start, cpu = time.perf_counter(), time.process_time()
    loaded = load_model(None)
    calib = resolve_options(method_defaults(DEFAULT_METHOD), {})
    tokens = calibration_tokens(loaded.tokenizer, "wikipedia", calib.nsamples, calib.seqlen, seed=0)
    result = come.compress(loaded, ratio=ratio, tokens=tokens, progress=False, **RUNS[name])
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "layer_passes": result.plan["execution"]["layer_passes"],
        "final_layers": result.plan["final_layers"],
        "calibration": f"{calib.nsamples} x {calib.seqlen}",
        "layers": result.plan["layers"],
        "search_loss_precision": result.plan["execution"].get("search_loss_precision"),
        "layer_pass_precision": result.plan["execution"].get("layer_pass_precision"),
    }


def picks(layers: list[dict]) -> list:
    """What a plan chose (layer covers, kept KV groups and FFN neurons per source, refit damping), without the
    scores and errors that vary in the last digits from run to run."""
    out = []
    for layer in layers:
        sources = ((layer.get("merge") or {}).get("sources")) or []
        refit = layer.get("refit") or {}
        out.append((layer["covers"], [(s["layer"], s.get("kv_groups"), s.get("neurons")) for s in sources],
                    refit.get("damping"), refit.get("applied")))
    return out


def plan_differences(committed: list[dict], new: list[dict]) -> str:
    """Where two plans' picks differ: layer covers, refit dampings, and the kept FFN neurons and KV groups
    (counted per merge source: a re-merged source's channel indices shift with any change to its first merge)."""
    if [layer["covers"] for layer in committed] != [layer["covers"] for layer in new]:
        return "different layer covers"
    notes, kept, changed = [], 0, 0
    for a, b in zip(picks(committed), picks(new)):
        if a[2:] != b[2:]:
            notes.append(f"refit of {a[0]}: damping {a[2]} -> {b[2]}")
        for sa, sb in zip(a[1], b[1]):
            if sa[1] != sb[1]:
                notes.append(f"KV groups of a source of {a[0]}")
            kept += len(sa[2] or [])
            changed += len(set(sa[2] or []) ^ set(sb[2] or [])) // 2
    if changed:
        notes.append(f"{changed} of {kept} kept FFN neurons")
    return "same layer covers; differ: " + "; ".join(notes) if notes else "identical"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", default=str(HERE / "results" / "cost_smollm2"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one compression, print its JSON
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from RESULTS.json, measuring nothing")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.ratio)))
        return

    from come.engine.precision import native_bf16

    names = [name for name in RUNS if native_bf16(torch.device("cpu")) or name not in NATIVE_ONLY]
    rows = {name: [] for name in names}
    command = _results.command_line()
    if args.report_only:  # the measurements and the command that made them
        rows = json.loads(Path(args.results).with_suffix(".json").read_text())["rows"]
        command = command.replace(" --report-only", "")
    for _ in range(0 if args.report_only else args.repeats):
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--ratio", str(args.ratio)], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows[name].append(row)
            print(f"{name}: {row['seconds']:.1f} s wall, {row['cpu_seconds']:.1f} CPU-s, {row['peak_rss_gb']:.2f} GB, "
                  f"{row['layer_passes']} layer passes", flush=True)
    best = {name: min(rs, key=lambda r: r["cpu_seconds"]) for name, rs in rows.items()}
    ratio = best[DEFAULT]["cpu_seconds"] / best[PAPER]["cpu_seconds"]
    # The default's cell of the committed method table was made from the same calibration.
    committed = HERE / "results" / "smollm2_methods" / "cells" / f"come-search-r{args.ratio:g}.json"
    same_plan = differences = None
    if committed.is_file():
        committed_layers = json.loads(committed.read_text())["plan_layers"]
        same_plan = picks(committed_layers) == picks(best[DEFAULT]["layers"])
        differences = plan_differences(committed_layers, best[DEFAULT]["layers"])
    lines = [
        "# Compression cost: default method vs the paper's CoMe (SmolLM2-135M, one run)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_results.machine(torch.get_num_threads())}. Calibration: {best[PAPER]['calibration']} Wikipedia "
        f"tokens (seed 0), ratio {args.ratio}. Each compression in its own process: model load, calibration and "
        "search, no save.",
        "",
        "| method | layers | wall s | CPU s | peak RSS GB | decoder-layer passes (whole-set equivalents) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in best.items():
        lines.append(f"| {name} | {r['final_layers']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['layer_passes']} |")
    lines += ["", f"CPU-time ratio (default / paper): **{ratio:.2f}x**."]
    default = best[DEFAULT]
    lines.append(f"The default's layer passes: {default.get('layer_pass_precision')}; its candidate losses: "
                 f"{default.get('search_loss_precision')}.")
    if PAPER_BF16 in best:
        lines.append(f"Against the paper's CoMe with the same bfloat16 layer passes (`--autocast on`): "
                     f"**{default['cpu_seconds'] / best[PAPER_BF16]['cpu_seconds']:.2f}x**.")
    for name, flags in ((FLOAT32_PASSES, "`--autocast off`, the default before"),
                        (FLOAT32_ALL, "`--autocast off --search-autocast off`")):
        if name in best:
            lines.append(f"{name} ({flags}): **{best[name]['cpu_seconds'] / best[PAPER]['cpu_seconds']:.2f}x** the paper's "
                         f"CoMe; the default takes {default['cpu_seconds'] / best[name]['cpu_seconds']:.3f} of its CPU time; "
                         f"the default's picks against it: {plan_differences(best[name]['layers'], default['layers'])}.")
    if same_plan is not None:
        lines.append(f"Default's picks (layer covers, kept KV groups and FFN neurons, refit dampings) equal to the committed method-table cell "
                     f"`smollm2_methods/cells/{committed.name}`: **{same_plan}** ({differences}).")
    _results.write(args.results, lines, data={"rows": rows, "ratio": ratio, "same_plan_as_committed": same_plan,
                                              "differences_from_committed": differences})


if __name__ == "__main__":
    main()
