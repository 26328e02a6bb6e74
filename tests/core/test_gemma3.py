"""Gemma 3 (zero-centred norms, post-norms, per-head norms, sliding/full layers) on tiny random models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from come.core.adapters import adapter_for
from come.core.merging import Selection, merge_layers
from come.core.scoring import BoundaryCache
from come.engine.models import LoadedModel
from come.engine.pipeline import compress
from come.errors import ComeError
from come.methods import available_methods
from come.testing import tiny_model, tiny_tokens

TOKENS = tiny_tokens(nsamples=8, seqlen=32)  # longer than the sliding window of 8


def _run(method, target=4, **options):
    return compress(LoadedModel(tiny_model("gemma3"), None, {"name": "tiny-gemma3"}), target_layers=target,
                    method=method, tokens=TOKENS, progress=False, batch_size=4, **options)


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_runs_6_to_4_and_reloads_with_identical_logits(method, tmp_path):
    if method == "replaceme":
        with pytest.raises(ComeError, match="cannot be folded"):
            _run(method)
        return
    extra = {"drop_layers": (2, 4)} if method == "drop" else {}
    if method == "replay":  # the plan of a come-search run to the same target
        _run("come-search", out=tmp_path / "searched", search_samples=4)
        extra = {"replay_plan": str(tmp_path / "searched")}
    result = _run(method, out=tmp_path / "out", search_samples=4, granularity=2, **extra)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and len(config["layer_types"]) == 4
    # Each output layer's type is the one recorded for its position, and its attention module agrees.
    original_types = tiny_model("gemma3").config.layer_types
    assert config["layer_types"] == [original_types[layer["position_of"]] for layer in result.plan["layers"]]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for layer, kind in zip(reloaded.model.layers, config["layer_types"]):
        assert layer.self_attn.is_sliding == (kind == "sliding_attention")
    ids = tiny_tokens(nsamples=2, seqlen=24, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_merged_layer_attends_fully_if_any_source_does():
    result = _run("come", target=3, allow_remerge=True)
    types = tiny_model("gemma3").config.layer_types
    for layer in result.plan["layers"]:
        source_types = {types[c] for c in layer["covers"]}
        expected = "full_attention" if "full_attention" in source_types else "sliding_attention"
        if layer["merged"]:
            assert types[layer["position_of"]] == expected


@torch.no_grad()
def test_merged_pair_error_is_finite_reported_and_scale_beats_no_scale():
    """The post-norms make the merge approximate: measure it against running the two layers in turn."""
    model = tiny_model("gemma3", seed=3)
    adapter = adapter_for(model.config)
    cache = BoundaryCache(model, adapter, TOKENS, batch_size=4, progress=False)
    layers = adapter.layers(model)
    a, b = layers[0], layers[1]
    x, kwargs = cache.h[0], cache.layer_kwargs[0]
    target = cache.h[2]

    def error(layer):
        out = layer(x, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return float((out - target).pow(2).sum() / target.pow(2).sum())

    # Half the channels of each source, merged by both rules: the errors against running the two layers in
    # turn are finite, and the measured-scale rule is closer than averaging the post-norms.
    from come.core.merging import calibrate_output_norms

    half = [Selection(torch.tensor([g]), torch.arange(n, 96, 2)) for g, n in ((0, 0), (1, 1))]
    scales = [cache.output_norm_scales(0), cache.output_norm_scales(1)]
    scaled = merge_layers(adapter, model.config, [a, b], half, [0.5, 0.5], output_scales=scales)
    calibrate_output_norms(adapter, scaled, lambda: [(x, kwargs)])
    averaged = merge_layers(adapter, model.config, [a, b], half, [0.5, 0.5])
    errors = {"scale": error(scaled), "mean": error(averaged), "skip layer 1": error(a)}
    assert all(torch.isfinite(torch.tensor(list(errors.values())))), errors
    assert errors["scale"] < errors["mean"], errors

    # The plan of a merge records the scales it used.
    result = _run("come", target=5)
    merge = next(layer["merge"] for layer in result.plan["layers"] if layer["merged"])
    assert set(merge["output_norms"]["merged_scale"]) == {"post_attention_layernorm", "post_feedforward_layernorm"}
    assert all(v > 0 for v in merge["output_norms"]["merged_scale"].values())


def test_refit_works_through_the_post_feedforward_norm():
    result = _run("shortgpt", refit=True)
    spans = [layer for layer in result.plan["layers"] if len(layer["covers"]) > 1]
    assert spans and all(layer["refit"].get("linearised") or not layer["refit"]["applied"] for layer in spans)
    for layer in spans:
        record = layer["refit"]
        if record["applied"]:  # kept only if the real (not linearised) held-out error dropped
            before, after = record["held_out_real_error"]
            assert after < before


def test_layerwise_matches_in_memory(tmp_path):
    src = tmp_path / "src"
    tiny_model("gemma3", seed=1).save_pretrained(src, max_shard_size="200KB")
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    reference = compress(LoadedModel(model, None, {}), target_layers=4, method="come-search", tokens=TOKENS,
                         progress=False, batch_size=4)
    result = compress(str(src), layerwise=True, target_layers=4, method="come-search", tokens=TOKENS,
                      progress=False, batch_size=4, out=tmp_path / "out")
    assert result.plan["layers"] == reference.plan["layers"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    b = reference.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in b)
