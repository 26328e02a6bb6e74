"""What every bench script ends with: the exact command, the machine it ran on, and the result files
(Markdown for people, CSV and/or JSON for tools), written together and echoed to stdout.

Bench scripts run as `python bench/NAME.py`, so this module is importable as `_results`.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path


def command_line() -> str:
    """The command that reproduces this run, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = f"bench/{script.name}" if script.parent.name == "bench" else str(script)
    return shlex.join(["python", shown, *sys.argv[1:]])


def machine(threads: int | None = None, **extra: str) -> str:
    """One line: CPU architecture, cores (or threads used), torch version, date, and `extra` facts."""
    import torch

    cores = f"{threads} threads" if threads else f"{os.cpu_count()} CPUs"
    facts = [platform.machine(), cores, f"torch {torch.__version__}", *(f"{k.replace('_', '-')} {v}" for k, v in extra.items())]
    return ", ".join(facts) + f", date {time.strftime('%Y-%m-%d')}"


def write(results: str | Path, lines: list[str], rows: list[dict] | None = None, data: dict | None = None) -> None:
    """Write RESULTS.md (`lines`), RESULTS.csv (`rows`, if given) and RESULTS.json (`data`, if given)."""
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(results.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if data is not None:
        results.with_suffix(".json").write_text(json.dumps(data, indent=1))
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
