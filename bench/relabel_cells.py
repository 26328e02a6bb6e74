"""Relabel finished `come bench` cells whose method's defaults changed after they ran.

`come` re-merges by default since the cells of bench/results/smollm2_methods were started; its
cells there ran with the paper's rule (no re-merging). Rather than recompute them, this gives them
the label and settings that `--methods come-paper:come --set come-paper.allow_remerge=false` would
give them (same for come+refit), so the final `come bench` run skips them and the table says what
they are. Only cells whose plan records the option value claimed are relabelled.

    python bench/relabel_cells.py bench/results/smollm2_methods come=come-paper come+refit=come-paper+refit

`--rename OLD=NEW[:BASE]` moves cells whose options did not change but whose label must: e.g. when a
variant becomes the method's default (`come-search-s128=come-search`), and the cells of the old
default keep their settings under a variant label (`come-search=come-search-512:come-search`).

    python bench/relabel_cells.py bench/results/smollm2_methods --rename come-search=come-search-512:come-search \
        come-search-s128=come-search

`--pin LABEL.OPTION=VALUE` writes into the settings of LABEL's cells an option value they ran with as the
method's default, once that default changed, so that the script names it (--set) and the cells stay valid.
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


def rename(folder: Path, old: str, new: str, base: str) -> list[Path]:
    """Cells of label `old` become cells of label `new` (a variant of `base`), settings otherwise unchanged."""
    cells = sorted((folder / "cells").glob(f"{old}-r*.json"))
    clash = [c for c in cells if c.with_name(c.name.replace(f"{old}-r", f"{new}-r", 1)).exists()]
    if clash:
        raise SystemExit(f"{new} cells exist already: {[c.name for c in clash]}")
    done = []
    for cell in cells:
        data = json.loads(cell.read_text())
        if data["row"].get("method") != old:
            continue
        data["row"]["method"] = new
        if base != new:
            data["settings"]["base_method"] = base
        else:
            data["settings"].pop("base_method", None)
        target = cell.with_name(cell.name.replace(f"{old}-r", f"{new}-r", 1))
        target.write_text(json.dumps(data, indent=1))
        cell.unlink()
        done.append(target)
    return done


def pin(folder: Path, label: str, option: str, value) -> list[Path]:
    done = []
    for cell in sorted((folder / "cells").glob(f"{label}-r*.json")):
        data = json.loads(cell.read_text())
        if data["row"].get("method") != label:
            continue
        options = data["settings"].setdefault("method_options", {})
        if option in options and options[option] != value:
            raise SystemExit(f"{cell.name} ran with {option}={options[option]!r}, not {value!r}")
        options[option] = value
        cell.write_text(json.dumps(data, indent=1))
        done.append(cell)
    return done


if __name__ == "__main__":
    root = Path(sys.argv[1])
    if sys.argv[2:3] == ["--pin"]:
        for item in sys.argv[3:]:
            key, _, raw = item.partition("=")
            label, _, option = key.partition(".")
            for path in pin(root, label, option, json.loads(raw)):
                print(f"{path.name}: {option}={raw}")
        raise SystemExit(0)
    if sys.argv[2:3] == ["--rename"]:
        for pair in sys.argv[3:]:
            old, spec = pair.split("=")
            new, _, base = spec.partition(":")
            for path in rename(root, old, new, base or new):
                print(f"{old} -> {path.name}")
        raise SystemExit(0)
    for pair in sys.argv[2:]:
        old, new = pair.split("=")
        for path in relabel(root, old, new):
            print(f"{old} -> {path.name}")
