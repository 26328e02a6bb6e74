"""Baselines and variants (reverse, sleb, laco, magnitude+/taylor+, come-p) on tiny models."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from come.engine.models import LoadedModel
from come.engine.pipeline import compress
from come.methods import available_methods
from come.methods.blockimportance import protected_counts
from come.methods.laco import rdsc_merge
from come.testing import tiny_model, tiny_tokens


def _run(method, target, family="llama", model=None, **options):
    options.setdefault("progress", False)
    model = model if model is not None else tiny_model(family)
    return compress(LoadedModel(model, None, {"name": f"tiny-{family}"}), target_layers=target, method=method,
                    tokens=tiny_tokens(), **options)


def _layer_state(model, k):
    return {key: v.clone() for key, v in model.model.layers[k].state_dict().items()}


def _full_loss(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, labels=tokens, use_cache=False).loss.item()


@pytest.mark.parametrize("target", [4, 3])
@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_reaches_target_exports_and_reloads(method, target, tmp_path):
    extra = {"drop_layers": (1, 3, 4)[: 6 - target]} if method == "drop" else {}
    if method == "replay":  # the plan of a come-search run to the same target
        _run("come-search", target, out=tmp_path / "searched")
        extra = {"replay_plan": str(tmp_path / "searched")}
    result = _run(method, target, out=tmp_path / "out", **extra)
    model, plan = result.model, result.plan
    assert plan["final_layers"] == target == model.config.num_hidden_layers == len(model.model.layers)
    assert sorted(c for layer in plan["layers"] for c in layer["covers"]) == list(range(6))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == target
    ids = tiny_tokens(nsamples=2, seqlen=12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# -- laco ------------------------------------------------------------------------
def test_rdsc_of_identical_layers_is_the_identity():
    layers = tiny_model("llama").model.layers
    copies = [layers[2], copy.deepcopy(layers[2]), copy.deepcopy(layers[2])]
    merged = rdsc_merge(copies).state_dict()
    for key, value in layers[2].state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)


def test_rdsc_sums_differences_on_copies():
    model = tiny_model("llama")
    layers = model.model.layers
    before = [_layer_state(model, k) for k in range(3)]
    merged = rdsc_merge([layers[0], layers[1], layers[2]]).state_dict()
    for key in before[0]:
        expected = before[0][key] + (before[1][key] - before[0][key]) + (before[2][key] - before[0][key])
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-6)
        # The in-place variant collapses to the last layer; and the sources must be untouched.
        assert not torch.allclose(merged[key], before[2][key])
        for k in range(3):
            assert torch.equal(layers[k].state_dict()[key], before[k][key])
    assert any("norm" in key for key in before[0])  # norm gains are merged by the same rule


@pytest.mark.parametrize("merge_size", [2, 3])  # with 2, RDSC is theta_{l+1}: only 3 can tell it from in-place
def test_laco_merges_follow_rdsc_and_the_threshold_scan(merge_size):
    original = tiny_model("llama")
    result = _run("laco", 4, merge_size=merge_size)
    steps = result.plan["steps"]
    scan, chosen = steps[0]["scan"], steps[0]["threshold"]
    thresholds = [s["threshold"] for s in scan]
    assert thresholds == sorted(thresholds, reverse=True)
    # The chosen threshold is the first one whose pass reaches the target (or the lowest one).
    reaching = [s["threshold"] for s in scan if s["layers_reached"] == 4]
    assert chosen == (reaching[0] if reaching else thresholds[-1])
    for event in steps[1:]:
        assert event["accepted"] == (event["similarity"] > event["threshold"]) or event.get("forced")
    merged_layers = [(k, layer) for k, layer in enumerate(result.plan["layers"]) if layer["merged"]]
    assert merged_layers
    if merge_size == 3:
        assert [len(layer["merge"]["source_covers"]) for _, layer in merged_layers] == [3]
    for k, layer in merged_layers:
        record = layer["merge"]
        assert record["rule"] == "rdsc" and record["threshold"] == chosen
        sources = [covers[0] for covers in record["source_covers"] if len(covers) == 1]
        if len(sources) != len(record["source_covers"]):
            continue  # a re-merged layer: not comparable with original layers directly
        states = [_layer_state(original, s) for s in sources]
        got = result.model.model.layers[k].state_dict()
        for key in states[0]:
            expected = states[0][key] + sum(st[key] - states[0][key] for st in states[1:])
            torch.testing.assert_close(got[key], expected, rtol=1e-6, atol=1e-6)


# -- reverse, sleb -----------------------------------------------------------------
def test_reverse_removes_the_layers_before_the_last():
    original = tiny_model("llama")
    result = _run("reverse", 4)
    assert result.plan["steps"][0]["removed"] == [3, 4]
    assert [layer["covers"] for layer in result.plan["layers"]] == [[0], [1], [2, 3, 4], [5]]
    for new, old in enumerate([0, 1, 2, 5]):
        got, want = _layer_state(result.model, new), _layer_state(original, old)
        assert all(torch.equal(got[key], want[key]) for key in want)


def test_sleb_removes_the_argmin_and_its_loss_is_the_real_one():
    original = tiny_model("llama")
    result = _run("sleb", 4)
    first = result.plan["steps"][0]
    losses, removed = first["losses"], first["removed"]
    assert len(losses) == 6 and removed == min(range(6), key=lambda k: (losses[k], k))
    tokens = tiny_tokens()
    for k in {removed, max(range(6), key=lambda i: losses[i])}:
        pruned = copy.deepcopy(original)
        del pruned.model.layers[k]
        pruned.config.num_hidden_layers = 5
        assert losses[k] == pytest.approx(_full_loss(pruned, tokens), abs=1e-5)
    assert len(result.plan["steps"]) == 2 and len(result.plan["steps"][1]["losses"]) == 5


def test_drop_replays_a_layer_choice_exactly_and_refuses_a_wrong_one():
    from come.errors import MergeError

    sleb = _run("sleb", 3)
    removed = [step["covers"][0] for step in sleb.plan["steps"]]  # the original layer each step deleted
    replay = _run("drop", 3, drop_layers=tuple(removed))
    assert [layer["covers"] for layer in replay.plan["layers"]] == [layer["covers"] for layer in sleb.plan["layers"]]
    ids = tiny_tokens(nsamples=2, seqlen=12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(replay.model(ids).logits, sleb.model(ids).logits, rtol=0, atol=0)
    with pytest.raises(MergeError, match="names 2 layer"):
        _run("drop", 3, drop_layers=(1, 2))
    with pytest.raises(MergeError, match="distinct layers in 0..5"):
        _run("drop", 3, drop_layers=(1, 1, 2))
    with pytest.raises(MergeError, match="distinct layers in 0..5"):
        _run("drop", 3, drop_layers=(1, 2, 6))


# -- magnitude+, taylor+ ------------------------------------------------------------
def test_protection_clamp():
    assert protected_counts(10, 4) == (4, 2)
    assert protected_counts(6, 2) == (2, 2)
    assert protected_counts(6, 3) == (2, 1)
    assert protected_counts(3, 2) == (1, 0)


@pytest.mark.parametrize("target", [8, 6])
def test_magnitude_plus_keeps_first_four_and_last_two(target):
    original = tiny_model("llama", num_hidden_layers=10)
    step = _run("magnitude+", target, model=copy.deepcopy(original)).plan["steps"][0]
    assert (step["protected_first"], step["protected_last"]) == (4, 2)
    assert step["eligible"] == [4, 5, 6, 7]
    assert all(4 <= k < 8 for k in step["removed"]) and len(step["removed"]) == 10 - target
    importance = [
        sum(p.abs().sum().item() for p in layer.parameters() if p.dim() >= 2) for layer in original.model.layers
    ]
    assert step["importance"] == pytest.approx(importance, rel=1e-6)
    assert step["removed"] == sorted(sorted(range(4, 8), key=lambda k: importance[k])[: 10 - target])


def test_taylor_plus_importance_is_nonnegative_deterministic_and_exact():
    original = tiny_model("llama")
    one = _run("taylor+", 4, model=copy.deepcopy(original), batch_size=3)
    two = _run("taylor+", 4, model=copy.deepcopy(original), batch_size=3)
    imp = one.plan["steps"][0]["importance"]
    assert imp == two.plan["steps"][0]["importance"]
    assert all(v > 0 for v in imp)
    # Independently: one full-batch backward on a copy.
    ref = copy.deepcopy(original)
    tokens = tiny_tokens()
    ref(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
    expected = [
        sum((p * p.grad).abs().sum().item() for p in layer.parameters() if p.dim() >= 2) for layer in ref.model.layers
    ]
    assert imp == pytest.approx(expected, rel=1e-4)
    # Gradients are gone and requires_grad is restored.
    assert all(p.grad is None and p.requires_grad for p in one.model.parameters())


# -- come-p -------------------------------------------------------------------------
def test_come_p_searches_the_grid_and_keeps_the_lowest_loss():
    granularity = 4
    result = _run("come-p", 5, granularity=granularity)
    (step,) = result.plan["steps"]
    candidates = step["candidates"]
    assert [c["r"] for c in candidates] == [i / granularity for i in range(granularity + 1)]
    best = min(candidates, key=lambda c: c["loss"])
    assert step["chosen_r"] == best["r"] and step["chosen_loss"] == best["loss"]
    merge = next(layer["merge"] for layer in result.plan["layers"] if layer["merged"])
    assert merge["ratio_first"] == best["r"]
    assert [s["ratio"] for s in merge["sources"]] == pytest.approx([best["r"], 1 - best["r"]])
    # The layer put in place is the one that was scored.
    assert _full_loss(result.model, tiny_tokens()) == pytest.approx(best["loss"], abs=1e-5)


def test_come_p_two_step_plan_and_sample_subset():
    result = _run("come-p", 3, granularity=2, search_samples=3)
    steps = result.plan["steps"]
    assert len(steps) == 3 and all(len(s["candidates"]) == 3 for s in steps)


def test_laco_falls_back_to_forced_merges_and_is_deterministic():
    # No merge is ever similar enough at 0.9999: every pass accepts its most similar candidate instead.
    one = _run("laco", 3, laco_thresholds=(0.9999,))
    two = _run("laco", 3, laco_thresholds=(0.9999,))
    assert one.plan["final_layers"] == 3 and one.plan["steps"] == two.plan["steps"]
    assert one.plan["steps"][0]["reached_target"] is False
    forced = [e for e in one.plan["steps"][1:] if e.get("forced")]
    assert len(forced) == 3 and all(e["accepted"] is False for e in forced)
    for e in forced:  # the forced window is the most similar of its pass
        same_pass = [x for x in one.plan["steps"][1:] if x["pass"] == e["pass"]]
        assert e["similarity"] == max(x["similarity"] for x in same_pass)
    assert all(layer["merge"]["forced"] for layer in one.plan["layers"] if layer["merged"])
