"""Scores computed from the boundary cache agree with direct computations."""

import math

import pytest
import torch

from come.core.adapters import adapter_for
from come.core.scoring import BoundaryCache
from come.errors import ComeError, NonFiniteActivations
from come.testing import tiny_model, tiny_tokens


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@torch.no_grad()
def test_cache_matches_model_hidden_states(family):
    model = tiny_model(family)
    tokens = tiny_tokens()
    cache = BoundaryCache(model, adapter_for(model.config), tokens, batch_size=3, progress=False)
    hidden = model(tokens, output_hidden_states=True).hidden_states
    for l in range(model.config.num_hidden_layers):  # the model's last entry is after the final norm
        torch.testing.assert_close(cache.h[l], hidden[l], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_scores_match_definitions():
    model = tiny_model("llama")
    tokens = tiny_tokens()
    adapter = adapter_for(model.config)
    cache = BoundaryCache(model, adapter, tokens, progress=False)
    h = cache.h
    bi = cache.block_influence()
    cos = torch.nn.functional.cosine_similarity(h[3], h[4], dim=-1)
    assert bi[3].item() == pytest.approx((1 - cos.clamp(0, 1)).mean().item(), rel=1e-5)
    sbi = cache.window_distance(2)
    cos = torch.nn.functional.cosine_similarity(h[1][:, -1], h[3][:, -1], dim=-1).clamp(-1, 1)
    assert sbi[1].item() == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), rel=1e-5)
    assert len(cache.window_distance(3, all_tokens=True)) == model.config.num_hidden_layers - 2

    # Channel sensitivity of layer 2 against a hand computation.
    layer = adapter.layers(model)[2]
    seen = {}
    hook_o = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0]))
    hook_d = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("d", a[0]))
    layer(h[2], **cache.layer_kwargs[2])
    hook_o.remove(), hook_d.remove()
    attn, ffn = cache.channel_sensitivity(2)
    ffn_ref = seen["d"].abs().mean((0, 1)) * layer.mlp.down_proj.weight.abs().sum(0)
    torch.testing.assert_close(ffn.float(), ffn_ref, rtol=1e-4, atol=1e-7)
    o_ref = seen["o"].abs().mean((0, 1)) * layer.self_attn.o_proj.weight.abs().sum(0)
    width = model.config.head_dim * 2  # 4 query heads over 2 KV groups
    torch.testing.assert_close(attn.float(), o_ref.reshape(2, width).mean(1), rtol=1e-4, atol=1e-7)


@torch.no_grad()
def test_sensitivities_from_the_boundary_pass_equal_a_pass_of_their_own_and_follow_changes():
    import copy

    model = tiny_model("llama", num_hidden_layers=6)
    adapter = adapter_for(model.config)
    cache = BoundaryCache(model, adapter, tiny_tokens(), batch_size=3, progress=False)

    def own_pass(k):  # what channel_sensitivity computes when nothing was gathered for layer k
        kept = cache.activation_sums.pop(k)
        try:
            return cache.channel_sensitivity(k)
        finally:
            cache.activation_sums[k] = kept

    assert sorted(cache.activation_sums) == list(range(6))  # gathered by the calibration pass
    for k in range(6):
        assert all(torch.equal(a, b) for a, b in zip(cache.channel_sensitivity(k), own_pass(k)))
    # Layer 3 changes: its sums and those after it are gathered again, on the new weights and inputs.
    before = {k: cache.channel_sensitivity(k) for k in range(6)}
    layers = adapter.layers(model)
    new_layer = copy.deepcopy(layers[3])
    new_layer.mlp.up_proj.weight.mul_(2)
    layers[3] = new_layer
    cache.invalidate_from(3)
    assert sorted(cache.activation_sums) == [0, 1, 2]
    after = {k: cache.channel_sensitivity(k) for k in range(6)}
    assert sorted(cache.activation_sums) == list(range(6))
    for k in range(6):
        assert all(torch.equal(a, b) for a, b in zip(after[k], own_pass(k)))
        assert all(torch.equal(a, b) for a, b in zip(after[k], before[k])) == (k < 3)


@torch.no_grad()
def test_kept_scores_equal_fresh_ones_and_follow_changes():
    """Block influence and skip errors are kept between calls; after a change, those reading a changed boundary
    are computed again (a stale one would differ from the fresh value) and the others are the same floats."""
    import copy

    model = tiny_model("llama", num_hidden_layers=6)
    adapter = adapter_for(model.config)
    cache = BoundaryCache(model, adapter, tiny_tokens(), batch_size=3, progress=False)

    def fresh():  # what the cache computes with nothing kept
        kept = cache._block_influence, cache._skip_errors, cache._teacher_norms
        cache._block_influence, cache._skip_errors, cache._teacher_norms = {}, {}, {}
        try:
            return cache.block_influence(), [cache.skip_error(k, k + 1) for k in range(6)]
        finally:
            cache._block_influence, cache._skip_errors, cache._teacher_norms = kept

    def kept():
        return cache.block_influence(), [cache.skip_error(k, k + 1) for k in range(6)]

    before = kept()
    assert torch.equal(before[0], fresh()[0]) and before[1] == fresh()[1]
    assert sorted(cache._block_influence) == list(range(6)) and len(cache._skip_errors) == 6
    layers = adapter.layers(model)
    new_layer = copy.deepcopy(layers[3])
    new_layer.mlp.up_proj.weight.mul_(2)
    layers[3] = new_layer
    cache.invalidate_from(3)  # h_4.. change: BI of layers 3.. and skip errors of layers 4.. are dropped
    assert sorted(cache._block_influence) == [0, 1, 2]
    assert sorted(k for k, _ in cache._skip_errors) == [0, 1, 2, 3]
    after = kept()
    assert torch.equal(after[0], fresh()[0]) and after[1] == fresh()[1]
    assert [a == b for a, b in zip(after[0].tolist(), before[0].tolist())] == [True] * 3 + [False] * 3
    assert [a == b for a, b in zip(after[1], before[1])] == [True] * 4 + [False] * 2
    # A kept skip error still refuses a target whose original boundary was released, as a fresh one does.
    cache.release_teacher([[2, 3, 4]])
    with pytest.raises(ComeError, match="released"):
        cache.skip_error(2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_is_isfinite_all(dtype):
    from come.core.scoring import all_finite

    big = torch.finfo(dtype).max
    cases = [torch.ones(4, 5), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0]),
             torch.tensor([float("-inf"), 2.0]), torch.tensor([float("inf"), float("-inf")]),
             torch.tensor([big, big, -1.0], dtype=torch.float64)]  # finite entries whose sum overflows
    for case in cases:
        t = case.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all())
    assert all_finite(torch.tensor([big, big], dtype=dtype))


@torch.no_grad()
def test_non_finite_activation_names_the_layer():
    model = tiny_model("llama")
    adapter_for(model.config).layers(model)[4].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivations, match="layer 4"):
        BoundaryCache(model, adapter_for(model.config), tiny_tokens(), progress=False)


@torch.no_grad()
def test_loss_through_current_stack_is_the_model_loss():
    model = tiny_model("llama")
    tokens = tiny_tokens()
    cache = BoundaryCache(model, adapter_for(model.config), tokens, batch_size=3, progress=False)
    expected = model(tokens, labels=tokens).loss.item()
    for start in (0, 3):
        assert cache.loss_through(start, cache.current_stack(start)) == pytest.approx(expected, rel=1e-5)
    # Skipping a layer changes it.
    assert cache.loss_through(2, cache.current_stack(3)) != pytest.approx(expected, rel=1e-5)
    # A subset of samples is the loss on those samples.
    sub = model(tokens[:4], labels=tokens[:4]).loss.item()
    assert cache.loss_through(0, cache.current_stack(0), samples=4) == pytest.approx(sub, rel=1e-5)


@torch.no_grad()
def test_kl_loss_is_the_divergence_from_the_original_model():
    model = tiny_model("llama")
    tokens = tiny_tokens()
    cache = BoundaryCache(model, adapter_for(model.config), tokens, batch_size=3, progress=False, loss_kind="kl")
    # The unchanged model is at divergence zero, from any position.
    for start in (0, 3):
        assert cache.loss_through(start, cache.current_stack(start)) == pytest.approx(0.0, abs=1e-6)
    # Skipping layer 2: the mean over predicted positions of KL(original || skipped), computed directly.
    original = torch.log_softmax(model(tokens, use_cache=False).logits[:, :-1].float(), dim=-1)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != 2])
    skipped = torch.log_softmax(model(tokens, use_cache=False).logits[:, :-1].float(), dim=-1)
    model.model.layers = layers
    expected = (original.exp() * (original - skipped)).sum(-1).mean().item()
    assert expected > 1e-4
    assert cache.loss_through(2, cache.current_stack(3)) == pytest.approx(expected, rel=1e-4)
    # The cross-entropy of the same skip is a different number (the option is not ignored).
    cache.loss_kind = "ce"
    assert cache.loss_through(2, cache.current_stack(3)) != pytest.approx(expected, rel=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_loss_through_head_chunks_give_the_whole_batch_loss(monkeypatch, kind):
    """Logits go through the head a few sequences at a time: the loss is that of whole batches (the
    cross-entropy to the bit: each token's log-softmax is its own), and chunks are really used."""
    from come.core import scoring

    model = tiny_model("llama")
    cache = BoundaryCache(model, adapter_for(model.config), tiny_tokens(), batch_size=5, progress=False, loss_kind=kind)
    stack = cache.current_stack(3)
    whole = cache.loss_through(2, stack)
    head = model.get_submodule(cache.adapter.lm_head_path)
    seq_bytes = tiny_tokens().shape[1] * head.weight.shape[0] * 4
    calls = []
    real = scoring.BoundaryCache._head_chunks
    monkeypatch.setattr(scoring.BoundaryCache, "_head_chunks",
                        staticmethod(lambda x, h: calls.append(real(x, h)) or calls[-1]))
    for per_chunk in (1, 2):
        calls.clear()
        monkeypatch.setattr(scoring, "HEAD_CHUNK_BYTES", per_chunk * seq_bytes)
        chunked = cache.loss_through(2, stack)
        assert max(c.stop - c.start for parts in calls for c in parts) == per_chunk
        if kind == "ce":
            assert chunked == whole
        else:
            assert chunked == pytest.approx(whole, rel=1e-6)


def test_original_boundaries_inside_a_span_are_released_and_nothing_else():
    """A merged or absorbed span only grows, so the original boundaries strictly inside it are never a target
    again: they are dropped (their memory freed once no current boundary shares it); the span's ends stay."""
    from come.errors import ComeError

    model = tiny_model("llama", num_hidden_layers=8)
    cache = BoundaryCache(model, adapter_for(model.config), tiny_tokens(nsamples=4, seqlen=16), batch_size=2, progress=False)
    kept = {i: cache.teacher_boundary(i) for i in range(9)}
    cache.release_teacher([[0], [1, 2, 3], [4], [5, 7], [6]])  # [5, 7] is not contiguous: left alone
    for i in range(9):
        if i in (2, 3):
            with pytest.raises(ComeError, match="inside a merged span"):
                cache.teacher_boundary(i)
        else:
            assert cache.teacher_boundary(i) is kept[i]


def test_replaced_original_boundaries_move_to_the_teacher_store_unchanged(tmp_path):
    """With boundaries in RAM, an original-model boundary that a change replaces moves to disk with the same
    values; the current boundaries stay in RAM and one still shared with the original stays where it is."""
    from come.core.activations import BoundaryStore, DiskBoundary

    model = tiny_model("llama", num_hidden_layers=6)
    cache = BoundaryCache(model, adapter_for(model.config), tiny_tokens(nsamples=5, seqlen=16), batch_size=2,
                          progress=False, teacher_store=BoundaryStore("disk", tmp_path))
    original = [cache.teacher_boundary(i).clone() for i in range(7)]
    cache.invalidate_from(3)  # as after a change at layer 3: h_4.. are recomputed from it
    cache.ensure_fresh()
    for i in range(7):
        stored = cache.teacher_boundary(i)
        assert isinstance(stored, DiskBoundary) == (i >= 4) and isinstance(cache.h[i], torch.Tensor)
        assert torch.equal(stored[0:5], original[i])
    assert (cache.teacher_boundary(2) is cache.h[2]) and len(list(tmp_path.iterdir())) == 3
