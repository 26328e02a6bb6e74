"""Progressive compression on tiny models: targets, export, reload, determinism, errors."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from come.core.adapters import UnsupportedArchitecture, adapter_for
from come.engine.models import LoadedModel
from come.engine.pipeline import compress, count_parameters, layer_parameters, resolve_target
from come.errors import InvalidTarget, MergeError, OutputExists
from come.testing import FAMILIES, tiny_model, tiny_tokens


def _loaded(family="llama", seed=0, **overrides):
    return LoadedModel(tiny_model(family, seed=seed, **overrides), None, {"name": f"tiny-{family}"})


def _run(family="llama", target=3, **options):
    options.setdefault("progress", False)
    options.setdefault("method", "come")  # these tests are about CoMe's merge loop
    return compress(_loaded(family), target_layers=target, tokens=tiny_tokens(), **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_come_reaches_target_exports_and_reloads(family, tmp_path):
    result = _run(family, target=3, out=tmp_path / "out")
    model, plan = result.model, result.plan
    assert plan["final_layers"] == 3 == model.config.num_hidden_layers
    assert sorted(c for layer in plan["layers"] for c in layer["covers"]) == list(range(6))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.num_hidden_layers == 3
    if hasattr(config, "layer_types"):
        assert len(config.layer_types) == 3
    ids = tiny_tokens(nsamples=2, seqlen=12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # generate() with a KV cache agrees with generation without one.
    with_cache = reloaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    without = reloaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 18) and torch.equal(with_cache, without)
    on_disk = json.loads((tmp_path / "out" / "come_plan.json").read_text())
    assert on_disk["layers"] == json.loads(json.dumps(plan["layers"]))
    assert (tmp_path / "out" / "README.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_merged_layers_keep_exact_channel_budgets():
    plan = _run("llama", target=3).plan
    cfg = tiny_model("llama").config
    for layer in plan["layers"]:
        if layer["merge"]:
            sources = layer["merge"]["sources"]
            assert sum(len(s["kv_groups"]) for s in sources) == cfg.num_key_value_heads
            assert sum(len(s["neurons"]) for s in sources) == cfg.intermediate_size
            assert sum(s["ratio"] for s in sources) == pytest.approx(1.0)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_incremental_recomputation_equals_full_recomputation():
    inc = _run("qwen2", target=3, incremental=True)
    full = _run("qwen2", target=3, incremental=False)
    assert inc.plan["layers"] == full.plan["layers"]
    assert inc.plan["steps"] == full.plan["steps"]
    a, b = _weights(inc.model), _weights(full.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_plan_and_weights():
    one, two = _run("llama", target=2, allow_remerge=True), _run("llama", target=2, allow_remerge=True)
    assert one.plan["layers"] == two.plan["layers"]
    a, b = _weights(one.model), _weights(two.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_remerge_rule_and_merge_size():
    with pytest.raises(MergeError, match="allow-remerge"):
        _run("llama", target=2, allow_remerge=False)  # the paper's rule: 6 layers -> 2 needs a merged layer again
    assert _run("llama", target=2).plan["final_layers"] == 2  # re-merging is come's default
    assert _run("llama", target=2).plan["options"]["allow_remerge"] is True
    plan = _run("llama", target=2, merge_size=3, allow_remerge=False).plan
    assert plan["final_layers"] == 2 and len(plan["steps"]) == 2
    assert all(s["window"][1] - s["window"][0] == 2 for s in plan["steps"])


def test_shortgpt_removes_lowest_bi_layers(tmp_path):
    result = _run("llama", target=4, method="shortgpt", out=tmp_path / "s")
    bi = result.plan["steps"][0]["bi"]
    removed = result.plan["steps"][0]["removed"]
    assert sorted(removed) == sorted(sorted(range(6), key=lambda k: bi[k])[:2])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_hidden_layers == 4


def test_ratio_resolution():
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    per_layer, total = layer_parameters(adapter, model), count_parameters(model)
    assert resolve_target(model, adapter, 2.2 * per_layer / total, None) == 4
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(InvalidTarget, match=r"\(0, 1\)"):
            resolve_target(model, adapter, bad, None)
    with pytest.raises(InvalidTarget, match="removes no layer"):
        resolve_target(model, adapter, 0.1 * per_layer / total, None)
    with pytest.raises(InvalidTarget, match="every layer"):
        resolve_target(model, adapter, 0.99, None)
    with pytest.raises(InvalidTarget, match="removes no layer"):
        resolve_target(model, adapter, None, 6)
    with pytest.raises(InvalidTarget, match="every layer"):
        resolve_target(model, adapter, None, 0)


def test_existing_output_refused_and_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExists):
        _run("llama", target=5, out=out)
    assert (out / "keep.txt").exists()
    _run("llama", target=5, out=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    from come.artifacts import card

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(card, "model_card", broken)  # fails after the weights are written
    with pytest.raises(RuntimeError):
        _run("llama", target=5, out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match="llama"):
        adapter_for(GPT2Config())


def test_removed_first_layer_keeps_the_kept_layers_position():
    from come.artifacts.plan import finalize_model
    from come.engine.pipeline import CompressionContext, CompressionOptions

    model = tiny_model("qwen2", layer_types=["full_attention", "sliding_attention"] * 3, sliding_window=16)
    ctx = CompressionContext(model, None, adapter_for(model.config), tiny_tokens(), CompressionOptions(progress=False))
    ctx.remove_layers([0])
    finalize_model(ctx)
    assert ctx.records[0]["covers"] == [0, 1] and ctx.records[0]["position_of"] == 1
    full, sliding = "full_attention", "sliding_attention"
    assert model.config.layer_types == [sliding, full, sliding, full, sliding]  # originals 1..5
