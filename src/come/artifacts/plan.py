"""The compression plan: its file name, its building from a finished run, and the model finalisation
that makes the config agree with the plan's layer list.

The plan is what every other part reads: the card draws and tabulates it, the exports write it beside
the weights, `come eval` and `come distill` read it back. This module depends on none of them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from pathlib import Path

from .. import __version__
from ..outputs import json_text

PLAN_FILE = "come_plan.json"
PLAN_FORMAT = "come-plan/1"


def versions() -> dict:
    import torch
    import transformers

    return {
        "come": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def finalize_model(ctx) -> None:
    """Make the config and per-layer indices agree with the layer list."""
    config, adapter = ctx.model.config, ctx.adapter
    firsts = [rec["position_of"] for rec in ctx.records]
    original = sum(len(rec["covers"]) for rec in ctx.records)
    for name in adapter.per_layer_lists:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == original:
            setattr(config, name, [values[i] for i in firsts])
    for name in adapter.layer_count_fields:
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, sum(1 for i in firsts if i < value))
    config.num_hidden_layers = len(firsts)
    # The KV cache is indexed by layer_idx, so generation needs them renumbered.
    for idx, layer in enumerate(adapter.layers(ctx.model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = idx


def build_plan(ctx, *, method: str, source: dict, original_layers: int, original_params: int, ratio, seconds: float) -> dict:
    from ..engine.models import count_parameters
    from ..evaluation.data import describe_source

    opts = ctx.options
    final_params = count_parameters(ctx.model)
    return {
        "format": PLAN_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "model": source,
        "family": ctx.adapter.family,
        "original_layers": original_layers,
        "final_layers": ctx.num_layers,
        "original_parameters": original_params,
        "final_parameters": final_params,
        "removed_parameter_fraction": 1 - final_params / original_params,
        "requested_ratio": ratio,
        "options": dataclasses.asdict(opts),
        "calibration": {
            "source": {"name": "tokens", "kind": "pre-tokenized"} if opts.calib == "tokens" else describe_source(opts.calib, "calib"),
            "nsamples": int(ctx.tokens.shape[0]),
            "seqlen": int(ctx.tokens.shape[1]),
            "tokens": int(ctx.tokens.numel()),
            "seed": opts.seed,
        },
        "layers": [{"index": k, **rec} for k, rec in enumerate(ctx.records)],
        "steps": ctx.steps,
        "versions": versions(),
        "seconds": round(seconds, 2),
    }


def write_plan(folder: Path, plan: dict) -> None:
    """The plan as `folder`/PLAN_FILE (strict JSON: non-finite numbers become null)."""
    (Path(folder) / PLAN_FILE).write_text(json_text(plan))
