"""Writing the weights and config of a compressed in-memory model, in the dtype chosen to save it.

The output folder as a whole (this, or the layer-wise stream, plus tokenizer, plan and card) is put
together by `publish`; this module knows nothing of the card.
"""

from __future__ import annotations

import json
from pathlib import Path

# The plan's names lived here before `plan.py`; kept importable from their old home.
from .plan import PLAN_FILE, build_plan, finalize_model, versions

__all__ = ["PLAN_FILE", "build_plan", "finalize_model", "resolve_save_dtype", "versions", "write_model"]


def write_model(model, folder: Path, save_dtype=None) -> None:
    """`model`'s weights, config and generation config into `folder`; floating weights in `save_dtype`
    (default: as held)."""
    if save_dtype is None:
        model.save_pretrained(folder)
        return
    # Cast copies of the tensors; the model in memory keeps its compute dtype.
    state = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    # save_pretrained writes the dtype of the parameters in memory; the files hold save_dtype.
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(save_dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_save_dtype(requested: str | None, source: dict, compute: str) -> tuple[str, str]:
    """(dtype to save in, why): the request, else the source checkpoint's dtype, else the compute dtype."""
    if requested is not None:
        return requested, "--save-dtype"
    if source.get("dtype"):
        kind = source.get("kind")
        return source["dtype"], ("the source is a quantised GGUF" if kind in ("gguf", "default", "builtin")
                                 else "the source checkpoint's dtype")
    return compute, "the compute dtype (the source's is unknown)"
