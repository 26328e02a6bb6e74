"""replay: the steps of a recorded come-search or CoMe plan, applied without the search, give the same model."""

import copy
import json

import pytest
import torch

from come.engine.models import LoadedModel
from come.engine.pipeline import compress
from come.errors import MergeError
from come.testing import tiny_model, tiny_tokens
from tests.helpers import assert_error_line, compress_cli, runner, without_walks

TOKENS = tiny_tokens(nsamples=8, seqlen=32)
# Many candidates and ratio rules, so that plans mix merges (with the BI rule and a share rule) and deletions.
SEARCH = {"search_windows": 4, "search_deletions": 4, "search_ratios": (0.25, 0.75), "search_samples": 4,
          "protect_first": 0}


def _compress(model, target, method, **options):
    return compress(LoadedModel(copy.deepcopy(model), None, {}), target_layers=target, method=method, tokens=TOKENS,
                    progress=False, batch_size=3, **options)


def _plan_file(tmp_path, plan):
    path = tmp_path / "come_plan.json"
    path.write_text(json.dumps(plan))
    return path


def _assert_same_model(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert without_walks(json.loads(json.dumps(a.plan["layers"]))) == without_walks(json.loads(json.dumps(b.plan["layers"])))


@pytest.mark.parametrize(("family", "seed", "refit"), [("llama", 7, True), ("llama", 3, False), ("gemma3", 1, True)])
def test_replayed_come_search_plan_gives_the_same_model(family, seed, refit, tmp_path):
    model = tiny_model(family, seed=seed, num_hidden_layers=8)
    searched = _compress(model, 3, "come-search", refit=refit, **SEARCH)
    ops = [s["chosen"]["op"] for s in searched.plan["steps"]]
    replayed = _compress(model, 3, "replay", replay_plan=str(_plan_file(tmp_path, searched.plan)))
    _assert_same_model(searched, replayed)
    assert [s["replayed"]["op"] for s in replayed.plan["steps"]] == ops
    # Only the chosen operations ran: fewer layer passes than the search's.
    assert replayed.plan["execution"]["layer_passes"] < searched.plan["execution"]["layer_passes"]


def test_a_replayed_plan_replays_to_the_same_model_in_layerwise_mode_too(tmp_path):
    model = tiny_model("llama", seed=7, num_hidden_layers=8)
    searched = _compress(model, 4, "come-search", **SEARCH)
    first = _compress(model, 4, "replay", replay_plan=str(_plan_file(tmp_path, searched.plan)))
    assert first.plan["method"] == "replay"
    (tmp_path / "again").mkdir()
    second = _compress(model, 4, "replay", replay_plan=str(_plan_file(tmp_path / "again", first.plan)))
    _assert_same_model(searched, second)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    layerwise = compress(str(folder), target_layers=4, method="replay", tokens=TOKENS, progress=False, batch_size=3,
                         layerwise=True, out=tmp_path / "out", replay_plan=str(_plan_file(tmp_path, searched.plan)))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")
    expected = searched.model.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert without_walks(json.loads(json.dumps(layerwise.plan["layers"]))) == without_walks(json.loads(json.dumps(searched.plan["layers"])))


def test_the_search_tests_cover_both_operations():
    """The parametrised plans above mix merges and deletions (else the replay test would not cover both)."""
    ops = set()
    for family, seed, refit in [("llama", 7, True), ("llama", 3, False), ("gemma3", 1, True)]:
        plan = _compress(tiny_model(family, seed=seed, num_hidden_layers=8), 3, "come-search", refit=refit,
                         **SEARCH).plan
        ops |= {(s["chosen"]["op"], s["chosen"].get("ratios", "")) for s in plan["steps"]}
    assert {op for op, _ in ops} == {"merge", "delete"}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_replayed_come_plan_gives_the_same_model(family, tmp_path):
    model = tiny_model(family, seed=2, num_hidden_layers=8)
    merged = _compress(model, 4, "come", allow_remerge=True)
    replayed = _compress(model, 4, "replay", allow_remerge=True, replay_plan=str(_plan_file(tmp_path, merged.plan)))
    _assert_same_model(merged, replayed)


def test_replay_refuses_what_it_cannot_apply_faithfully(tmp_path):
    model = tiny_model("llama", seed=7, num_hidden_layers=8)
    plan = _compress(model, 4, "come-search", **SEARCH).plan
    path = _plan_file(tmp_path, plan)
    with pytest.raises(MergeError, match="needs --replay-plan"):
        _compress(model, 4, "replay")
    with pytest.raises(MergeError, match="pass --target-layers 4"):
        _compress(model, 5, "replay", replay_plan=str(path))
    with pytest.raises(MergeError, match="other options .*--refit true"):
        _compress(model, 4, "replay", refit=False, replay_plan=str(path))
    with pytest.raises(MergeError, match="model of 8 layers"):
        _compress(tiny_model("llama", num_hidden_layers=6), 2, "replay", replay_plan=str(path))
    dropped = _compress(model, 6, "shortgpt").plan
    with pytest.raises(MergeError, match="use --method drop"):
        _compress(model, 6, "replay", replay_plan=str(_plan_file(tmp_path / "..", dropped)))
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(MergeError, match="not a come plan"):
        _compress(model, 4, "replay", replay_plan=str(tmp_path / "junk.json"))


def test_cli_replays_a_compressed_folder(tiny_dir, tmp_path):
    from come.cli import app

    assert compress_cli(tiny_dir, "--target-layers", "4", "--out", tmp_path / "searched").exit_code == 0
    result = compress_cli(tiny_dir, "--method", "replay", "--replay-plan", tmp_path / "searched", "--target-layers",
                          "4", "--out", tmp_path / "replayed")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "searched" / "model.safetensors"), load_file(tmp_path / "replayed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = runner.invoke(app, ["compress", str(tiny_dir), "--method", "replay", "--replay-plan", str(tmp_path / "searched"),
                              "--target-layers", "4", "--nsamples", "5", "--seqlen", "32", "--out", str(tmp_path / "x"),
                              "-q"])
    assert_error_line(bad, "--nsamples 4")
    assert not (tmp_path / "x").exists()


def test_resolved_options_of_replay_take_the_plans(tmp_path):
    """What a bench cell of `replay` is keyed by (and runs with): the plan's calibration and refit options."""
    from come.engine.options import resolved_for

    plan = {"method": "come-search", "steps": [], "options": {"refit": True, "nsamples": 128, "seqlen": 128}}
    path = _plan_file(tmp_path, plan)
    resolved = resolved_for("replay", {"replay_plan": str(path)})
    assert resolved["refit"] is True and resolved["nsamples"] == 128 and resolved["replay_plan"] == str(path)
    with pytest.raises(MergeError, match="--nsamples 128"):
        resolved_for("replay", {"replay_plan": str(path), "nsamples": 32})


def test_a_replay_computes_in_the_precision_the_plan_ran_in(tmp_path):
    """A plan made with `autocast: auto` records what auto meant there (its execution record): a replay takes that,
    not what auto means on the replaying device."""
    from come.engine.options import resolved_for

    for ran, expected in (("bfloat16 autocast", "on"), ("float32", "off")):
        plan = {"method": "come-search", "steps": [], "options": {"autocast": "auto"},
                "execution": {"layer_pass_precision": ran}}
        path = _plan_file(tmp_path, plan)
        assert resolved_for("replay", {"replay_plan": str(path)})["autocast"] == expected
    with pytest.raises(MergeError, match="--autocast off"):
        resolved_for("replay", {"replay_plan": str(path), "autocast": "on"})
