"""CoMe-p: CoMe with the channel ratio chosen a posteriori, by the calibration loss.

The window is chosen exactly as in `come` (lowest window distance, same
re-merge rule and last-step shrinking). Instead of giving each source layer a
channel share proportional to its block influence, the share r of the
window's first layer is searched over {0, 1/G, ..., 1} (G = `granularity`, so
G + 1 candidates); the other layers split 1 - r in proportion to their block
influence (for a window of two: (r, 1 - r)). Every candidate is merged with
the same channel sensitivities and scored by the calibration loss of the
model with the merged layer in place (`search_samples` sequences; all by
default). The lowest loss wins; ties go to the r closest to CoMe's own BI
share, then to the lowest r. All candidate losses are in the plan's steps.
"""

from __future__ import annotations

from .come import bi_ratios, merge_with_ratios, progressive_merge


def candidate_ratios(bi, start: int, size: int, r: float) -> list[float]:
    """Share r for layer `start`, 1 - r split over the rest of the window by block influence."""
    rest = bi_ratios(bi, start + 1, size - 1)
    return [r] + [(1 - r) * share for share in rest]


def search_step(ctx, start: int, size: int, bi):
    """(merged layer, merge record, step details) of the best ratio for window start..start+size-1."""
    granularity = int(ctx.options.granularity)  # >= 1: engine/options.py checks it
    cache = ctx.cache
    prior = bi_ratios(bi, start, size)[0]
    sensitivities = {k: cache.channel_sensitivity(k) for k in range(start, start + size)}
    tail = cache.current_stack(start + size)
    candidates, best = [], None
    for i in range(granularity + 1):
        r = i / granularity
        merged, record = merge_with_ratios(ctx, start, size, candidate_ratios(bi, start, size, r), sensitivities)
        head_kwargs = cache.layer_kwargs[start + record["position"]]
        loss = cache.loss_through(start, [(merged, head_kwargs)] + tail, samples=ctx.options.search_samples)
        candidates.append({"r": r, "loss": loss})
        key = (loss, abs(r - prior), r)
        if best is None or key < best[0]:
            best = (key, r, loss, merged, record)
    _, r, loss, merged, record = best
    record = {**record, "rule": "come-p", "ratio_first": r, "loss": loss}
    return merged, record, {"bi_ratio_first": prior, "candidates": candidates, "chosen_r": r, "chosen_loss": loss}


def run(ctx, target_layers: int) -> None:
    progressive_merge(ctx, target_layers, search_step)
