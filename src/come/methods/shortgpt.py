"""ShortGPT baseline: remove the layers with the lowest block influence, one shot."""

from __future__ import annotations


def run(ctx, target_layers: int) -> None:
    bi = ctx.cache.block_influence()
    n_remove = ctx.num_layers - target_layers
    removed = sorted(sorted(range(len(bi)), key=lambda k: (bi[k].item(), k))[:n_remove])
    ctx.steps.append({"step": 0, "bi": [round(v, 6) for v in bi.tolist()], "removed": removed})
    ctx.remove_layers(removed)
