"""Turning a compressed in-memory model into a standard checkpoint folder.

The folder is written under a temporary name beside the target and renamed at
the end, so a failed or interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
from pathlib import Path

from . import __version__
from .models import count_parameters
from .outputs import atomic_folder, json_text

PLAN_FILE = "come_plan.json"


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
    from .data import describe_source

    opts = ctx.options
    final_params = count_parameters(ctx.model)
    return {
        "format": "come-plan/1",
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


def write_metadata(folder: Path, tokenizer, plan: dict) -> None:
    """Tokenizer, plan and model card: everything but the weights and config."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / PLAN_FILE).write_text(json_text(plan))
    from .card import write_card

    write_card(folder, plan)


def save_compressed(model, tokenizer, plan: dict, out: Path, overwrite: bool = False, sources: list | None = None,
                    save_dtype=None) -> Path:
    """Write `model` as a checkpoint folder, atomically; floating weights in `save_dtype` (default: as held)."""

    with atomic_folder(out, overwrite, sources) as tmp:
        if save_dtype is None:
            model.save_pretrained(tmp)
        else:  # cast copies of the tensors; the model in memory keeps its compute dtype
            state = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, state_dict=state)
            # save_pretrained writes the dtype of the parameters in memory; the files hold save_dtype.
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"] = str(save_dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_metadata(tmp, tokenizer, plan)
    return Path(out).expanduser().resolve()


def resolve_save_dtype(requested: str | None, source: dict, compute: str) -> tuple[str, str]:
    """(dtype to save in, why): the request, else the source checkpoint's dtype, else the compute dtype."""
    if requested is not None:
        return requested, "--save-dtype"
    if source.get("dtype"):
        kind = source.get("kind")
        return source["dtype"], ("the source is a quantised GGUF" if kind in ("gguf", "default", "builtin")
                                 else "the source checkpoint's dtype")
    return compute, "the compute dtype (the source's is unknown)"
