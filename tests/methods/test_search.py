"""come-search: loss-guided merge-or-drop equals a brute-force search and never walks into a dead end."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from come.core.adapters import adapter_for
from come.engine.models import LoadedModel
from come.engine.pipeline import CompressionContext, CompressionOptions, compress
from come.methods.come import merge_with_ratios
from come.methods.search import ratio_vectors
from come.testing import tiny_model, tiny_tokens

TOKENS = tiny_tokens(nsamples=8, seqlen=32)
SAMPLES = 4
EVERYTHING = {"search_windows": 10, "search_deletions": 10, "search_ratios": (0.25, 0.5, 0.75), "search_samples": SAMPLES,
              "protect_first": 0}


def _search(model, target, **options):
    # float32 activations (the default keeps them in bfloat16): these tests compare with whole-model float32
    # computations, which a bfloat16 cache matches only to its rounding.
    options = {"activation_dtype": "float32", **options}
    return compress(LoadedModel(model, None, {}), target_layers=target, method="come-search", tokens=TOKENS,
                    progress=False, batch_size=3, **options)


@torch.no_grad()
def _model_loss(model):
    ids = TOKENS[:SAMPLES]
    return model(input_ids=ids, labels=ids, use_cache=False).loss.item()


def _with_layers(model, layers):
    candidate = copy.deepcopy(model)
    adapter = adapter_for(model.config)
    adapter.set_layers(candidate, [copy.deepcopy(layer) for layer in layers])
    candidate.config.num_hidden_layers = len(layers)
    for idx, layer in enumerate(adapter.layers(candidate)):
        layer.self_attn.layer_idx = idx
    return candidate


@torch.no_grad()
def test_one_step_equals_brute_force_over_every_merge_and_deletion():
    model = tiny_model("llama", seed=7)
    original = copy.deepcopy(model)
    layers = list(adapter_for(model.config).layers(original))
    # Brute force: every window with every ratio vector, every deletion, each scored as a whole model.
    ctx = CompressionContext(copy.deepcopy(original), None, adapter_for(model.config), TOKENS,
                             CompressionOptions(progress=False, batch_size=3, activation_dtype="float32", **EVERYTHING))
    bi = ctx.cache.block_influence()
    brute = []
    for start in range(5):
        for name, ratios in ratio_vectors(bi, start, 2, EVERYTHING["search_ratios"]):
            merged, _ = merge_with_ratios(ctx, start, 2, ratios)
            brute.append((("merge", start, name), _model_loss(_with_layers(original, layers[:start] + [merged] + layers[start + 2 :]))))
    for k in range(6):
        brute.append((("delete", k), _model_loss(_with_layers(original, layers[:k] + layers[k + 1 :]))))

    result = _search(model, 5, refit=False, **EVERYTHING)
    step = result.plan["steps"][0]
    scored = {(c["op"], c["window"][0], c["ratios"]) if c["op"] == "merge" else (c["op"], c["layer"]): c["loss"]
              for c in step["candidates"]}
    assert set(scored) == {key for key, _ in brute}
    for key, loss in brute:
        assert scored[key] == pytest.approx(loss, rel=1e-5), key
    best_key = min(brute, key=lambda item: item[1])[0]
    chosen = step["chosen"]
    chosen_key = (chosen["op"], chosen["window"][0], chosen["ratios"]) if chosen["op"] == "merge" else (chosen["op"], chosen["layer"])
    assert chosen_key == best_key
    # What was scored is what was applied.
    assert _model_loss(result.model) == pytest.approx(chosen["loss"], rel=1e-5)


@pytest.mark.parametrize("refit", [False, True])
def test_every_step_is_no_worse_than_the_best_deletion(refit):
    result = _search(tiny_model("llama", seed=8), 3, refit=refit, search_samples=SAMPLES)
    for step in result.plan["steps"]:
        losses = [c["loss"] for c in step["candidates"]]
        assert step["chosen"]["loss"] == min(losses) <= step["best_deletion_loss"]
        assert {c["op"] for c in step["candidates"]} == {"merge", "delete"}
        if refit:
            assert all("refit_error" in c for c in step["candidates"])
    # The last step's scored loss is the loss of the model written out (refits included).
    assert _model_loss(result.model) == pytest.approx(result.plan["steps"][-1]["chosen"]["loss"], rel=1e-5)
    assert sorted(c for layer in result.plan["layers"] for c in layer["covers"]) == list(range(6))


def test_default_never_merges_layer_zero_on_a_deep_model():
    """24 -> 13 layers removes 11 of 24: without re-merging, disjoint windows run out (the Qwen2 case)."""
    model = tiny_model("llama", seed=9, num_hidden_layers=24)
    tokens = tiny_tokens(nsamples=8, seqlen=32, seed=1)
    result = compress(LoadedModel(model, None, {}), target_layers=13, tokens=tokens, progress=False, batch_size=4)
    assert result.plan["method"] == "come-search" and result.plan["final_layers"] == 13
    assert not any(layer["merged"] and 0 in layer["covers"] for layer in result.plan["layers"])


@pytest.mark.parametrize("refit", [True, False])
def test_reusing_candidates_between_steps_changes_nothing(refit, monkeypatch):
    from come.methods.search import _Memo

    options = {"refit": refit, "search_samples": SAMPLES, "search_ratios": (0.5,), "search_windows": 4, "search_deletions": 4}
    memo_hits = []
    original_get = _Memo.get

    def counting_get(self, key, build):
        memo_hits.append(key in self.entries)
        return original_get(self, key, build)

    monkeypatch.setattr(_Memo, "get", counting_get)
    reused = _search(tiny_model("llama", seed=10, num_hidden_layers=8), 4, **options)
    assert any(memo_hits)  # the memo did serve candidates
    monkeypatch.setattr(_Memo, "get", lambda self, key, build: build())
    fresh = _search(tiny_model("llama", seed=10, num_hidden_layers=8), 4, **options)
    assert reused.plan["steps"] == fresh.plan["steps"] and reused.plan["layers"] == fresh.plan["layers"]
    a, b = reused.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _key(c):
    return (c["op"], c["window"][0], c["ratios"]) if c["op"] == "merge" else (c["op"], c["layer"])


def _first_step(**options):
    """The first step of a search of 8 sequences, batches of 2, taking an 8-layer model to 5 layers."""
    options = {"search_samples": 8, "search_windows": 4, "search_deletions": 4, **options}
    result = compress(LoadedModel(tiny_model("llama", seed=10, num_hidden_layers=8), None, {}), target_layers=5,
                      method="come-search", tokens=TOKENS, progress=False, batch_size=2, **options)
    return result.plan["steps"][0]


def test_the_finalists_screen_scores_the_n_best_of_the_screen_on_every_sequence_exactly():
    exact, short = _first_step(search_finalists=0), _first_step(search_samples=4, search_finalists=0)
    screened = _first_step(search_finalists=3, search_finalist_samples=4)
    candidates = screened["candidates"]
    assert [_key(c) for c in candidates] == [_key(c) for c in exact["candidates"]] and len(candidates) == 8
    # The screen's loss is the loss on its sequences; the finalists are its 3 lowest (ties: the earlier).
    assert [c["screen_loss"] for c in candidates] == [c["loss"] for c in short["candidates"]]
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i]["screen_loss"], i))
    finalists = sorted(order[:3])
    assert [i for i, c in enumerate(candidates) if c["loss"] is not None] == finalists
    # A split at a multiple of the batch size adds up to the float of one pass over all 8 sequences.
    for i in finalists:
        assert candidates[i]["loss"] == exact["candidates"][i]["loss"]
    best = min(finalists, key=lambda i: (candidates[i]["loss"], i))
    assert _key(screened["chosen"]) == _key(candidates[best])
    assert screened["best_deletion_loss"] == min((candidates[i]["loss"] for i in finalists
                                                  if candidates[i]["op"] == "delete"), default=None)
    # Enough finalists to hold the winner over all sequences: the pick is the unscreened one.
    winner = [_key(c) for c in exact["candidates"]].index(_key(exact["chosen"]))
    assert winner not in finalists  # this model's screen does change the pick at 3 finalists
    assert order.index(winner) + 1 < len(candidates)  # still a screen
    wider = _first_step(search_finalists=order.index(winner) + 1, search_finalist_samples=4)
    assert _key(wider["chosen"]) == _key(exact["chosen"])


def test_a_screen_that_keeps_every_candidate_or_every_sequence_is_no_screen():
    exact = _first_step(search_finalists=0)
    for options in ({"search_finalists": 8}, {"search_finalists": 2, "search_finalist_samples": 8}):
        assert _first_step(**options) == exact


@torch.no_grad()
@pytest.mark.parametrize("rank", ["error", "bi"])
def test_deletion_candidates_are_the_layers_of_lowest_skip_error_or_bi(rank):
    model = tiny_model("llama", seed=13, num_hidden_layers=8)  # a model where the two rankings differ
    # The original model's boundaries h_0..h_L (h_L before the final norm), from hooks on the layers.
    hidden = []
    layers = list(adapter_for(model.config).layers(model))
    hooks = [layer.register_forward_hook(lambda mod, args, out: hidden.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    hooks.append(layers[0].register_forward_pre_hook(lambda mod, args, kwargs: hidden.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True))
    model(input_ids=TOKENS, use_cache=False)
    for hook in hooks:
        hook.remove()
    h = hidden  # layer 0's input (its pre-hook fires first), then every layer's output
    expected = [float((h[k].double() - h[k + 1].double()).pow(2).sum() / h[k + 1].double().pow(2).sum()) for k in range(8)]

    result = _search(model, 7, refit=False, search_samples=SAMPLES, search_deletions=2, search_deletion_rank=rank)
    step = result.plan["steps"][0]
    assert step["skip_error"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    score = step["skip_error"] if rank == "error" else step["bi"]
    eligible = range(1, 8)  # protect_first=1 by default
    lowest = sorted(eligible, key=lambda k: (score[k], k))[:2]
    assert sorted(lowest) == ([6, 7] if rank == "error" else [5, 6])
    assert [c["layer"] for c in step["candidates"] if c["op"] == "delete"] == lowest


@torch.no_grad()
@pytest.mark.parametrize("rank", ["loss", "error+loss"])
def test_the_loss_screen_is_sleb_s_score_of_every_layer(rank):
    model = tiny_model("llama", seed=13, num_hidden_layers=8)
    layers = list(adapter_for(model.config).layers(copy.deepcopy(model)))
    # The screen: the loss on the first 2 sequences of the model without layer k, nothing refitted.
    ids = TOKENS[:2]
    brute = {k: _with_layers(model, layers[:k] + layers[k + 1:])(input_ids=ids, labels=ids, use_cache=False).loss.item()
             for k in range(1, 8)}  # layer 0 is protected
    result = _search(model, 7, refit=False, search_samples=SAMPLES, search_deletions=4, search_deletion_rank=rank,
                     search_screen_samples=2)
    step = result.plan["steps"][0]
    screen = {int(k): v for k, v in step["screen_loss"].items()}
    assert set(screen) == set(brute)
    for k, loss in brute.items():
        assert screen[k] == pytest.approx(loss, rel=1e-4), k
    by_loss = sorted(brute, key=lambda k: (screen[k], k))
    by_error = sorted(range(1, 8), key=lambda k: (step["skip_error"][k], k))
    expected = by_loss[:4] if rank == "loss" else list(dict.fromkeys(x for pair in zip(by_error, by_loss) for x in pair))[:4]
    assert [c["layer"] for c in step["candidates"] if c["op"] == "delete"] == expected


def test_an_unknown_deletion_rank_is_an_error():
    from come.errors import InvalidTarget

    with pytest.raises(InvalidTarget, match=re.escape("search-deletion-rank must be one of error | bi | loss | error+loss")):
        _search(tiny_model("llama", seed=11), 5, search_deletion_rank="random")


def test_a_candidate_whose_model_diverges_is_never_chosen_and_the_plan_stays_strict_json(monkeypatch):
    """A deletion that overflows (seen on Gemma-3-270M) gives a NaN loss; min() over a list starting
    with NaN would pick it. It scores +inf instead and the plan records null."""
    import json
    import math

    from come.core.scoring import BoundaryCache
    from come.outputs import json_text

    original, calls = BoundaryCache.run_through, []

    def run_through(self, start, stack, samples=None, skip=0):
        calls.append(start)
        for rows, x in original(self, start, stack, samples, skip):
            yield rows, (x * float("nan") if len(calls) == 1 else x)

    monkeypatch.setattr(BoundaryCache, "run_through", run_through)
    result = _search(tiny_model("llama", seed=8), 5, refit=False, search_samples=SAMPLES)
    step = result.plan["steps"][0]
    assert step["candidates"][0]["loss"] == math.inf
    assert step["chosen"] is not step["candidates"][0] and math.isfinite(step["chosen"]["loss"])
    text = json_text(result.plan)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["steps"][0]["candidates"][0]["loss"] is None


def test_come_search_calibrates_on_128_sequences_of_128_tokens_unless_told_otherwise():
    from come.engine.options import resolve_options
    from come.methods import method_defaults

    opts = resolve_options(method_defaults("come-search"), {"nsamples": None, "seqlen": None})
    assert (opts.nsamples, opts.seqlen, opts.search_samples) == (128, 128, 16)
    assert resolve_options(method_defaults("come-search"), {"nsamples": 32, "seqlen": 512}).seqlen == 512
    other = resolve_options(method_defaults("shortgpt"), {"nsamples": None, "seqlen": None})
    assert (other.nsamples, other.seqlen) == (32, 512)


# -- the default's plans, recorded once: a faster solve path must pick exactly the same ---------------
# The fixture holds {case: _default_plan(*PLAN_CASES[case])} as computed before that change; rewrite it
# only for a change meant to alter what the default picks.
PLANS_FIXTURE = Path(__file__).parents[1] / "fixtures" / "come_search_plans.json"
PLAN_CASES = {  # name: (family, model overrides)
    **{family: (family, {}) for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3")},
    # More FFN inputs (256) than fit rows (192): a singular Z^T Z, the damping alone makes it solvable.
    "llama-wide": ("llama", {"intermediate_size": 256}),
}


def _default_plan(family, overrides):
    """What the default without its finalists screen picks on an 8-layer tiny model taken to 4 layers: every step's candidates and
    choice, every candidate refit's damping (and its ranking of the grid), and the final layers
    (covers, kept channels, refits)."""
    from come.engine.pipeline import CompressionContext

    refits = []
    original = CompressionContext.refit_candidate

    def recording(self, *args, **kwargs):
        layer, record = original(self, *args, **kwargs)
        grid = record.get("held_out_errors", {})  # the grid ranked by held-out error, best first
        refits.append([record["covers"], record["applied"], record["damping"], sorted(grid, key=lambda d: (grid[d], -float(d)))])
        return layer, record

    CompressionContext.refit_candidate = recording
    try:
        model = tiny_model(family, seed=21, num_hidden_layers=8, **overrides)
        # Every candidate scored on every sequence and float32 activations, as when the plans were recorded
        # (the default's screen and bfloat16 activations came later and change picks or kept channels on these
        # tiny models: tests/test_plans.py records them).
        result = compress(LoadedModel(model, None, {}), target_layers=4, tokens=TOKENS, progress=False, batch_size=4,
                          search_finalists=0, activation_dtype="float32")
    finally:
        CompressionContext.refit_candidate = original

    def op(c):
        return [c["op"], c["window"] if c["op"] == "merge" else c["layer"], c["covers"]]

    def merge(m):
        return m and {"position": m["position"], "ratios": m.get("ratios"),
                      "sources": [[s["covers"], s["kv_groups"], s["neurons"]] for s in m["sources"]]}

    return {
        "steps": [{"candidates": [op(c) for c in s["candidates"]], "chosen": op(s["chosen"])} for s in result.plan["steps"]],
        "refits": refits,
        "layers": [{"covers": layer["covers"], "merged": layer["merged"], "merge": merge(layer["merge"]),
                    "refit": layer.get("refit") and [layer["refit"]["applied"], layer["refit"]["damping"]]}
                   for layer in result.plan["layers"]],
    }


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_the_default_picks_the_recorded_plan(case):
    """Plans recorded before the refit's damping search was made cheaper (one Cholesky solve per damping
    instead of an eigendecomposition, then a walk along the grid instead of scoring all of it): only the
    cost may change, never a merge, a deletion, a kept channel or a damping."""
    expected = json.loads(PLANS_FIXTURE.read_text())[case]
    actual = json.loads(json.dumps(_default_plan(*PLAN_CASES[case])))
    # The fixture ranks the whole damping grid; the default now walks the grid and scores part of it.
    # The values it scores must rank as they did, and the best of them must be the grid's best.
    assert len(actual["refits"]) == len(expected["refits"])
    for got, recorded in zip(actual["refits"], expected["refits"]):
        scored, ranking = got[3], recorded[3]
        assert scored and scored == [d for d in ranking if d in scored] and scored[0] == ranking[0]
        got[3] = ranking
    assert actual == expected


def test_the_default_keeps_bfloat16_activations_and_scores_as_float32_does():
    """come-search keeps its calibration boundaries in bfloat16 (half the memory; the scores are still
    computed in float32): every candidate's loss stays within bfloat16's rounding of the hidden states of
    the float32 cache's, and the step picks what float32 picks."""
    from come.engine.options import resolve_options
    from come.methods import method_defaults

    assert resolve_options(method_defaults("come-search"), {}).activation_dtype == "bfloat16"
    model = tiny_model("llama", seed=10)
    ctx = CompressionContext(model, None, adapter_for(model.config), TOKENS,
                             CompressionOptions(progress=False, batch_size=3, activation_dtype="bfloat16"))
    assert ctx.cache.boundary(3).dtype == torch.bfloat16
    runs = [_search(tiny_model("llama", seed=10, num_hidden_layers=8), 6, search_samples=SAMPLES, activation_dtype=dtype)
            for dtype in ("float32", "bfloat16")]
    assert [r.plan["options"]["activation_dtype"] for r in runs] == ["float32", "bfloat16"]
    for exact, rounded in zip(*(r.plan["steps"] for r in runs)):
        assert exact["chosen"]["covers"] == rounded["chosen"]["covers"]
        for a, b in zip(exact["candidates"], rounded["candidates"]):
            assert (a["loss"] is None) == (b["loss"] is None)
            if a["loss"] is not None:
                assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["loss"] != a["loss"]


def _off_on_and_auto(run, note, monkeypatch):
    """(off, on) runs of `run(mode)`, after checking that the plan notes the precision of each as `note` and that
    auto is on exactly where the device computes bfloat16 natively."""
    from come.engine import precision

    off, on = run("off"), run("on")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    native = run("auto")
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    emulated = run("auto")
    assert [r.plan["execution"][note] for r in (off, on, native, emulated)] == [
        "float32", "bfloat16 autocast", "bfloat16 autocast", "float32"]
    assert native.plan["steps"] == on.plan["steps"] and emulated.plan["steps"] == off.plan["steps"]
    return off, on


def test_candidate_losses_under_bfloat16_autocast_only_rank_and_the_plan_says_which_ran(monkeypatch):
    """`search_autocast`: on runs the candidates' loss passes in bfloat16 autocast, so their losses move by its
    rounding; merges, refits and the calibration pass stay float32, so with the same picks the model is
    bit-identical. auto is on exactly where the device computes bfloat16 natively."""
    def run(mode):  # the layer passes in float32 whatever the device (`autocast`: the next test)
        return _search(tiny_model("llama", seed=10, num_hidden_layers=8), 6, search_samples=SAMPLES, search_autocast=mode,
                       autocast="off")

    off, on = _off_on_and_auto(run, "search_loss_precision", monkeypatch)
    for exact, rounded in zip(off.plan["steps"], on.plan["steps"]):
        assert exact["chosen"]["covers"] == rounded["chosen"]["covers"]
        for a, b in zip(exact["candidates"], rounded["candidates"]):
            if a["loss"] is not None:
                assert b["loss"] == pytest.approx(a["loss"], rel=2e-2) and b["loss"] != a["loss"]
    for name, tensor in off.model.state_dict().items():
        assert torch.equal(tensor, on.model.state_dict()[name]), name


@pytest.mark.parametrize(("family", "seed"), [("llama", 10), ("gemma3", 1)])  # gemma3: a merge with output norms
def test_layer_passes_under_bfloat16_autocast_and_the_plan_says_which_ran(family, seed, monkeypatch):
    """`autocast`: on runs the boundary passes and the refit statistics' layer passes in bfloat16 autocast, so
    every activation the search reads moves by its rounding: the losses move, the weights move a little, and on
    this model the picks stay. auto is on exactly where the device computes bfloat16 natively."""
    def run(mode):  # candidate losses in float32: only the layer passes differ
        return _search(tiny_model(family, seed=seed, num_hidden_layers=8), 6, search_samples=SAMPLES, autocast=mode,
                       search_autocast="off")

    off, on = _off_on_and_auto(run, "layer_pass_precision", monkeypatch)
    moved = []
    for exact, rounded in zip(off.plan["steps"], on.plan["steps"]):
        assert exact["chosen"]["covers"] == rounded["chosen"]["covers"]
        for a, b in zip(exact["candidates"], rounded["candidates"]):
            if a["loss"] is not None:
                assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
                moved.append(b["loss"] != a["loss"])
    # A candidate run from the embeddings through an unrefitted layer reads nothing a layer pass made.
    assert sum(moved) >= len(moved) - 2 > 0
    exact, rounded = off.model.state_dict(), on.model.state_dict()
    assert not all(torch.equal(tensor, rounded[name]) for name, tensor in exact.items())
    for name, tensor in exact.items():  # within bfloat16's rounding of the tensor's scale
        assert (rounded[name] - tensor).abs().max() <= 0.02 * tensor.abs().max() + 1e-3, name
    with torch.no_grad():
        log_probs = [r.model(TOKENS).logits.log_softmax(-1) for r in (off, on)]
    assert (log_probs[0] - log_probs[1]).abs().max() < 0.05
