"""Cost of the default method's search steps against model shape: the cost law, measured and extrapolated.

For each synthetic Llama shape (random weights, written once by `scale.py`'s writer, so the model is
never built in memory here), a child process loads it, takes the default calibration (128 x 128
Wikipedia tokens, seed 0) and runs `come-search` for `--steps` search steps (or to `--ratio`), timing
each step and the work inside it:

- layer passes: candidate losses (`loss_sum_through`: the screen and the finalists) and boundary updates
  after a step (`recompute_from`);
- refit statistics (`collect_stats`: the candidate layer's pass plus Z^T Z and Z^T Y);
- refit solves (`choose_and_solve`: the damping walk's Cholesky solves plus the final one).

Each shape is a resumable cell (`<results>_cells/<shape>.json`): a rerun measures only what is missing.
The table then fits one coefficient per kind of work (seconds per decoder-layer FLOP, per Gram entry-row
d_ffn^2 x rows, per d_ffn^3 of solving) over all shapes, shows how well it predicts each measured step,
and extrapolates it to larger shapes. The extrapolation is labelled as such: it assumes the same machine,
threads and calibration, and the number of candidates and solves per step measured here.

    OMP_NUM_THREADS=1 python bench/search_scale.py --results bench/results/search_scale
    python bench/search_scale.py --shapes 4:128:256:4:2 --steps 1 --nsamples 8 --results /tmp/ss   # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import _results  # bench/ is on sys.path when a bench script runs
import torch

HERE = Path(__file__).resolve().parent
# layers:hidden:d_ffn:heads:kv_heads. SmolLM2-135M's width at two depths, then Qwen2-0.5B's hidden size
# with d_ffn growing to its 4,864.
DEFAULT_SHAPES = "8:576:1536:9:3,16:576:1536:9:3,8:896:1536:14:2,8:896:3072:14:2,8:896:4864:14:2"
# Shapes the table extrapolates to: name, layers, hidden, d_ffn, heads, kv heads, vocabulary.
TARGETS = [("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152), ("Qwen2-0.5B", 24, 896, 4864, 14, 2, 151936),
           ("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000), ("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256)]
KINDS = ("losses", "boundaries", "refit_stats", "refit_solves")  # the timed kinds of work


def parse_shape(text: str) -> dict:
    layers, hidden, ffn, heads, kv = (int(v) for v in text.split(":"))
    if hidden % heads or heads % kv:
        raise SystemExit(f"error: shape {text}: hidden must split into heads, heads into kv groups")
    return {"layers": layers, "hidden": hidden, "intermediate": ffn, "heads": heads, "kv_heads": kv}


def shape_name(s: dict) -> str:
    return f"{s['layers']}x{s['hidden']}x{s['intermediate']}-h{s['heads']}kv{s['kv_heads']}"


def layer_flops(s: dict) -> float:
    """Matmul FLOPs of one decoder layer per token (projections only; attention scores at 128 tokens are small)."""
    h, f, kv = s["hidden"], s["intermediate"], s["hidden"] // s["heads"] * s["kv_heads"]
    return 2.0 * (3 * h * f + 2 * h * h + 2 * h * kv)


# -- the measured child ---------------------------------------------------------
def _loss_rows(cache, start, stack, samples=None, skip=0) -> int:
    """Calibration sequences a `loss_sum_through(start, stack, samples, skip)` call scores."""
    n = cache.tokens.shape[0]
    return (n if samples is None else min(samples, n)) - skip


def worker(folder: str, steps: int | None, ratio: float | None, nsamples: int | None, seqlen: int | None) -> dict:
    import come
    from come.core import refit
    from come.core.scoring import BoundaryCache
    from come.engine.allocator import keep_freed_memory
    from come.engine.models import load_model
    from come.engine.options import resolve_options
    from come.evaluation.data import calibration_tokens
    from come.methods import DEFAULT_METHOD, method_defaults, search

    keep_freed_memory()  # the allocator policy of the `come` command, whose process this one stands for

    clock = {"step": None}
    steps_out: list[dict] = []

    def timed(kind, fn):
        """Add the CPU time (and, for a cache method, the layer passes) of every call to the current step."""
        def wrapper(*args, **kwargs):
            cache = args[0]
            passes, c = getattr(cache, "layer_passes", 0.0), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                bucket = clock["step"]
                if bucket is not None:
                    bucket[kind] = bucket.get(kind, 0.0) + time.process_time() - c
                    bucket[kind + "_calls"] = bucket.get(kind + "_calls", 0) + 1
                    if kind == "losses":  # the sequences this loss ran the LM head on (a screen's few, or the rest)
                        bucket["losses_rows"] = bucket.get("losses_rows", 0) + _loss_rows(cache, *args[1:], **kwargs)
                    bucket[kind + "_passes"] = bucket.get(kind + "_passes", 0.0) + getattr(cache, "layer_passes", 0.0) - passes
        return wrapper

    solves = {"n": 0}
    real_solve = refit._solve_shifted

    def counting_solve(*args, **kwargs):
        solves["n"] += 1
        return real_solve(*args, **kwargs)

    refit._solve_shifted = counting_solve
    BoundaryCache.loss_sum_through = timed("losses", BoundaryCache.loss_sum_through)  # loss_through calls it
    BoundaryCache.recompute_from = timed("boundaries", BoundaryCache.recompute_from)
    refit.collect_stats = timed("refit_stats", refit.collect_stats)
    refit.choose_and_solve = timed("refit_solves", refit.choose_and_solve)
    real_step = search.search_step

    def step(ctx, size, *args, **kwargs):  # search_step's own arguments, passed through whatever they are
        bucket = {"layers_before": ctx.num_layers, "passes_before": ctx.cache.layer_passes}
        clock["step"], solves["n"] = bucket, 0
        w, c = time.perf_counter(), time.process_time()
        try:
            return real_step(ctx, size, *args, **kwargs)
        finally:
            bucket.update(seconds=time.perf_counter() - w, cpu_seconds=time.process_time() - c, solves=solves["n"],
                          layer_passes=ctx.cache.layer_passes - bucket.pop("passes_before"))
            steps_out.append(bucket)
            clock["step"] = None

    search.search_step = step
    start, cpu = time.perf_counter(), time.process_time()
    loaded = load_model(folder)
    calib = resolve_options(method_defaults(DEFAULT_METHOD), {})
    n, length = nsamples or calib.nsamples, seqlen or calib.seqlen
    tokens = calibration_tokens(loaded.tokenizer, "wikipedia", n, length, seed=0)
    layers = loaded.model.config.num_hidden_layers
    target = {"target_layers": layers - steps} if steps else {"ratio": ratio}
    result = come.compress(loaded, tokens=tokens, progress=False, **target)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "calibration": [n, length],
        "threads": torch.get_num_threads(),
        "final_layers": result.plan["final_layers"],
        "vocab": loaded.model.config.vocab_size,
        "search_samples": result.plan["options"].get("search_samples"),
        "steps": steps_out,
    }


# -- the cost law -----------------------------------------------------------------
def step_flops(s: dict, step: dict, cell: dict) -> dict:
    """The work of one measured step, in FLOPs per kind (what each kind's time should be proportional to)."""
    n, seqlen = cell["calibration"]
    tokens, h, f = n * seqlen, s["hidden"], s["intermediate"]
    # Sequences the losses ran the LM head on: counted per call (a finalists screen scores a few, then the
    # rest); cells measured before that count scored every call on all the scored sequences.
    head_rows = step.get("losses_rows", step.get("losses_calls", 0) * min(cell["search_samples"] or n, n))
    return {
        # decoder layers run for candidate losses and boundary updates, plus the LM head of every loss
        "passes": (step.get("losses_passes", 0.0) + step.get("boundaries_passes", 0.0)) * tokens * layer_flops(s)
        + head_rows * seqlen * 2.0 * h * cell["vocab"],
        "stats_passes": step.get("refit_stats_passes", 0.0) * tokens * layer_flops(s),  # each refit runs its layer
        "gram": step.get("refit_stats_calls", 0) * tokens * (f * f + 2.0 * f * h),  # Z^T Z (half, mirrored), Z^T Y
        "solve": step.get("solves", 0) * (f**3 / 3.0 + 4.0 * f * f * h),  # Cholesky, its two triangular solves, H @ D
    }


def fit_law(cells: list[dict]) -> dict:
    """CPU seconds per FLOP of each kind, least squares through the origin over every measured step.
    The refit statistics' own layer pass is charged at the layer-pass rate."""
    firsts = [(step_flops(c["shape"], st, c), st) for c in cells for st in c["steps"]]

    def through_origin(pairs):
        den = sum(x * x for x, _ in pairs)
        return sum(x * y for x, y in pairs) / den if den else 0.0

    a = through_origin([(w["passes"], st.get("losses", 0.0) + st.get("boundaries", 0.0)) for w, st in firsts])
    b = through_origin([(w["gram"], st.get("refit_stats", 0.0) - a * w["stats_passes"]) for w, st in firsts])
    c = through_origin([(w["solve"], st.get("refit_solves", 0.0)) for w, st in firsts])
    return {"passes": a, "gram": b, "solve": c}


def real_passes_per_layer(plan_steps: list[dict], scored: float, screen: tuple[int, float] | None = None) -> float:
    """Whole-set layer passes per step and model layer for candidate losses and boundary updates, from where a
    real plan's candidates sat. Random weights put every candidate near the last layers, so the synthetic
    shapes undercount the passes a real model's mid-depth candidates make. A merge of window [s, s+1] runs
    L - s - 1 layers on the scored sequences (`scored`: their share), a deletion of k with its refitted owner
    L - k; the boundary update after the chosen change reruns every layer from its first changed position.

    `screen` (finalists N, the screen's share of the set): every candidate runs on the screen's sequences and
    only the N lowest on the rest, as the default's finalists screen does. The N are those of lowest
    "screen_loss" where the plan recorded one, else of lowest loss (a plan made without the screen: the
    whole-sample loss stands in for the screen's, an approximation of which candidates went on)."""
    per_step = []
    for i, st in enumerate(plan_steps):
        layers = st["layers_before"]
        depth = [(layers - c["window"][0] - 1) if c["op"] == "merge" else (layers - c["layer"]) for c in st["candidates"]]
        if screen is None or screen[0] <= 0 or screen[0] >= len(depth):
            passes = sum(depth) * scored
        else:
            finalists, share = screen

            def rank(j, c):
                value = c.get("screen_loss", c.get("loss"))
                return (math.inf if value is None else value, j)

            order = sorted(range(len(depth)), key=lambda j: rank(j, st["candidates"][j]))[:finalists]
            passes = sum(depth) * share + sum(depth[j] for j in order) * (scored - share)
        if i:  # the previous step's boundary update, made lazily at the start of this one
            prev = plan_steps[i - 1]["chosen"]
            first = prev["window"][0] if prev["op"] == "merge" else max(prev["layer"] - 1, 0)
            passes += layers - first
        per_step.append(passes / layers)
    return sum(per_step) / len(per_step)


def predict(law: dict, work: dict) -> float:
    return law["passes"] * (work["passes"] + work["stats_passes"]) + law["gram"] * work["gram"] + law["solve"] * work["solve"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated layers:hidden:d_ffn:heads:kv_heads")
    parser.add_argument("--steps", type=int, default=2, help="search steps timed per shape (0: run to --ratio)")
    parser.add_argument("--ratio", type=float, default=0.25, help="with --steps 0: the ratio to compress to")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default: the method's)")
    parser.add_argument("--seqlen", type=int, default=None, help="calibration sequence length (default: the method's)")
    parser.add_argument("--workdir", default="~/.cache/come/bench-scale", help="where the synthetic checkpoints go")
    parser.add_argument("--results", default=str(HERE / "results" / "search_scale"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from the finished cells")
    parser.add_argument("--real-plan", default=str(HERE / "results" / "smollm2_methods" / "cells" / "come-search-r0.3.json"),
                        help="a method-table cell (or come_plan.json) of come-search on a real model: where its "
                             "candidates sat sets the extrapolation's layer passes per step")
    parser.add_argument("--gpu-tflops", type=float, default=20.0,
                        help="assumed sustained TFLOP/s of one GPU (float32 passes and float64 solves alike) for the "
                             "extrapolation's GPU column; an assumption, not a measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps or None, args.ratio, args.nsamples, args.seqlen)))
        return

    import scale

    shapes = [parse_shape(t) for t in args.shapes.split(",") if t]
    cells_dir = Path(args.results + "_cells")
    cells_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir).expanduser()
    suffix = f"-steps{args.steps}" if args.steps else f"-r{args.ratio:g}"
    for s in shapes:
        cell = cells_dir / f"{shape_name(s)}{suffix}.json"
        if cell.is_file() or args.report_only:
            continue
        folder = work / f"llama-synthetic-{shape_name(s)}"
        scale.write_checkpoint(folder, Namespace(**s, dtype="float32", seed=0))
        cmd = [sys.executable, __file__, "--worker", str(folder), "--steps", str(args.steps), "--ratio", str(args.ratio)]
        for flag in ("nsamples", "seqlen"):
            if getattr(args, flag):
                cmd += [f"--{flag}", str(getattr(args, flag))]
        print(f"{shape_name(s)}: measuring", flush=True)
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        data = {"shape": s, "command": _results.command_line(), **json.loads(out.strip().splitlines()[-1])}
        tmp = cell.with_suffix(".partial")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(cell)
    report(args, cells_dir)


def report(args, cells_dir: Path) -> None:
    cells = [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]
    cells = [c for c in cells if c.get("steps")]
    if not cells:
        raise SystemExit("error: no finished cell to report")
    law = fit_law(cells)
    lines = [
        "# come-search: cost per search step against model shape (synthetic Llama weights)",
        "",
        "Commands (each cell records its own; `--report-only` rewrote this table from the cells):",
        *[f"`{cmd}`  " for cmd in dict.fromkeys(c.get("command", "") for c in cells)],
        f"Machine: {_results.machine(cells[0]['threads'])}. CPU seconds inside each search step of `come-search` "
        "(the default options), by kind of work; calibration as listed (the default is 128 x 128 Wikipedia tokens).",
        "",
        "| shape (layers x hidden x d_ffn) | calibration | step | layers | CPU s | candidate losses s | boundary updates s | "
        "refit statistics s (refits) | refit solves s (solves) | other s | law's prediction s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    csv_rows = []
    for c in sorted(cells, key=lambda c: (c["shape"]["intermediate"], c["shape"]["hidden"], c["shape"]["layers"])):
        s = c["shape"]
        for i, st in enumerate(c["steps"]):
            known = sum(st.get(k, 0.0) for k in KINDS)
            row = {"shape": f"{s['layers']}x{s['hidden']}x{s['intermediate']}", "calibration": "x".join(map(str, c["calibration"])),
                   "step": i, "layers": st["layers_before"], "cpu_s": round(st["cpu_seconds"], 1),
                   "losses_s": round(st.get("losses", 0.0), 1), "boundaries_s": round(st.get("boundaries", 0.0), 1),
                   "refit_stats_s": round(st.get("refit_stats", 0.0), 1), "refits": st.get("refit_stats_calls", 0),
                   "solves_s": round(st.get("refit_solves", 0.0), 1), "solves": st.get("solves", 0),
                   "other_s": round(st["cpu_seconds"] - known, 1), "layer_passes": round(st["layer_passes"], 2),
                   "predicted_s": round(predict(law, step_flops(s, st, c)), 1)}
            csv_rows.append(row)
            lines.append(f"| {row['shape']} | {row['calibration']} | {i} | {row['layers']} | {row['cpu_s']} | {row['losses_s']} | "
                         f"{row['boundaries_s']} | {row['refit_stats_s']} ({row['refits']}) | {row['solves_s']} ({row['solves']}) | "
                         f"{row['other_s']} | {row['predicted_s']} |")
    lines += ["", "Per shape: the child's whole CPU time, what it spent before the first step (model load and the "
              "calibration pass), and its peak RSS.", "",
              "| shape | parameters (M) | steps timed | child CPU s | before the first step CPU s | peak RSS GB |",
              "|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["shape"]["intermediate"], c["shape"]["hidden"], c["shape"]["layers"])):
        s = c["shape"]
        kv = s["hidden"] // s["heads"] * s["kv_heads"]
        params = s["layers"] * (3 * s["hidden"] * s["intermediate"] + 2 * s["hidden"] ** 2 + 2 * s["hidden"] * kv) \
            + 2 * c["vocab"] * s["hidden"]
        before = c["cpu_seconds"] - sum(st["cpu_seconds"] for st in c["steps"])
        lines.append(f"| {s['layers']}x{s['hidden']}x{s['intermediate']} | {params / 1e6:.0f} | {len(c['steps'])} | "
                     f"{c['cpu_seconds']:.0f} | {before:.0f} | {c['peak_rss_gb']:.2f} |")
    steps = [(c, st) for c in cells for st in c["steps"]]
    per_layer = sum((st.get("losses_passes", 0.0) + st.get("boundaries_passes", 0.0)) / st["layers_before"]
                    for c, st in steps) / len(steps)
    counted = ("losses_calls", "refit_stats_calls", "refit_stats_passes", "solves")
    if all("losses_rows" in st for _, st in steps):  # cells that counted the LM head's sequences per loss
        counted += ("losses_rows",)
    counts = {k: sum(st.get(k, 0) for _, st in steps) / len(steps) for k in counted}
    real = json.loads(Path(args.real_plan).read_text())
    real_steps = real.get("plan_steps") or real.get("steps")
    # The default's screen (3 finalists of 4 sequences, 16 of 128 scored), whatever the plan was made with.
    real_per_layer = real_passes_per_layer(real_steps, 16 / 128, screen=(3, 4 / 128))
    lines += [
        "",
        "Columns: CPU s is the whole step. Candidate losses: the candidates run from their first changed layer to the "
        "LM head on the scored sequences; boundary updates: the chosen change's layers rerun on every calibration "
        "sequence; refit statistics: each candidate's refitted layer run once plus Z^T Z and Z^T Y; refit solves: the "
        "damping walk's Cholesky solves and the final one; other: window distances, skip errors, sensitivities, merges. "
        "Boundaries are updated lazily, so a step pays for the previous step's update (step 0 for none). Step 0 "
        "reuses no candidate; later steps reuse those built before the change (`_Memo`).",
        "",
        "**Cost law**, fitted by least squares through the origin on every measured step:",
        "",
        "    step CPU-s = a x (layer and LM-head FLOPs of losses and updates + refit layer passes)",
        "               + b x refits x tokens x (d_ffn^2 + 2 d_ffn d_hidden)     (the refit statistics)",
        "               + c x solves x (d_ffn^3 / 3 + 4 d_ffn^2 d_hidden)       (Cholesky and its solves)",
        "",
        f"- a = {law['passes'] * 1e9:.3g} s per GFLOP ({1e-9 / max(law['passes'], 1e-30):.1f} GFLOP/s float32 layer passes);",
        f"- b = {law['gram'] * 1e9:.3g} s per GFLOP ({1e-9 / max(law['gram'], 1e-30):.1f} GFLOP/s for the statistics);",
        f"- c = {law['solve'] * 1e9:.3g} s per GFLOP ({1e-9 / max(law['solve'], 1e-30):.1f} GFLOP/s float64 solves);",
        f"- counts per step, averaged over the measured steps: {per_layer:.2f} whole-set layer passes per model layer "
        f"(losses and updates), {counts['losses_calls']:.1f} candidate losses, {counts['refit_stats_calls']:.1f} refits, "
        f"{counts['solves']:.1f} solves"
        + (f", the LM head run on {counts['losses_rows']:.0f} sequences." if "losses_rows" in counts else "."),
        "",
        f"- on a real model the candidates sit mid-depth, not at the end as with random weights: in "
        f"`{Path(args.real_plan).name}` ({len(real_steps)} steps of `come-search` on SmolLM2-135M) the candidate losses and "
        f"boundary updates make {real_per_layer:.2f} whole-set layer passes per step and model layer with the default's "
        "finalists screen (every candidate on 4 sequences, the 3 lowest on the other 12 of the 16 scored).",
        "",
        "**Extrapolation (not measured)**: one step by the law, with the real plan's layer passes per layer, the "
        "synthetic runs' candidate, refit and solve counts, the default calibration (16,384 tokens, 16 scored "
        "sequences) and this machine and thread count. The passes grow with layers x width^2, "
        "the statistics with d_ffn^2, the solves with d_ffn^3. The GPU column divides the same FLOPs by an assumed "
        "sustained rate (`--gpu-tflops`), with no launch or transfer overhead: an estimate, not a measurement.",
        "",
        "| model | layers | hidden | d_ffn | passes s | refit statistics s | refit solves s | per step s | per step min | "
        f"one GPU per step s (assumed {args.gpu_tflops:g} TFLOP/s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    extrapolated = []
    for name, layers, hidden, ffn, heads, kv_heads, vocab in TARGETS:
        shape = {"layers": layers, "hidden": hidden, "intermediate": ffn, "heads": heads, "kv_heads": kv_heads}
        cell = {"calibration": [128, 128], "search_samples": 16, "vocab": vocab}
        step = {"losses_passes": real_per_layer * layers, "losses_calls": counts["losses_calls"],
                **({"losses_rows": counts["losses_rows"]} if "losses_rows" in counts else {}),
                "refit_stats_calls": counts["refit_stats_calls"], "refit_stats_passes": counts["refit_stats_passes"],
                "solves": counts["solves"]}
        work = step_flops(shape, step, cell)
        p = law["passes"] * (work["passes"] + work["stats_passes"])
        g, v = law["gram"] * work["gram"], law["solve"] * work["solve"]
        gpu = sum(work.values()) / (args.gpu_tflops * 1e12)
        extrapolated.append({"model": name, "passes_s": p, "refit_stats_s": g, "solves_s": v, "step_s": p + g + v,
                             "gpu_step_s": gpu})
        lines.append(f"| {name} | {layers} | {hidden} | {ffn} | {p:.0f} | {g:.0f} | {v:.0f} | {p + g + v:.0f} | {(p + g + v) / 60:.1f} | "
                     f"{gpu:.2f} |")
    _results.write(args.results, lines, rows=csv_rows,
                   data={"law": law, "per_layer_passes": per_layer, "real_per_layer_passes": real_per_layer,
                         "counts": counts, "extrapolated": extrapolated})


if __name__ == "__main__":
    main()
