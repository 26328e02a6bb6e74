"""Shortened LLaMA (Kim et al. 2024) block pruning: `magnitude+` and `taylor+`.

Importance of a decoder block, summed over its weight matrices W (the linear
maps: every parameter with two or more dimensions; norm gains and biases are
left out, as in the paper's per-weight criteria):

- magnitude: sum |W| (the L1 norm of the weights);
- taylor:    sum |W * dL/dW|, L the mean next-token cross-entropy of the whole
  calibration set through the full model (`model(input_ids, labels)`), from
  one backward pass accumulated batch by batch.

"+" (the paper's heuristic): the first 4 and the last 2 blocks are never
removed. When the model has too few layers for that (fewer than
4 + 2 + n_removed eligible), the protection shrinks one block at a time until
enough blocks are eligible, always from the side that protects more, ties from
the end: (4, 2) -> (3, 2) -> (2, 2) -> (2, 1) -> (1, 1) -> (1, 0) -> (0, 0).
The n least important eligible blocks are then removed in one shot (ties: the
lowest index).
"""

from __future__ import annotations

import torch

PROTECT_FIRST, PROTECT_LAST = 4, 2


def protected_counts(num_layers: int, n_remove: int) -> tuple[int, int]:
    """(first, last) blocks kept regardless, shrunk until n_remove blocks are eligible."""
    first, last = PROTECT_FIRST, PROTECT_LAST
    while num_layers - first - last < n_remove:
        if first > last:
            first -= 1
        else:
            last -= 1
    return first, last


def _weight_matrices(layer) -> list[torch.nn.Parameter]:
    return [p for p in layer.parameters() if p.dim() >= 2]


@torch.no_grad()
def magnitude_importance(ctx) -> list[float]:
    return [
        sum(p.detach().double().abs().sum().item() for p in _weight_matrices(layer))
        for layer in ctx.layers
    ]


def taylor_importance(ctx) -> list[float]:
    """sum |W * dL/dW| per block; gradients are enabled only for the blocks' weight matrices, then removed."""
    model, tokens = ctx.model, ctx.tokens
    per_layer = [_weight_matrices(layer) for layer in ctx.adapter.layers(model)]
    wanted = {id(p) for params in per_layer for p in params}
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    was_training = model.training
    device = next(model.parameters()).device
    n, batch = tokens.shape[0], max(1, int(ctx.options.batch_size))
    try:
        model.eval()
        for p in params:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        with torch.enable_grad():
            for b0 in range(0, n, batch):
                ids = tokens[b0 : b0 + batch].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                # Same sequence length in every batch: weighting by rows gives the whole-set mean loss.
                (loss * (ids.shape[0] / n)).backward()
        with torch.no_grad():
            scores = [
                sum(
                    (p.detach().double() * p.grad.double()).abs().sum().item()
                    for p in layer_params
                    if p.grad is not None
                )
                for layer_params in per_layer
            ]
    finally:
        for p, flag in zip(params, saved):
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    return scores


def _prune(ctx, target_layers: int, criterion: str, importance: list[float]) -> None:
    num = ctx.num_layers
    n_remove = num - target_layers
    first, last = protected_counts(num, n_remove)
    eligible = list(range(first, num - last))
    removed = sorted(sorted(eligible, key=lambda k: (importance[k], k))[:n_remove])
    ctx.steps.append(
        {
            "step": 0,
            "criterion": criterion,
            "importance": importance,
            "protected_first": first,
            "protected_last": last,
            "eligible": eligible,
            "removed": removed,
        }
    )
    ctx.remove_layers(removed)


def run_magnitude(ctx, target_layers: int) -> None:
    _prune(ctx, target_layers, "magnitude", magnitude_importance(ctx))


def run_taylor(ctx, target_layers: int) -> None:
    _prune(ctx, target_layers, "taylor", taylor_importance(ctx))
