"""drop: delete exactly the original layers the user names.

For a layer choice made elsewhere: a plan replayed without its search (SLEB's
search rescores every layer at every step, its replay is one pass), a published choice
of layers, or an ablation. The number of layers named must be the number the
ratio (or --target-layers) removes. Like ShortGPT, a deleted layer's span goes
to the layer before it (`--refit` refits that layer to the original model).
"""

from __future__ import annotations

from ..errors import MergeError


def run(ctx, target_layers: int) -> None:
    names = [int(k) for k in ctx.options.drop_layers]
    n_remove = ctx.num_layers - target_layers
    if len(set(names)) != len(names) or any(not 0 <= k < ctx.num_layers for k in names):
        raise MergeError(f"--drop-layers must name distinct layers in 0..{ctx.num_layers - 1}, got {names}")
    if len(names) != n_remove:
        raise MergeError(f"--drop-layers names {len(names)} layer(s) but the target removes {n_remove} "
                         f"({ctx.num_layers} -> {target_layers} layers)")
    ctx.steps.append({"step": 0, "removed": sorted(names)})
    ctx.remove_layers(sorted(names))
