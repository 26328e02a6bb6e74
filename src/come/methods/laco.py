"""LaCo (Yang et al. 2024): layer collapse by Reserving-Differences-while-Seeking-Common (RDSC) merges.

RDSC merge of layers l..l+m-1 into one: for every floating-point tensor of the
layer (linear weights, biases, RMSNorm gains, per-head norms alike, as in the
paper) theta* = theta_l + sum_{k=1}^{m-1} (theta_{l+k} - theta_l), computed in
float64 on copies (the sources are never written) and cast back; the merged
layer is a deep copy of layer l with that state dict loaded.

Similarity of a tentative merge: mean over the calibration tokens
(`search_samples` sequences; all by default) of the cosine between the last
decoder layer's output (before the final norm) of the merged model and that of
the ORIGINAL model, taken before any merge.

One pass at threshold T, with C = `merge_size`, I = `laco_interval` and lowest
start lo = min(`laco_min_layer`, target - 1) (layers below lo are never merged;
the clamp keeps the target reachable):
  l starts at L - C. Repeat while the model has more layers than the target:
  size = min(C, layers - target + 1) (shrinks only so that the last merge lands
  exactly on the target), l = min(l, layers - size); stop if l < lo.
  Tentatively merge l..l+size-1; if similarity > T accept it and set l -= I
  (with the clamp above this is the paper's l = min(l - I, new L - C)),
  otherwise l -= 1.

Threshold scan: one pass per T in `laco_thresholds`, sorted from high to low,
each from the uncompressed model; the first T whose pass reaches the target is
used. If none does, the lowest T's pass is kept and further passes at the
lowest T run on its result, each restarting from the top, until the target is
reached; a pass that accepts nothing accepts instead its most similar
candidate (ties: the higher window), so the method always lands exactly on
the target. Passes share the similarities of identical prefixes, so the scan
costs little more than its longest pass. Every evaluation (threshold, window,
similarity, accepted or not) and the scan summary are in the plan's steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MergeError


@torch.no_grad()
def rdsc_state_dict(layers: list[nn.Module]) -> dict[str, torch.Tensor]:
    """theta_l + sum_k (theta_{l+k} - theta_l) for every floating tensor; fresh tensors, sources untouched."""
    sources = [layer.state_dict() for layer in layers]
    base = sources[0]
    out = {}
    for key, theta in base.items():
        if not theta.is_floating_point():
            out[key] = theta.clone()
            continue
        first = theta.detach().to(torch.float64)
        acc = first.clone()  # .to() returns the same tensor when it is already float64
        for sd in sources[1:]:
            acc += sd[key].detach().to(torch.float64) - first
        out[key] = acc.to(theta.dtype)
    return out


def rdsc_merge(layers: list[nn.Module]) -> nn.Module:
    """A new layer: a deep copy of layers[0] carrying the RDSC merge of `layers`."""
    merged = copy.deepcopy(layers[0])
    merged.load_state_dict(rdsc_state_dict(layers), strict=True)
    return merged


def representation_similarity(ctx, start: int, stack, reference: torch.Tensor) -> float:
    """Mean token cosine between the last boundary of h_start fed through `stack` and `reference`."""
    total, count = 0.0, 0
    for rows, x in ctx.cache.run_through(start, stack, ctx.options.search_samples):
        ref = reference[rows].to(x.device)
        cos = torch.nn.functional.cosine_similarity(x.float(), ref.float(), dim=-1)
        total += cos.double().sum().item()
        count += cos.numel()
    return total / count


class _Pass:
    """One LaCo pass simulated on top of the current model (which it does not modify)."""

    def __init__(self, ctx, threshold: float, target: int, reference: torch.Tensor, memo: dict):
        self.threshold = threshold
        layers = ctx.cache.current_stack(0)
        # (layer, kwargs, original layers covered) of the simulated model.
        self.stack = [(ctx.layers[k], kw, list(rec["covers"])) for (k, kw), rec in zip(layers, ctx.records)]
        self.merges: list[dict] = []  # accepted: window, merged layer, similarity
        self.events: list[dict] = []
        size_max, interval = int(ctx.options.merge_size), int(ctx.options.laco_interval)
        lowest = max(0, min(int(ctx.options.laco_min_layer), target - 1))
        l = None
        while len(self.stack) > target:
            size = min(size_max, len(self.stack) - target + 1)
            l = len(self.stack) - size if l is None else min(l, len(self.stack) - size)
            if l < lowest:
                break
            # Layers below l are still the current model's, so boundary h_l of the cache is the input.
            key = (tuple((m["start"], m["size"]) for m in self.merges), l, size)
            merged = None
            if key not in memo:
                merged = rdsc_merge([self.stack[k][0] for k in range(l, l + size)])
                trial = [(merged, self.stack[l][1])] + [(m, kw) for m, kw, _ in self.stack[l + size :]]
                memo[key] = representation_similarity(ctx, l, trial, reference)
            sim = memo[key]
            accepted = sim > threshold
            self.events.append(
                {
                    "threshold": threshold,
                    "layers_before": len(self.stack),
                    "window": [l, l + size - 1],
                    "covers": [c for _, _, cov in self.stack[l : l + size] for c in cov],
                    "similarity": sim,
                    "accepted": accepted,
                }
            )
            if accepted:
                self._accept(l, size, sim, merged)
                l -= interval
            else:
                l -= 1

    def _accept(self, l: int, size: int, sim: float, merged: nn.Module | None = None, forced: bool = False) -> None:
        window = self.stack[l : l + size]
        if merged is None:
            merged = rdsc_merge([layer for layer, _, _ in window])
        self.merges.append(
            {
                "start": l,
                "size": size,
                "layer": merged,
                "record": {
                    "rule": "rdsc",
                    "threshold": self.threshold,
                    "similarity": sim,
                    "forced": forced,
                    "source_covers": [cov for _, _, cov in window],
                },
            }
        )
        self.stack[l : l + size] = [(merged, window[0][1], [c for _, _, cov in window for c in cov])]

    def force_best(self) -> None:
        """No merge was accepted: take the most similar candidate (ties: the higher window)."""
        best = max(self.events, key=lambda e: (e["similarity"], e["window"][0]))
        best["forced"] = True
        start, end = best["window"]
        self._accept(start, end - start + 1, best["similarity"], forced=True)


def _apply(ctx, run: _Pass, pass_index: int) -> None:
    for event in run.events:
        ctx.steps.append({"step": len(ctx.steps), "pass": pass_index, **event})
    for merge in run.merges:
        ctx.merge_window(merge["start"], merge["layer"], merge["size"], merge["record"])


def run(ctx, target_layers: int) -> None:
    thresholds = sorted({float(t) for t in ctx.options.laco_thresholds}, reverse=True)
    if not thresholds:
        raise MergeError("laco needs at least one similarity threshold")
    cache = ctx.cache
    cache.ensure_fresh()
    reference = cache.boundary(cache.num_layers)[: ctx.options.search_samples].clone()  # the original model's last boundary

    memo: dict = {}
    scan, chosen = [], None
    for threshold in tqdm(thresholds, desc="threshold scan", unit="T", disable=not ctx.options.progress):
        chosen = _Pass(ctx, threshold, target_layers, reference, memo)
        scan.append({"threshold": threshold, "layers_reached": len(chosen.stack), "merges": len(chosen.merges)})
        if len(chosen.stack) == target_layers:
            break
    assert chosen is not None
    reached = len(chosen.stack) == target_layers
    if not chosen.merges:
        chosen.force_best()
    ctx.steps.append(
        {
            "step": len(ctx.steps),
            "scan": scan,
            "threshold": chosen.threshold,
            "reached_target": reached,
        }
    )
    _apply(ctx, chosen, 0)
    passes = 1
    while ctx.num_layers > target_layers:  # short even at the lowest threshold: keep collapsing at it
        more = _Pass(ctx, thresholds[-1], target_layers, reference, {})
        if not more.merges:
            more.force_best()
        _apply(ctx, more, passes)
        passes += 1
