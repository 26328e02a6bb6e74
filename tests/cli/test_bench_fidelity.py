"""KL to the dense model and skill above chance in `come bench` and `come eval`."""

import json

import pytest
from typer.testing import CliRunner

from come.cli import app
from come.cli.bench import add_skill
from come.evaluation.evaluate import CHANCE, skill_above_chance
from tests.helpers import without_walks

runner = CliRunner()


def test_skill_above_chance_counts_only_tasks_where_the_reference_is_clearly_above_chance():
    reference = {"arc_easy": (0.55, 0.03), "piqa": (0.65, 0.03), "boolq": (0.41, 0.03), "arc_challenge": (0.27, 0.026)}
    out = skill_above_chance({"arc_easy": 0.40, "piqa": 0.60, "boolq": 0.62, "arc_challenge": 0.20}, reference)
    assert out["tasks"]["arc_easy"] == {"chance": 0.25, "skill": pytest.approx(0.15), "reference_skill": pytest.approx(0.30)}
    # boolq below chance and arc_challenge within two stderrs of it are not counted, whatever the model scores there
    assert out["counted"] == ["arc_easy", "piqa"]
    assert out["skill_kept"] == pytest.approx((0.15 + 0.10) / (0.30 + 0.15))
    assert skill_above_chance({"piqa": 0.5})["tasks"]["piqa"]["skill"] == 0.0 and "skill_kept" not in skill_above_chance({"piqa": 0.5})
    assert skill_above_chance({"piqa": 0.6}, {"piqa": (0.5, 0.01)})["skill_kept"] is None  # nothing to keep


def test_bench_rows_get_skill_kept_from_the_dense_row():
    dense = {"method": "dense", **{t: CHANCE[t] + 0.2 for t in CHANCE}, **{f"{t}_stderr": 0.02 for t in CHANCE}}
    half = {"method": "x", **{t: CHANCE[t] + 0.1 for t in CHANCE}}
    rows = [dense, half, {"method": "y", "error": "failed"}]
    add_skill(rows)
    assert half["skill_kept"] == pytest.approx(0.5) and "skill_kept" not in dense and "skill_kept" not in rows[2]


def _record_methods(monkeypatch) -> list:
    """The `method` of every compress() call from now on (bench calls it as come.engine.pipeline.compress)."""
    import come.engine.pipeline

    methods = []
    real = come.engine.pipeline.compress
    monkeypatch.setattr(come.engine.pipeline, "compress", lambda *a, **k: methods.append(k["method"]) or real(*a, **k))
    return methods


@pytest.mark.parametrize("method", ["come", "come-search"])
def test_bench_measures_kl_and_fills_it_into_cells_scored_without_it(tiny_dir, tmp_path, monkeypatch, method):
    out = tmp_path / "bench"
    args = ["bench", str(tiny_dir), "--out", str(out), "--methods", f"dense,{method}", "--ratios", "0.28", "--ppl",
            "wikipedia", "--ppl-max-tokens", "256", "--seqlen", "32", "--tasks", "none", "--nsamples", "4", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cell_file = out / "cells" / f"{method}-r0.28.json"
    cell = json.loads(cell_file.read_text())
    kl, top1 = cell["row"]["kl_wikipedia"], cell["row"]["top1_wikipedia"]
    assert kl > 0 and 0 <= top1 <= 1 and cell["evaluation"]["fidelity"]["wikipedia"]["kl"] == kl
    assert "kl_wikipedia" not in json.loads((out / "cells" / "dense.json").read_text())["row"]
    header = (out / "results.md").read_text().split("| method |")[1].split("\n")[0]
    assert header.index("ppl_wikipedia") < header.index("kl_wikipedia") < header.index("top1_wikipedia")
    assert f"lowest wikipedia KL to dense: **{method}**" in (out / "results.md").read_text()

    # A cell scored before KL existed: same settings, no fidelity. Plain runs leave it alone...
    old = json.loads(cell_file.read_text())
    del old["evaluation"]["fidelity"], old["row"]["kl_wikipedia"], old["row"]["top1_wikipedia"]
    cell_file.write_text(json.dumps(old))
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("skipped") == 2
    assert "kl_wikipedia" not in json.loads(cell_file.read_text())["row"]
    # ...--fill-kl rebuilds its model (by replaying its plan's steps, not by searching again) and adds the same
    # KL, the rest of the cell untouched.
    methods = _record_methods(monkeypatch)
    filled = runner.invoke(app, [*args, "--fill-kl"])
    assert filled.exit_code == 0, filled.output
    assert methods == ["replay"] and not list((out / "models").glob("*.replay.json"))
    cell = json.loads(cell_file.read_text())
    assert cell["row"]["kl_wikipedia"] == pytest.approx(kl, rel=1e-5) and cell["row"]["top1_wikipedia"] == pytest.approx(top1)
    assert {k: v for k, v in cell["row"].items() if not k.startswith(("kl_", "top1_"))} == old["row"]

    # A cell whose recorded plan is not what its settings make is refused, not filled with another model's KL.
    del cell["evaluation"]["fidelity"]
    cell["plan_layers"][0]["covers"] = [99]
    cell_file.write_text(json.dumps(cell))
    bad = runner.invoke(app, [*args, "--fill-kl"])
    assert bad.exit_code == 2 and "plan differs from the recorded one" in bad.output


def test_fill_kl_replays_a_deletion_only_plan_with_drop(tiny_dir, tmp_path, monkeypatch):
    """A cell whose plan only deletes layers gets its model back from `drop` (no search rerun), with the
    same KL as when the cell was made; the recorded perplexity still guards that it is the same model."""
    out = tmp_path / "bench"
    args = ["bench", str(tiny_dir), "--out", str(out), "--methods", "dense,shortgpt", "--ratios", "0.28", "--ppl",
            "wikipedia", "--ppl-max-tokens", "256", "--seqlen", "32", "--tasks", "none", "--nsamples", "4", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    cell_file = out / "cells" / "shortgpt-r0.28.json"
    made = json.loads(cell_file.read_text())
    assert any(len(layer["covers"]) > 1 for layer in made.get("plan_layers", [])), made["row"]  # it deleted layers
    kl = made["row"]["kl_wikipedia"]
    old = json.loads(cell_file.read_text())
    del old["evaluation"]["fidelity"], old["row"]["kl_wikipedia"], old["row"]["top1_wikipedia"]
    cell_file.write_text(json.dumps(old))

    methods = _record_methods(monkeypatch)
    filled = runner.invoke(app, [*args, "--fill-kl"])
    assert filled.exit_code == 0, filled.output
    assert methods == ["drop"]
    assert json.loads(cell_file.read_text())["row"]["kl_wikipedia"] == pytest.approx(kl, rel=1e-5)

    # A wrong recorded perplexity (another model) is refused, not filled.
    old["row"]["ppl_wikipedia"] *= 1.5
    cell_file.write_text(json.dumps(old))
    bad = runner.invoke(app, [*args, "--fill-kl"])
    assert bad.exit_code == 2 and "perplexity" in bad.output


def test_plans_are_compared_exactly_in_structure_and_to_1e_4_in_fit_errors():
    from come.cli.bench import _same_plan

    layer = {"covers": [3, 4], "merge": {"kept": [1, 5, 7]}, "refit": {"error_after": 0.30546702378614204}}
    assert _same_plan([layer], [{**layer, "refit": {"error_after": 0.305467023786}}])
    assert not _same_plan([layer], [{**layer, "refit": {"error_after": 0.3058}}])
    assert not _same_plan([layer], [{**layer, "covers": [3, 5]}])
    assert not _same_plan([layer], [{**layer, "merge": {"kept": [1, 5, 8]}}])
    assert not _same_plan([layer], [layer, layer]) and not _same_plan({"a": 1}, {"a": 1, "b": 2})
    assert not _same_plan([{"covers": [1]}], [{"covers": [1.0]}])
    from come.cli.bench import _first_difference

    assert _first_difference([layer], [{**layer, "merge": {"kept": [1, 5, 8]}}]) == "layers[0].merge.kept[2]: 7 recorded, 8 now"
    assert _first_difference([layer], [{**layer, "new": 1}]) == "layers[0]: keys [] recorded only, ['new'] now only"
    # The check compares what the plan says of the model: spans, merges, refit choices; not fit-error records.
    from come.cli.bench import _plan_identity

    refit = {"applied": True, "damping": 0.1, "error_after": 0.3}
    base = [{"covers": [3, 4], "position_of": 3, "merged": True, "merge": {"kept": [1]}, "refit": refit}]
    assert _same_plan(_plan_identity(base), _plan_identity([{**base[0], "transform": {"error_after": 0.2},
                                                             "refit": {**refit, "error_after": 0.4, "rows": 8}}]))
    assert not _same_plan(_plan_identity(base), _plan_identity([{**base[0], "refit": {**refit, "damping": 1.0}}]))
    # A cell recorded before merges noted their position: the rebuilt plan may hold more keys, not fewer.
    newer = [{**base[0], "merge": {"kept": [1], "position": 0}}]
    assert _same_plan(_plan_identity(base), _plan_identity(newer), newer_keys=True)
    assert not _same_plan(_plan_identity(newer), _plan_identity(base), newer_keys=True)
    assert not _same_plan(_plan_identity(base), _plan_identity(newer))


def test_only_plans_that_delete_and_change_no_weight_are_replayed():
    from come.cli.bench import _deleted_layers

    kept = {"merged": False, "merge": None}
    deletion = [{"index": 0, "covers": [0, 1], "position_of": 0, **kept}, {"index": 1, "covers": [2], "position_of": 2, **kept}]
    assert _deleted_layers({"plan_layers": deletion}, {}) == [1]
    assert _deleted_layers({"plan_layers": deletion}, {"refit": True}) is None
    transformed = [{**deletion[0], "transform": {"rule": "replaceme"}}, deletion[1]]  # ReplaceMe's linear map
    assert _deleted_layers({"plan_layers": transformed}, {}) is None
    merged = [{**deletion[0], "merged": True, "merge": {"sources": []}}, deletion[1]]
    assert _deleted_layers({"plan_layers": merged}, {}) is None


def test_only_come_search_and_come_plans_in_a_form_replay_reads_are_replayed():
    from come.cli.bench import _replay_plan

    layers = [{"covers": [0]}, {"covers": [1, 2]}]
    search = {"plan_steps": [{"step": 0, "chosen": {"op": "delete", "layer": 2}}], "plan_layers": layers}
    plan = _replay_plan(search, "come-search", {"refit": True})
    assert plan == {"method": "come-search", "steps": search["plan_steps"], "options": {"refit": True}, "final_layers": 2}
    assert _replay_plan({"plan_steps": [{"step": 0, "window": [1, 2]}], "plan_layers": layers}, "come", {})["method"] == "come"
    assert _replay_plan(search, "shortgpt", {}) is None  # not a method replay reads (drop serves deletions)
    assert _replay_plan({"plan_steps": [{"step": 0, "removed": [2]}], "plan_layers": layers}, "come-search", {}) is None
    assert _replay_plan({"plan_layers": layers}, "come-search", {}) is None  # no recorded steps: search again


def test_distilled_cell_rebuilds_its_finished_plain_cells_model_instead_of_searching(tiny_dir, tmp_path, monkeypatch):
    """A +distill cell added after its plain cell finished (its model not kept) gets that model back by replaying
    the recorded plan (`replay`, or `drop` for a deletion-only plan): the same distilled result as a grid that
    kept the model, without a second search; a plain cell whose plan is not what its settings make is not used."""
    common = ["--ratios", "0.28", "--ppl", "wikipedia", "--ppl-max-tokens", "128", "--seqlen", "32", "--tasks",
              "none", "--nsamples", "4", "-q"]
    distill = ["--distill", "come-search,shortgpt", "--distill-set", "tokens=128", "--distill-set", "seqlen=32",
               "--distill-set", "batch_size=2",
               "--distill-set", "eval_every=0", "--distill-set", "heldout_tokens=64"]
    together, later = tmp_path / "together", tmp_path / "later"
    methods_flag = ["--methods", "come-search,shortgpt"]
    assert runner.invoke(app, ["bench", str(tiny_dir), "--out", str(together), *methods_flag, *common, *distill]).exit_code == 0
    assert runner.invoke(app, ["bench", str(tiny_dir), "--out", str(later), *methods_flag, *common]).exit_code == 0

    methods = _record_methods(monkeypatch)
    result = runner.invoke(app, ["bench", str(tiny_dir), "--out", str(later), *methods_flag, *common, *distill])
    assert result.exit_code == 0, result.output
    assert methods == ["replay", "drop"] and result.output.count("skipped") == 2
    for label in ("come-search", "shortgpt"):
        plain = json.loads((later / "cells" / f"{label}-r0.28.json").read_text())["row"]
        rebuilt = json.loads((later / "cells" / f"{label}+distill-r0.28.json").read_text())
        kept = json.loads((together / "cells" / f"{label}+distill-r0.28.json").read_text())
        assert rebuilt["row"]["compress_seconds"] == plain["compress_seconds"]  # what making the model cost
        assert without_walks(rebuilt["plan_layers"]) == without_walks(kept["plan_layers"])
        assert rebuilt["row"]["ppl_wikipedia"] == pytest.approx(kept["row"]["ppl_wikipedia"], rel=1e-6)
        assert rebuilt["row"]["kl_wikipedia"] == pytest.approx(kept["row"]["kl_wikipedia"], rel=1e-5)

    # A plain cell whose recorded plan its settings do not make: compressed again instead, with a line saying so.
    plain_file = later / "cells" / "come-search-r0.28.json"
    plain = json.loads(plain_file.read_text())
    plain["plan_layers"][0]["covers"] = [99]
    plain_file.write_text(json.dumps(plain))
    (later / "cells" / "come-search+distill-r0.28.json").unlink()
    methods.clear()
    again = runner.invoke(app, ["bench", str(tiny_dir), "--out", str(later), *methods_flag, *common, *distill])
    assert again.exit_code == 0, again.output
    assert methods == ["replay", "come-search"] and "compressing instead" in again.output
    redone = json.loads((later / "cells" / "come-search+distill-r0.28.json").read_text())["row"]
    assert redone["ppl_wikipedia"] == pytest.approx(
        json.loads((together / "cells" / "come-search+distill-r0.28.json").read_text())["row"]["ppl_wikipedia"], rel=1e-6)
