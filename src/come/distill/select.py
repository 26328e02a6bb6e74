"""The held-out check that decides what distillation returns: never a model worse than its input.

Candidates are the input model, the stage-1 result and the stage-2 states at every check; each is
scored by `fidelity` (mean per-token KL to the teacher) on held-out windows that no training step
sees. The scores live in OUT.partial/selection.json, so a resumed run neither repeats nor changes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..evaluation.fidelity import fidelity
from ..outputs import write_json_atomic
from .common import _log

SELECTION_FILE = "selection.json"


def read_selection(work: Path) -> dict:
    path = Path(work) / SELECTION_FILE
    return json.loads(path.read_text()) if path.is_file() else {"candidates": {}}


def write_selection(work: Path, selection: dict) -> None:
    write_json_atomic(Path(work) / SELECTION_FILE, selection)


def heldout_windows(job) -> torch.Tensor:
    return torch.load(job.dir / "heldout.pt")


def check(job, teacher, student, point: str, step: int = 0, log: bool = True) -> dict:
    """Fidelity of `student` on the held-out windows, logged to metrics.jsonl as a `stage: eval` record."""
    o = job.options
    result = fidelity(teacher, student, heldout_windows(job), batch_size=o.batch_size, progress=o.progress,
                      desc=f"held-out check ({point})")
    result = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}
    if log:
        _log(job.dir, {"stage": "eval", "layer": None, "point": point, "step": step, **result})
    return {"step": step, **result}
