"""What one candidate's output refit costs against the FFN width, for each way of choosing its damping.

The default's search refits every candidate (`core/refit.py`): it accumulates the Gram matrix Z^T Z of
down_proj's input over the calibration tokens, scores dampings on held-out rows, then solves once on every
row. This times those parts on synthetic activations of the shapes a model of FFN width n and hidden size m
gives (float32 activations, float64 statistics, as in a real refit), for `--damping grid` (every value of the
9-value grid: one Cholesky solve each) and `auto` (the walk along the grid, `lowest_on_grid`), the walk both
in float64 and as the default runs it (screened with float32 solves, `SCREEN_DTYPE`), and checks that all
pick the same damping and weight. The activations have column scales spread over three decades and
targets that a damping in the middle of the grid fits best, as in the recorded SmolLM2 refits; where the
held-out minimum lies decides how many solves the walk needs, so the table reports it.

    OMP_NUM_THREADS=2 python bench/refit_cost.py --widths 1536,3072,4864 --hidden 576,768,896 --tokens 16384 \\
        --results bench/results/refit_cost

The last lines fit the measured seconds to the cost law (Gram: tokens x n^2; each solve: n^3 + n^2 m) and
extrapolate it, labelled as such, to Llama-7B's FFN (n 11008, m 4096).
"""

from __future__ import annotations

import argparse
import time

import _results  # bench/ is on sys.path when a bench script runs
import torch

from come.core import refit
from come.core.refit import DAMPING_GRID, HOLDOUT_EVERY, RidgeStats, choose_and_solve

# Ways of choosing the damping: the grid; the walk in float64; the default, the walk screened in float32.
MODES = {"grid": ("grid", None), "walk64": ("auto", None), "auto": ("auto", refit.SCREEN_DTYPE)}


def synthetic(n: int, m: int, tokens: int, seed: int = 0):
    """(z, y, w0): FFN activations with column scales over three decades, targets from a nearby weight plus noise."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 1.5, n)[torch.randperm(n, generator=g)]
    z = torch.randn(tokens, n, generator=g) * scales
    w0 = torch.randn(m, n, generator=g) / n**0.5
    w = w0 + 0.3 * torch.randn(m, n, generator=g) / n**0.5
    y = z @ w.T + 0.5 * (z @ w.T).std() * torch.randn(tokens, m, generator=g)
    return z, y, w0


def measure(n: int, m: int, tokens: int, seqlen: int, batch_rows: int) -> dict:
    z, y, w0 = synthetic(n, m, tokens)
    gram = {}
    for blocks in (False, True):  # each batch's rows added as they come (before), or in blocks (collect_stats now)
        start = time.process_time()
        fit, held = RidgeStats.zeros(n, m), RidgeStats.zeros(n, m)
        sinks = (refit._Rows(fit), refit._Rows(held)) if blocks else (fit, held)
        for b0 in range(0, tokens, batch_rows):  # as collect_stats: batches of sequences, every 4th held out
            zb, yb = z[b0 : b0 + batch_rows], y[b0 : b0 + batch_rows]
            seq = torch.arange(b0, b0 + zb.shape[0]) // seqlen
            held_rows = seq % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
            sinks[0].add(zb[~held_rows], yb[~held_rows], yb[~held_rows])
            sinks[1].add(zb[held_rows], yb[held_rows], yb[held_rows])
        for sink in sinks if blocks else ():
            sink.flush()
        gram[blocks] = time.process_time() - start
    gram_s = gram[True]
    row = {"d_ffn": n, "d_hidden": m, "tokens": tokens, "gram_batches_s": round(gram[False], 3), "gram_s": round(gram_s, 3)}
    results = {}
    for mode, (damping, screen) in MODES.items():
        refit.SCREEN_DTYPE = screen
        start = time.process_time()
        try:
            results[mode] = choose_and_solve(fit, held, w0.double(), damping)
        finally:
            refit.SCREEN_DTYPE = MODES["auto"][1]
        row[f"{mode}_s"] = round(time.process_time() - start, 3)
        row[f"{mode}_solves"] = len(results[mode].record.get("held_out_errors", {})) + 1  # the grid's, then the final one
    row["damping"] = results["auto"].record["damping"]
    row["same_pick"] = all(results[m].record["damping"] == results["auto"].record["damping"]
                           and torch.equal(results[m].weight, results["auto"].weight) for m in MODES)
    row["speedup"] = round(row["grid_s"] / row["auto_s"], 2)
    row["screen_speedup"] = round(row["walk64_s"] / row["auto_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="1536,3072,4864", help="FFN widths n (comma-separated)")
    parser.add_argument("--hidden", default="576,768,896", help="hidden sizes m, one per width")
    parser.add_argument("--tokens", type=int, default=128 * 128, help="calibration tokens (default: the default's 128 x 128)")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--results", default="bench/results/refit_cost")
    args = parser.parse_args()
    widths, hidden = [int(v) for v in args.widths.split(",")], [int(v) for v in args.hidden.split(",")]
    if len(widths) != len(hidden):
        parser.error("--widths and --hidden need one value each per row")
    rows = []
    for n, m in zip(widths, hidden):
        rows.append(measure(n, m, args.tokens, args.seqlen, batch_rows=8 * args.seqlen))
        print(rows[-1], flush=True)

    # Cost law from the widest row: Gram ~ tokens n^2, one solve ~ n^3 + n^2 m (factorisation, solve, product).
    big = rows[-1]
    per_solve = {mode: big[f"{mode}_s"] / big[f"{mode}_solves"] for mode in MODES}
    unit = big["d_ffn"] ** 3 + big["d_ffn"] ** 2 * big["d_hidden"]
    n7, m7 = 11008, 4096
    scale_solve = (n7**3 + n7**2 * m7) / unit
    scale_gram = n7**2 / big["d_ffn"] ** 2
    lines = [
        "# Output-refit cost per candidate against FFN width: the damping grid vs the walk (one run)",
        "",
        f"Command: `{_results.command_line()}`  ",
        f"Machine: {_results.machine(threads=torch.get_num_threads())}. Synthetic float32 activations, "
        f"{args.tokens} tokens in sequences of {args.seqlen}, every {HOLDOUT_EVERY}th sequence held out; grid: {len(DAMPING_GRID)} dampings.",
        "",
        "| d_ffn | d_hidden | Gram CPU-s, per batch (before) | Gram CPU-s, blocks of d_ffn rows (default) | "
        "grid: choose + solve CPU-s (solves) | walk, float64: choose + solve CPU-s (solves) | "
        "walk, float32 screen (default): choose + solve CPU-s (solves) | grid / default | float64 walk / default | damping "
        "| same pick and weight |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['d_ffn']} | {r['d_hidden']} | {r['gram_batches_s']:.2f} | {r['gram_s']:.2f} | {r['grid_s']:.2f} ({r['grid_solves']}) | "
                     f"{r['walk64_s']:.2f} ({r['walk64_solves']}) | {r['auto_s']:.2f} ({r['auto_solves']}) | "
                     f"{r['speedup']:.2f}x | {r['screen_speedup']:.2f}x | {r['damping']} | {r['same_pick']} |")
    lines += [
        "",
        "Solves include the final one on every row (always float64). The walk's count depends on where the held-out "
        "minimum lies (here at the damping shown; in the recorded SmolLM2 refits mostly 0.3 or 1, i.e. 3 or 4 grid "
        "solves). The float32 screen's solves are float32; where two errors it compares are within "
        "`SCREEN_MARGIN` of each other the float64 walk runs as well (counted in the same column's time). "
        "Same pick and weight: every mode's damping and float64 weight equal the default's, bit for bit.",
        "",
        f"**Extrapolation** (not measured: the cost law fitted to the d_ffn {big['d_ffn']} row, same machine and "
        f"threads, to Llama-7B's n {n7}, m {m7}, same token count): Gram about {big['gram_s'] * scale_gram:.0f} CPU-s, "
        f"damping and solve about {per_solve['grid'] * scale_solve * big['grid_solves']:.0f} s with the grid "
        f"({big['grid_solves']} solves), {per_solve['walk64'] * scale_solve * big['walk64_solves']:.0f} s with the float64 "
        f"walk and {per_solve['auto'] * scale_solve * big['auto_solves']:.0f} s with the default's screened walk "
        f"({big['auto_solves']} solves), per candidate.",
    ]
    _results.write(args.results, lines, rows=rows)


if __name__ == "__main__":
    main()
