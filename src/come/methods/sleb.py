"""SLEB (Song et al. 2024): remove one layer at a time, the one whose removal hurts the calibration loss least.

Every round scores each current layer k by the mean next-token cross-entropy
of the calibration set (`search_samples` sequences; all by default) with k
deleted, deletes the lowest (ties: the lowest index) and rescores, until the
target is reached. The losses of every round are in the plan's steps.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def removal_losses(ctx, layers=None, samples: int | None = None) -> list[float]:
    """Calibration loss of the current model with each layer k of `layers` (default: every layer) deleted,
    on the first `samples` sequences (default: `search_samples`)."""
    cache = ctx.cache
    samples = ctx.options.search_samples if samples is None else samples
    layers = range(ctx.num_layers) if layers is None else layers
    # Layers below k are unchanged, so feeding boundary h_k through layers k+1.. is the model without k.
    return [cache.loss_through(k, cache.current_stack(k + 1), samples=samples) for k in layers]


def run(ctx, target_layers: int) -> None:
    total = ctx.num_layers - target_layers
    with tqdm(total=total, desc="removing layers", unit="layer", disable=not ctx.options.progress) as bar:
        while ctx.num_layers > target_layers:
            losses = removal_losses(ctx)
            k = min(range(len(losses)), key=lambda i: (losses[i], i))
            ctx.steps.append(
                {
                    "step": len(ctx.steps),
                    "layers_before": ctx.num_layers,
                    "losses": losses,
                    "removed": k,
                    "covers": list(ctx.records[k]["covers"]),
                }
            )
            ctx.remove_layers([k])
            bar.update(1)
