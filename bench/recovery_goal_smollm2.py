"""Does distillation recover? The compressed and the distilled model side by side against the dense SmolLM2-135M:
held-out KL to the dense model (Wikipedia eval split), perplexity, 7 zero-shot tasks with paired differences, and the
skill kept above chance on the tasks where the dense model is above chance.

    python bench/recovery_goal_smollm2.py runs/c03 runs/c03-distilled --limit 300 --results bench/results/recovery_goal_smollm2

The dense model's task scores come from a finished `come bench` cell (--dense-cell, same --limit); so may the
compressed model's (--compressed-cell), used only when its recomputed perplexity equals the cell's (the same model).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from come.evaluation.evaluate import CHANCE, skill_above_chance  # one definition of chance and of the counted tasks


def _eval(model: Path, tasks: bool, args, ppl: bool = True) -> dict:
    from come.evaluation.evaluate import evaluate
    from come.evaluation.tasks import PAPER_TASKS

    return evaluate(str(model), ppl_sources=["wikipedia", "lambada"] if ppl else [], tasks=list(PAPER_TASKS) if tasks else [],
                    limit=args.limit, max_tokens=args.ppl_tokens, seed=0, progress=not args.quiet, reference="plan" if ppl else None,
                    reference_scores=False)  # the dense scores come from --dense-cell


def main() -> None:
    from come.cli.bench import paired_difference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compressed", type=Path)
    p.add_argument("distilled", type=Path)
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--ppl-tokens", type=int, default=32768)
    p.add_argument("--dense-cell", type=Path, default=Path("bench/results/smollm2_methods/cells/dense.json"))
    p.add_argument("--compressed-cell", type=Path, default=None)
    p.add_argument("--results", type=Path, default=Path("bench/results/recovery_goal_smollm2"))
    p.add_argument("--only", choices=["compressed", "distilled"], help="compute (and cache) this model's evaluation only, then stop: "
                   "run both at once in two processes")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    cache = args.results.parent / (args.results.name + "_evals")
    cache.mkdir(parents=True, exist_ok=True)

    def cached(name: str, fn):
        path = cache / f"{name}.json"
        if not path.is_file():
            path.write_text(json.dumps(fn(), indent=1))
        return json.loads(path.read_text())

    dense = json.loads(args.dense_cell.read_text())["evaluation"]
    if args.only != "distilled":
        comp = cached("compressed", lambda: _eval(args.compressed, False, args))
        if args.compressed_cell is None:
            comp = {**comp, "zero_shot": cached("compressed-tasks", lambda: _eval(args.compressed, True, args, ppl=False))["zero_shot"]}
    if args.only == "compressed":
        return
    dist = cached("distilled", lambda: _eval(args.distilled, True, args))
    if args.only == "distilled":
        return
    if args.compressed_cell is not None:
        cell = json.loads(args.compressed_cell.read_text())["evaluation"]
        ours, theirs = comp["perplexity"]["wikipedia"]["ppl"], cell["perplexity"]["wikipedia"]["ppl"]
        if not math.isclose(ours, theirs, rel_tol=1e-4):
            raise SystemExit(f"error: {args.compressed} is not the cell's model (wikipedia perplexity {ours:.4f} vs {theirs:.4f})")
        comp["zero_shot"] = cell["zero_shot"]
    record = json.loads((args.distilled / "come_plan.json").read_text())["distillation"]

    def skill(ev: dict, tasks) -> float:
        return sum(ev["zero_shot"]["tasks"][t][ev["zero_shot"]["tasks"][t]["average_metric"]] - CHANCE[t] for t in tasks)

    tasks = list(dense["zero_shot"]["tasks"])
    dense_scores = {t: (r[r["average_metric"]], r.get(f"{r['average_metric']}_stderr")) for t, r in dense["zero_shot"]["tasks"].items()}
    above = skill_above_chance({t: v for t, (v, _) in dense_scores.items()}, dense_scores)["counted"]
    per_doc = lambda ev: {t: ev["zero_shot"]["tasks"][t]["per_doc"] for t in tasks}
    diff = paired_difference(per_doc(dist), per_doc(comp))
    s1 = record.get("stage1") or {}
    s2 = record.get("stage2") or {}
    lines = [
        "# Recovery on SmolLM2-135M: compressed vs distilled", "",
        f"Command: `python bench/recovery_goal_smollm2.py {args.compressed} {args.distilled} --limit {args.limit}"
        + (f" --compressed-cell {args.compressed_cell}" if args.compressed_cell else "") + f" --results {args.results}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}.  ",
        f"Distillation: {record['seconds']:.0f} s wall; options {json.dumps({k: v for k, v in record['options'].items() if k in ('layers', 'train', 'lora', 'global_steps', 'time_budget', 'global_lr', 'hidden_weight', 'batch_size', 'seqlen', 'loss', 'lr')})}; "
        f"stage-1 tokens per layer {s1.get('tokens_per_layer')}, stage-2 tokens {s2.get('tokens')}; kept: {record['selection']['chosen']} "
        f"(held-out check: KL {record['selection']['kl_before']:.4f} -> {record['selection']['kl_after']:.4f} on "
        f"{record['selection']['heldout']['tokens']} calib-split tokens).  ",
        f"KL: mean per-token KL(dense || model), nats, on the first {args.ppl_tokens} tokens of each held-out eval split (the "
        f"perplexity windows). Tasks: {args.limit} documents each; ± is lm-eval's stderr; the paired difference uses per-document scores.", "",
        "| model | wiki KL | lambada KL | wiki top-1 | wiki ppl | lambada ppl | avg acc ± stderr | skill above chance (4 tasks) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ev in (("dense", dense), ("compressed", comp), ("distilled", dist)):
        fid = ev.get("fidelity") or {}

        def kl(source, fid=fid, name=name):
            return f"{fid[source]['kl']:.4f}" if source in fid else ("0" if name == "dense" else "-")

        top1 = f"{fid['wikipedia']['top1']:.3f}" if "wikipedia" in fid else ("1" if name == "dense" else "-")
        zs = ev["zero_shot"]
        lines.append(f"| {name} | {kl('wikipedia')} | {kl('lambada')} | {top1} | {ev['perplexity']['wikipedia']['ppl']:.2f} | "
                     f"{ev['perplexity']['lambada']['ppl']:.2f} | {zs['average']:.4f} ± {zs['average_stderr']:.4f} | "
                     f"{skill(ev, above):.3f} ({skill(ev, above) / skill(dense, above):.0%} of dense) |")
    drop = 1 - dist["fidelity"]["wikipedia"]["kl"] / comp["fidelity"]["wikipedia"]["kl"]
    lines += ["", f"Wikipedia KL {100 * drop:.1f}% lower after distillation. Paired accuracy difference, distilled minus compressed: "
              f"{diff[0]:+.4f} ± {diff[1]:.4f}.", "",
              "Skill above chance: the sum over " + ", ".join(f"{t} (chance {CHANCE[t]})" for t in above)
              + " of accuracy minus chance; the other tasks (" + ", ".join(f"{t} (chance {CHANCE[t]})" for t in tasks if t not in above)
              + ") have the dense model within two standard errors of chance or below it.", "",
              "| task | chance | dense | compressed | distilled | distilled - compressed (paired) |", "|---|---|---|---|---|---|"]
    for t in tasks:
        m = dense["zero_shot"]["tasks"][t]["average_metric"]
        d = paired_difference({t: per_doc(dist)[t]}, {t: per_doc(comp)[t]})
        lines.append(f"| {t} ({m}) | {CHANCE[t]} | {dense['zero_shot']['tasks'][t][m]:.3f} | {comp['zero_shot']['tasks'][t][m]:.3f} | "
                     f"{dist['zero_shot']['tasks'][t][m]:.3f} | {d[0]:+.3f} ± {d[1]:.3f} |")
    args.results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
