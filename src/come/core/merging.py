"""Concatenation-based merging of decoder layers (CoMe, step 2).

A merged layer keeps a subset of KV groups (each with its own query heads)
and FFN neurons from every source layer and concatenates them. With every
source's RMSNorm gain folded into the maps it feeds, the merged layer computes
exactly the parallel sum x + sum_k Attn_k(x) of the kept channels, then the
same for the FFN: the only approximation is which channels are kept and that
the sources now run side by side instead of one after another.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MergeError
from .adapters import Adapter

NORM_MODES = ("fold", "mean")


def largest_remainder(ratios: list[float], total: int) -> list[int]:
    """Integers proportional to `ratios` that sum exactly to `total`."""
    if total < 0:
        raise ValueError("total must be >= 0")
    weights = [max(0.0, float(r)) for r in ratios]
    norm = sum(weights)
    if norm <= 0:
        weights, norm = [1.0] * len(ratios), float(len(ratios))
    quotas = [w / norm * total for w in weights]
    counts = [int(q) for q in quotas]
    # Ties go to the earlier layer so the result is deterministic.
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def top_channels(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores, in ascending index order (stable for ties)."""
    order = torch.argsort(scores, descending=True, stable=True)[:n]
    return torch.sort(order).values


@dataclass
class Selection:
    """Channels kept from one source layer."""

    kv_groups: torch.Tensor  # indices of KV groups
    neurons: torch.Tensor  # indices of FFN neurons


def _rows_of_groups(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of the heads belonging to `groups` (HF pairing: head h is in group h // heads_per_group)."""
    heads = (groups[:, None] * heads_per_group + torch.arange(heads_per_group)[None, :]).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def merged_config(config, num_kv_groups: int, intermediate_size: int):
    """A copy of `config` describing a layer with the given channel counts."""
    new = copy.deepcopy(config)
    reps = Adapter.queries_per_group(config)
    new.head_dim = Adapter.head_dim(config)
    new.num_key_value_heads = num_kv_groups
    new.num_attention_heads = num_kv_groups * reps
    new.intermediate_size = intermediate_size
    return new


@torch.no_grad()
def merge_layers(
    adapter: Adapter,
    config,
    layers: list[nn.Module],
    selections: list[Selection],
    ratios: list[float],
    norm: str = "fold",
    layer_idx: int = 0,
    output_scales: list[dict[str, float]] | None = None,
) -> nn.Module:
    """Build one decoder layer from the kept channels of `layers`, concatenated in order.

    The new layer's shapes follow the selection sizes, so keeping
    `num_key_value_heads` groups and `intermediate_size` neurons in total gives
    the original shapes.
    """
    if norm not in NORM_MODES:
        raise MergeError(f"unknown norm mode {norm!r}; choose one of {', '.join(NORM_MODES)}")
    if not (len(layers) == len(selections) == len(ratios)) or not layers:
        raise MergeError("layers, selections and ratios must be non-empty and of equal length")

    reps, head_dim = adapter.queries_per_group(config), adapter.head_dim(config)
    n_groups = sum(len(s.kv_groups) for s in selections)
    n_neurons = sum(len(s.neurons) for s in selections)
    new_cfg = merged_config(config, n_groups, n_neurons)
    merged = type(layers[0])(new_cfg, layer_idx)
    ref = layers[0].state_dict()
    device, dtype = next(iter(ref.values())).device, next(iter(ref.values())).dtype
    merged.to(device=device, dtype=dtype)

    sources = [dict(layer.state_dict()) for layer in layers]
    offset = adapter.norm_offset
    if norm == "fold":
        for sd in sources:
            for norm_name, feeds in adapter.norm_feeds.items():
                gain = offset + sd[f"{norm_name}.weight"].float()
                for feed in feeds:
                    w = sd[f"{feed}.weight"]
                    sd[f"{feed}.weight"] = (w.float() * gain[None, :]).to(w.dtype)
    # Output norms (Gemma): each source's sublayer output was normalised on its own, g_k * a_k / rms(a_k).
    # With `output_scales` (the "scale" rule), g_k and the source's typical 1 / rms(a_k), measured on
    # calibration data, are folded into the rows of the map producing a_k, so the kept channels add up
    # to ~ the sum of normalised outputs; the merged norm starts at gain 1 and `calibrate_output_norms`
    # sets its scale. Without them (the "mean" rule) the merged norms average the sources'.
    for i, sd in enumerate(sources):
        for norm_name, source_map in (adapter.output_norms.items() if output_scales is not None else ()):
            scale = (offset + sd[f"{norm_name}.weight"].double()) * (output_scales[i][norm_name] if output_scales else 1.0)
            for suffix in ("weight", "bias"):
                key = f"{source_map}.{suffix}"
                if key in sd:
                    t = sd[key]
                    sd[key] = (t.double() * (scale[:, None] if t.dim() == 2 else scale)).to(t.dtype)

    weights = torch.tensor(ratios, dtype=torch.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(ratios))

    out: dict[str, torch.Tensor] = {}
    handled: set[str] = set()

    def rows(name: str, index_of):
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}"
            if key in ref:
                out[key] = torch.cat([sd[key][index_of(sel).to(sd[key].device)] for sd, sel in zip(sources, selections)], 0)
                handled.add(key)

    def cols(name: str, index_of):
        key = f"{name}.weight"
        out[key] = torch.cat([sd[key][:, index_of(sel).to(sd[key].device)] for sd, sel in zip(sources, selections)], 1)
        handled.add(key)
        # An output bias is added once per source in the parallel sum.
        if f"{name}.bias" in ref:
            out[f"{name}.bias"] = sum(sd[f"{name}.bias"] for sd in sources)
            handled.add(f"{name}.bias")

    query_idx = lambda sel: _rows_of_groups(sel.kv_groups, reps, head_dim)
    kv_idx = lambda sel: _rows_of_groups(sel.kv_groups, 1, head_dim)
    neuron_idx = lambda sel: sel.neurons
    for name in adapter.query_rows:
        rows(f"{adapter.attn}.{name}", query_idx)
    for name in adapter.kv_rows:
        rows(f"{adapter.attn}.{name}", kv_idx)
    for name in adapter.query_cols:
        cols(f"{adapter.attn}.{name}", query_idx)
    for name in adapter.ffn_rows:
        rows(f"{adapter.mlp}.{name}", neuron_idx)
    for name in adapter.ffn_cols:
        cols(f"{adapter.mlp}.{name}", neuron_idx)

    def average(key: str):
        stacked = torch.stack([sd[key].double() for sd in sources])
        w = weights.to(stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
        out[key] = (stacked * w).sum(0).to(ref[key].dtype)
        handled.add(key)

    for name in adapter.head_norms:
        average(f"{adapter.attn}.{name}.weight")
    for norm_name in adapter.norm_feeds:
        key = f"{norm_name}.weight"
        if norm == "fold":
            out[key] = torch.full_like(ref[key], 1.0 - offset)  # gain 1: the sources' gains are folded
            handled.add(key)
        else:  # the paper's plain average
            stacked = torch.stack([sd[key].float() for sd in sources])
            out[key] = stacked.mean(0).to(ref[key].dtype)
            handled.add(key)
    for norm_name in adapter.output_norms:
        key = f"{norm_name}.weight"
        if output_scales is not None:  # gain 1 until calibrated: the sources' gains are in their maps
            out[key] = torch.full_like(ref[key], 1.0 - offset)
            handled.add(key)
        else:  # no scales: the ratio-weighted average of the norms (the naive rule, for comparison)
            average(key)

    unknown = sorted(set(ref) - handled)
    if unknown:
        raise MergeError(
            f"the {adapter.family} adapter does not describe these layer tensors: {', '.join(unknown)}"
        )
    merged.load_state_dict(out, strict=True)
    return merged


@torch.no_grad()
def calibrate_output_norms(adapter: Adapter, layer: nn.Module, batches, precision=nullcontext) -> dict[str, float]:
    """Set each output norm of a merged layer to the mean RMS of what it normalises, measured on
    calibration inputs, so that it hands the residual stream the sum of the sources' normalised outputs
    at their usual size (instead of rescaling it to RMS 1). `batches()` yields (input, layer kwargs).
    One pass per output norm, in order, since the FFN's input depends on the calibrated attention; each
    pass inside `precision()` (the cache's layer precision), the sums in float32."""
    scales: dict[str, float] = {}
    for norm_name in adapter.output_norms:
        module = layer.get_submodule(norm_name)
        total, count = 0.0, 0

        def hook(mod, args):
            nonlocal total, count
            x = args[0].float()
            total += float(x.pow(2).mean(-1).add(mod.eps).sqrt().sum())
            count += x[..., 0].numel()

        handle = module.register_forward_pre_hook(hook)
        try:
            for x, kwargs in batches():
                with precision():
                    layer(x, **kwargs)
        finally:
            handle.remove()
        scales[norm_name] = total / max(count, 1)
        module.weight.data.fill_(scales[norm_name] - adapter.norm_offset)
    return scales
