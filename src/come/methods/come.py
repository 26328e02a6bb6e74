"""CoMe: progressive concatenation-based merging of the most redundant adjacent layers."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..core.merging import Selection, calibrate_output_norms, largest_remainder, merge_layers, top_channels
from ..errors import MergeError


def choose_window(ctx, size: int):
    """(start, SBI of every window, BI of every layer) for the next merge."""
    cache = ctx.cache
    bi = cache.block_influence()
    sbi = cache.window_distance(size, all_tokens=ctx.options.sbi_tokens == "all")
    eligible = [i for i in range(len(sbi)) if ctx.window_eligible(i, size)]
    if not eligible:
        protected = f" or protected (--protect-first {ctx.options.protect_first})" if ctx.options.protect_first else ""
        raise MergeError(
            f"no window of {size} layers without an earlier merge{protected} is left at {ctx.num_layers} layers; "
            "pass --allow-remerge or ask for fewer removed layers"
        )
    start = min(eligible, key=lambda i: (sbi[i].item(), i))
    return start, sbi, bi


def bi_ratios(bi, start: int, size: int) -> list[float]:
    """Channel shares of layers start..start+size-1, proportional to their block influence."""
    ratios = [bi[k].item() for k in range(start, start + size)]
    total = sum(ratios)
    return [r / total for r in ratios] if total > 0 else [1 / size] * size


def merge_step(ctx, start: int, size: int, bi):
    """Merge layers start..start+size-1 into one layer of the original width."""
    return merge_with_ratios(ctx, start, size, bi_ratios(bi, start, size))


def merge_with_ratios(ctx, start: int, size: int, ratios: list[float], sensitivities: dict | None = None):
    """Merge layers start..start+size-1, giving layer start+i the channel share ratios[i].

    `sensitivities` ({layer: channel_sensitivity(layer)}) saves recomputing them
    when the same window is merged with several ratio vectors.
    """
    cfg, adapter = ctx.config, ctx.adapter
    window = list(range(start, start + size))
    group_budget = largest_remainder(ratios, adapter.kv_groups(cfg))
    neuron_budget = largest_remainder(ratios, cfg.intermediate_size)
    selections, kept = [], []
    for k, n_groups, n_neurons in zip(window, group_budget, neuron_budget):
        if sensitivities is not None and k in sensitivities:
            attn_score, ffn_score = sensitivities[k]
        else:
            attn_score, ffn_score = ctx.cache.channel_sensitivity(k)
        sel = Selection(top_channels(attn_score, n_groups), top_channels(ffn_score, n_neurons))
        selections.append(sel)
        kept.append(
            {
                "layer": k,
                "covers": ctx.records[k]["covers"],
                "ratio": ratios[window.index(k)],
                "kv_groups": sel.kv_groups.tolist(),
                "neurons": sel.neurons.tolist(),
            }
        )
    # The merged layer takes the type (e.g. full or sliding attention) of one source, by the adapter's rule.
    types = getattr(cfg, "layer_types", None)
    position = adapter.merged_position([types[ctx.records[k]["position_of"]] for k in window] if types else [])
    output_scales = None
    if adapter.output_norms and ctx.options.output_norm == "scale":
        output_scales = [ctx.cache.output_norm_scales(k) for k in window]
    merged = merge_layers(
        adapter,
        cfg,
        [ctx.layers[k] for k in window],
        selections,
        ratios,
        norm=ctx.options.norm,
        layer_idx=ctx.records[start + position]["position_of"],
        output_scales=output_scales,
    )
    record = {"norm": ctx.options.norm, "sources": kept, "position": position}
    if output_scales is not None:
        cache, kwargs = ctx.cache, ctx.cache.layer_kwargs[start + position]
        batches = lambda: ((cache.boundary(start)[b0:b1].to(cache.device, cache.compute_dtype), kwargs)
                           for b0, b1 in cache.batches())
        record["output_norms"] = {"source_scales": output_scales,
                                  "merged_scale": calibrate_output_norms(adapter, merged, batches,
                                                                        cache.layer_precision)}
    return merged, record


def progressive_merge(ctx, target_layers: int, step) -> None:
    """Merge the most redundant window until `target_layers` remain.

    `step(ctx, start, size, bi)` builds the merged layer and returns
    (layer, merge record, extra fields for the step log).
    """
    total = ctx.num_layers - target_layers
    with tqdm(total=total, desc="merging layers", unit="layer", disable=not ctx.options.progress) as bar:
        while ctx.num_layers > target_layers:
            # A window of m layers removes m-1; shrink the last one to land on the target.
            size = min(ctx.options.merge_size, ctx.num_layers - target_layers + 1)
            start, sbi, bi = choose_window(ctx, size)
            merged, record, extra = step(ctx, start, size, bi)
            ctx.steps.append(
                {
                    "step": len(ctx.steps),
                    "layers_before": ctx.num_layers,
                    "window": [start, start + size - 1],
                    "covers": [c for r in ctx.records[start : start + size] for c in r["covers"]],
                    "sbi": [round(v, 6) for v in sbi.tolist()],
                    "bi": [round(v, 6) for v in bi.tolist()],
                    **extra,
                }
            )
            ctx.merge_window(start, merged, size, record)
            bar.update(size - 1)


def run(ctx, target_layers: int) -> None:
    progressive_merge(ctx, target_layers, lambda *args: (*merge_step(*args), {}))
