"""Reverse-order baseline: delete the deepest layers, keeping the final one."""

from __future__ import annotations


def run(ctx, target_layers: int) -> None:
    # With L layers and n to remove, layers L-1-n .. L-2 go; layer L-1 stays.
    num = ctx.num_layers
    n_remove = num - target_layers
    removed = list(range(num - 1 - n_remove, num - 1))
    ctx.steps.append(
        {
            "step": 0,
            "layers_before": num,
            "removed": removed,
            "covers": [c for k in removed for c in ctx.records[k]["covers"]],
        }
    )
    ctx.remove_layers(removed)
