"""Per-task paired differences of two finished `come bench` cells, and the average without each task.

    python bench/paired_tasks.py bench/results/smollm2_methods come-search sleb-layers+refit --ratio 0.2

Both cells must have scored the same documents (same --limit): the difference of each document's score
cancels which questions were drawn, so its standard error is the one that tells two models apart.
A task whose dense score is below its majority-class rate (BoolQ on SmolLM2-135M: 0.417 against 0.627)
measures a yes/no bias more than ability; this shows how much of a gap such a task carries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from come.cli.bench import cell_name, paired_difference


def per_doc(folder: Path, label: str, ratio: float) -> dict[str, list[float]]:
    data = json.loads((folder / "cells" / f"{cell_name(label, ratio)}.json").read_text())
    return {task: t["per_doc"] for task, t in data["evaluation"]["zero_shot"]["tasks"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--ratio", type=float, required=True)
    args = parser.parse_args()
    a, b = per_doc(args.folder, args.a, args.ratio), per_doc(args.folder, args.b, args.ratio)
    if paired_difference(a, b) is None:
        raise SystemExit(f"{args.a} and {args.b} did not score the same tasks on the same documents (same --limit)")
    print(f"{args.a} minus {args.b} at {args.ratio} (paired, mean ± stderr):")
    print("| task | difference | average of the other tasks |\n|---|---|---|")
    for task in a:
        alone = paired_difference({task: a[task]}, {task: b[task]})
        rest = paired_difference({t: v for t, v in a.items() if t != task}, {t: v for t, v in b.items() if t != task})
        print(f"| {task} ({len(a[task])} docs) | {alone[0]:+.4f} ± {alone[1]:.4f} | {rest[0]:+.4f} ± {rest[1]:.4f} |")
    total = paired_difference(a, b)
    print(f"| average | {total[0]:+.4f} ± {total[1]:.4f} | |")


if __name__ == "__main__":
    main()
