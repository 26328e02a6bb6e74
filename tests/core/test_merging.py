"""Exactness properties of concatenation-based merging on tiny random models."""

import pytest
import torch

from come.core.adapters import adapter_for
from come.core.merging import Selection, largest_remainder, merge_layers, top_channels
from come.core.scoring import BoundaryCache
from come.testing import tiny_model, tiny_tokens

ATTN_KWARGS = ("attention_mask", "position_embeddings", "position_ids")


def _setup(family, **overrides):
    model = tiny_model(family, **overrides)
    adapter = adapter_for(model.config)
    cache = BoundaryCache(model, adapter, tiny_tokens(), progress=False)
    return model, adapter, cache


def _attn(layer, x, kwargs):
    return layer.self_attn(hidden_states=layer.input_layernorm(x), **{k: kwargs[k] for k in ATTN_KWARGS if k in kwargs})[0]


def _ffn(layer, x):
    return layer.mlp(layer.post_attention_layernorm(x))


def _run(layer, x, kwargs):
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _all_channels(adapter, config):
    return Selection(torch.arange(adapter.kv_groups(config)), torch.arange(config.intermediate_size))


@pytest.mark.parametrize(
    "family,overrides",
    [("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}), ("mistral", {}), ("qwen2", {})],
)
@torch.no_grad()
def test_keeping_everything_is_the_parallel_sum(family, overrides):
    """Double width, no selection, folded norms: attention then FFN are exact parallel sums."""
    model, adapter, cache = _setup(family, **overrides)
    a, b = adapter.layers(model)[2], adapter.layers(model)[3]
    x, kw = cache.h[2], cache.layer_kwargs[2]
    sel = _all_channels(adapter, model.config)
    merged = merge_layers(adapter, model.config, [a, b], [sel, sel], [0.5, 0.5], norm="fold", layer_idx=2)

    # Attention alone: zero the merged FFN's output map, compare with x + Attn_a(x) + Attn_b(x).
    down = adapter.down_proj(merged)
    saved = down.weight.clone()
    down.weight.zero_()
    if down.bias is not None:
        down.bias.zero_()
    attn_sum = x + _attn(a, x, kw) + _attn(b, x, kw)
    torch.testing.assert_close(_run(merged, x, kw), attn_sum, rtol=1e-5, atol=1e-5)
    down.weight.copy_(saved)
    if down.bias is not None:
        down.bias.copy_(adapter.down_proj(a).bias + adapter.down_proj(b).bias)

    full = attn_sum + _ffn(a, attn_sum) + _ffn(b, attn_sum)
    torch.testing.assert_close(_run(merged, x, kw), full, rtol=1e-5, atol=1e-5)
    # Not trivially true: the sequential composition differs.
    assert (_run(b, _run(a, x, kw), kw) - full).abs().max() > 1e-3


@torch.no_grad()
def test_gqa_merged_attention_is_sum_of_selected_groups():
    """Each kept KV group carries exactly its own query heads (HF pairing q // reps)."""
    model, adapter, cache = _setup("llama", num_attention_heads=6, num_key_value_heads=3, head_dim=8, hidden_size=48)
    cfg = model.config
    a, b = adapter.layers(model)[0], adapter.layers(model)[1]
    for layer in (a, b):  # peaky attention, so a wrong pairing shows clearly
        layer.self_attn.q_proj.weight.mul_(8)
        layer.self_attn.k_proj.weight.mul_(8)
    x, kw = cache.h[0], cache.layer_kwargs[0]
    sel_a = Selection(torch.tensor([2]), torch.arange(cfg.intermediate_size))
    sel_b = Selection(torch.tensor([0, 1]), torch.arange(cfg.intermediate_size))
    merged = merge_layers(adapter, cfg, [a, b], [sel_a, sel_b], [0.3, 0.7], norm="fold")
    assert adapter.attn_module(merged).q_proj.weight.shape == a.self_attn.q_proj.weight.shape

    def group_contribution(layer, groups):
        # Attention output with the o_proj columns of every other group zeroed.
        o = layer.self_attn.o_proj
        saved = o.weight.clone()
        width = cfg.head_dim * (cfg.num_attention_heads // cfg.num_key_value_heads)
        mask = torch.zeros(o.weight.shape[1], dtype=torch.bool)
        for g in groups:
            mask[g * width : (g + 1) * width] = True
        o.weight[:, ~mask] = 0
        out = _attn(layer, x, kw)
        o.weight.copy_(saved)
        return out

    expected = group_contribution(a, [2]) + group_contribution(b, [0, 1])
    got = _attn(merged, x, kw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # A mis-pairing (query heads of group 0 with KV head 1) would not match.
    wrong = merge_layers(adapter, cfg, [a, b], [sel_a, sel_b], [0.3, 0.7], norm="fold")
    q = wrong.self_attn.q_proj.weight
    width = cfg.head_dim * 2
    q[:width], q[width : 2 * width] = q[width : 2 * width].clone(), q[:width].clone()
    assert (_attn(wrong, x, kw) - expected).abs().max() > 1e-3  # 100x the tolerance above


@torch.no_grad()
def test_merged_layer_has_original_shapes_for_every_family():
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        model, adapter, cache = _setup(family)
        cfg = model.config
        layers = adapter.layers(model)
        groups = largest_remainder([0.4, 0.6], adapter.kv_groups(cfg))
        neurons = largest_remainder([0.4, 0.6], cfg.intermediate_size)
        sels = []
        for k, g, n in zip((1, 2), groups, neurons):
            attn, ffn = cache.channel_sensitivity(k)
            sels.append(Selection(top_channels(attn, g), top_channels(ffn, n)))
        merged = merge_layers(adapter, cfg, [layers[1], layers[2]], sels, [0.4, 0.6])
        for (name, p), (name0, p0) in zip(merged.state_dict().items(), layers[1].state_dict().items()):
            assert name == name0 and p.shape == p0.shape, name


@torch.no_grad()
def test_norm_mean_averages_gains_and_fold_sets_ones():
    model, adapter, _ = _setup("llama")
    a, b = adapter.layers(model)[0], adapter.layers(model)[1]
    sel = Selection(torch.tensor([0]), torch.arange(48))
    mean = merge_layers(adapter, model.config, [a, b], [sel, sel], [0.5, 0.5], norm="mean")
    torch.testing.assert_close(mean.input_layernorm.weight, (a.input_layernorm.weight + b.input_layernorm.weight) / 2)
    fold = merge_layers(adapter, model.config, [a, b], [sel, sel], [0.5, 0.5], norm="fold")
    assert torch.all(fold.input_layernorm.weight == 1)


@torch.no_grad()
def test_qwen3_head_norms_are_ratio_weighted_and_biases_follow_rows():
    model, adapter, _ = _setup("qwen3")
    a, b = adapter.layers(model)[0], adapter.layers(model)[1]
    sel_a, sel_b = Selection(torch.tensor([1]), torch.arange(40)), Selection(torch.tensor([0]), torch.arange(56))
    merged = merge_layers(adapter, model.config, [a, b], [sel_a, sel_b], [0.25, 0.75])
    torch.testing.assert_close(merged.self_attn.q_norm.weight, 0.25 * a.self_attn.q_norm.weight + 0.75 * b.self_attn.q_norm.weight)

    model, adapter, _ = _setup("qwen2")
    a, b = adapter.layers(model)[0], adapter.layers(model)[1]
    merged = merge_layers(adapter, model.config, [a, b], [sel_a, sel_b], [0.5, 0.5])
    hd = model.config.head_dim
    torch.testing.assert_close(merged.self_attn.k_proj.bias[:hd], a.self_attn.k_proj.bias[hd : 2 * hd])
    torch.testing.assert_close(merged.self_attn.k_proj.bias[hd:], b.self_attn.k_proj.bias[:hd])


def test_largest_remainder_sums_exactly():
    assert largest_remainder([0.5, 0.5], 3) == [2, 1]
    assert largest_remainder([0.2, 0.3, 0.5], 7) == [1, 2, 4]
    assert largest_remainder([0.0, 0.0], 4) == [2, 2]
    for total in range(30):
        assert sum(largest_remainder([0.13, 0.57, 0.3], total)) == total


def test_top_channels_sorted_and_stable():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0])
    assert top_channels(scores, 2).tolist() == [1, 3]
    assert top_channels(scores, 3).tolist() == [1, 2, 3]
