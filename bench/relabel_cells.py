"""Relabel finished `come bench` cells whose method's defaults changed after they ran.

`come` re-merges by default since the cells of bench/results/smollm2_methods were started; its
cells there ran with the paper's rule (no re-merging). Rather than recompute them, this gives them
the label and settings that `--methods come-paper:come --set come-paper.allow_remerge=false` would
give them (same for come+refit), so the final `come bench` run skips them and the table says what
they are. Only cells whose plan records the option value claimed are relabelled.

    python bench/relabel_cells.py bench/results/smollm2_methods come=come-paper come+refit=come-paper+refit
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ran_without_remerging(data: dict) -> bool:
    """Every merge of the plan joined two single original layers (windows of 2, none re-merged)."""
    steps = data.get("plan_steps") or []
    return bool(steps) and all(len(step["covers"]) == 2 for step in steps if "covers" in step)


def relabel(folder: Path, old: str, new: str) -> list[Path]:
    done = []
    for cell in sorted((folder / "cells").glob(f"{old}-r*.json")):
        data = json.loads(cell.read_text())
        if data["row"].get("method") != old or not ran_without_remerging(data):
            print(f"{cell.name}: not a no-re-merging run, left as is")
            continue
        settings = data["settings"]
        settings["method_options"] = {**settings.get("method_options", {}), "allow_remerge": False}
        settings["base_method"] = "come"
        data["row"]["method"] = new
        target = cell.with_name(cell.name.replace(f"{old}-r", f"{new}-r", 1))
        target.write_text(json.dumps(data, indent=1))
        cell.unlink()
        done.append(target)
    return done


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for pair in sys.argv[2:]:
        old, new = pair.split("=")
        for path in relabel(root, old, new):
            print(f"{old} -> {path.name}")
