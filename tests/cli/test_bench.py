"""`come bench` on a tiny model: every cell, resumability, tables and plot."""

import json

import pytest
from typer.testing import CliRunner

from come.cli import app
from tests.helpers import assert_error_line

runner = CliRunner()


def test_bench_runs_cells_and_resumes(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench", str(tiny_dir), "--out", str(out), "--methods", "dense,come,shortgpt,laco,shortgpt+refit:shortgpt", "--ratios", "0.14,0.28",  # one layer is ~14% of this tiny model
        "--ppl", "wikipedia", "--ppl-max-tokens", "256", "--seqlen", "32", "--tasks", "none", "--nsamples", "4",
        "--set", "laco.merge_size=3", "--set", "shortgpt+refit.refit=true", "-q",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(p.read_text())["row"] for p in sorted((out / "cells").glob("*.json"))]
    assert len(rows) == 1 + 4 * 2
    assert {r["method"] for r in rows} == {"dense", "come", "shortgpt", "laco", "shortgpt+refit"}
    # A labelled variant runs its base method with its own options.
    variant = json.loads((out / "cells" / "shortgpt+refit-r0.28.json").read_text())
    assert variant["settings"]["method"] == "shortgpt" and variant["settings"]["options"]["refit"] is True
    assert all("refit" in layer for layer in variant["plan_layers"] if len(layer["covers"]) > 1)
    assert all(r["layer_passes"] > 0 for r in rows if r["method"] != "dense")
    assert all(r.get("ppl_wikipedia", 0) > 1 for r in rows)
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + 9 and (out / "results.md").is_file() and (out / "results.png").stat().st_size > 0
    assert not (out / "models").exists() or not any((out / "models").iterdir())

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("skipped") == 9
    table = (out / "results.md").read_text()
    assert "Partial table" not in table and "- ratio 0.28 (4 methods): lowest wikipedia perplexity: **" in table

    # --report-only computes nothing: the cells of a new method are listed as not run.
    only = runner.invoke(app, ["bench", str(tiny_dir), "--out", str(out), "--methods", "dense,come,sleb", "--ratios",
                               "0.14,0.28", "--ppl", "wikipedia", "--ppl-max-tokens", "256", "--seqlen", "32",
                               "--tasks", "none", "--nsamples", "4", "--report-only", "-q"])
    assert only.exit_code == 0, only.output
    assert not list((out / "cells").glob("sleb-*")) and "[bench] sleb" not in only.output
    table = (out / "results.md").read_text()
    assert "**Partial table**: 2 cell(s) of the command not run yet: sleb-r0.14, sleb-r0.28." in table
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 3

    bad = runner.invoke(app, ["bench", str(tiny_dir), "--out", str(out), "--set", "laco.nope=1"])
    assert_error_line(bad, "unknown option 'nope'")


def test_bench_distilled_cells_reuse_the_compressed_model(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench", str(tiny_dir), "--out", str(out), "--methods", "come,shortgpt", "--ratios", "0.28",
        "--ppl", "wikipedia", "--ppl-max-tokens", "128", "--seqlen", "32", "--tasks", "none", "--nsamples", "4",
        "--distill", "come,shortgpt", "--distill-set", "tokens=256", "--distill-set", "global_steps=1",
        "--distill-set", "batch_size=2", "-q",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("[bench]") == 4  # two plain cells, two distilled ones, nothing compressed twice
    for label in ("come", "shortgpt"):
        cell = json.loads((out / "cells" / f"{label}+distill-r0.28.json").read_text())
        assert cell["row"]["method"] == f"{label}+distill" and cell["row"]["compress_seconds"] is None
        assert cell["row"]["distill_seconds"] > 0 and cell["settings"]["distill"]["global_steps"] == 1
    assert not (out / "models").exists() or not any((out / "models").iterdir())
    bad = runner.invoke(app, [*args[:-1], "--distill", "laco"])
    assert bad.exit_code == 2 and "not in --methods" in bad.output


def test_bench_scripts_write_their_results_with_the_command_that_made_them(tmp_path, monkeypatch):
    """bench/_results.py: the one writer behind every bench script's Markdown/CSV/JSON."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_results", Path(__file__).parents[2] / "bench" / "_results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    monkeypatch.setattr(sys, "argv", ["/somewhere/bench/cost_smollm2.py", "--ratio", "0.3", "--note", "two words"])
    assert results.command_line() == "python bench/cost_smollm2.py --ratio 0.3 --note 'two words'"
    assert "torch" in results.machine() and "4 threads" in results.machine(4, llama_cpp_python="0.3")
    out = tmp_path / "deep" / "cost"
    results.write(out, ["# t", "| a |"], rows=[{"a": 1, "b": 2}], data={"ratio": 2.5})
    assert (tmp_path / "deep" / "cost.md").read_text() == "# t\n| a |\n"
    assert (tmp_path / "deep" / "cost.csv").read_text().splitlines() == ["a,b", "1,2"]
    assert json.loads((tmp_path / "deep" / "cost.json").read_text()) == {"ratio": 2.5}


def test_paired_difference_is_the_mean_and_standard_error_of_per_document_differences():
    import math

    from come.cli.bench import paired_difference, paired_lines

    a = {"t1": [1, 1, 0, 1], "t2": [0, 1, 1, 1, 0, 1]}
    b = {"t1": [1, 0, 0, 0], "t2": [0, 1, 0, 1, 1, 1]}
    # t1: d = [0, 1, 0, 1], mean 0.5, var 1/3; t2: d = [0, 0, 1, 0, -1, 0], mean 0, var 0.4.
    mean, se = paired_difference(a, b)
    assert math.isclose(mean, (0.5 + 0.0) / 2)
    assert math.isclose(se, math.sqrt((1 / 3) / 4 + 0.4 / 6) / 2)
    # Identical answers: no difference and no uncertainty, however uncertain each score is alone.
    assert paired_difference(a, a) == (0.0, 0.0)
    # Different documents or tasks cannot be paired.
    assert paired_difference(a, {"t1": b["t1"]}) is None
    assert paired_difference(a, {"t1": b["t1"][:3], "t2": b["t2"]}) is None

    rows = [{"method": "x", "ratio": 0.2, "avg_acc": 0.6}, {"method": "y", "ratio": 0.2, "avg_acc": 0.4},
            {"method": "z", "ratio": 0.2, "avg_acc": 0.5}]
    lines = paired_lines(rows, {("x", 0.2): a, ("y", 0.2): b})  # z has no per-document scores
    assert lines == [f"- ratio 0.2, minus **x**: y {-mean:+.4f} ± {se:.4f}"]


def test_bench_table_lists_paired_differences(tmp_path):
    from come.cli.bench import write_tables

    rows = [{"method": "x", "ratio": 0.2, "avg_acc": 0.6}, {"method": "y", "ratio": 0.2, "avg_acc": 0.4}]
    per_doc = {("x", 0.2): {"t": [1.0, 1.0, 0.0]}, ("y", 0.2): {"t": [0.0, 1.0, 0.0]}}
    write_tables(rows, tmp_path, {}, "cmd", per_doc=per_doc)
    table = (tmp_path / "results.md").read_text()
    assert "Paired differences of average accuracy" in table and "- ratio 0.2, minus **x**: y -0.3333 ± 0.3333" in table


def test_a_method_entry_can_be_limited_to_some_ratios(tiny_dir, tmp_path):
    from come.cli.bench import parse_method_spec

    assert parse_method_spec("sleb-layers:drop@0.2") == ("sleb-layers", "drop", {0.2})
    assert parse_method_spec("sleb-layers:drop@0.1/0.3").ratios == {0.1, 0.3}
    assert parse_method_spec("drop") == ("drop", "drop", None)
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", str(tiny_dir), "--out", str(out), "--methods", "dense,shortgpt,x:drop@0.28",
                                 "--ratios", "0.14,0.28", "--tasks", "none", "--set", "x.drop_layers=[1]",
                                 "--report-only", "-q"])
    assert result.exit_code == 0, result.output
    table = (out / "results.md").read_text()
    assert "not run yet: dense, shortgpt-r0.14, shortgpt-r0.28, x-r0.28." in table
    bad = runner.invoke(app, ["bench", str(tiny_dir), "--out", str(out), "--methods", "dense,x:drop@a", "--tasks", "none"])
    assert_error_line(bad, "after @ must be numbers")


def test_cells_are_keyed_by_the_options_their_method_runs_with(monkeypatch):
    """A cell's key is its method's resolved options: a changed default of that method changes it, another
    method's does not; an override equal to the default changes nothing."""
    import dataclasses

    from come.cli.bench import cell_options
    from come.methods import get_spec, specs

    search, shortgpt = cell_options("come-search", {}), cell_options("shortgpt", {})
    assert (search["nsamples"], search["seqlen"], search["search_samples"], search["refit"]) == (128, 128, 16, True)
    assert "search_windows" in search and "granularity" not in search and "search_windows" not in shortgpt
    assert "seed" not in search and "progress" not in search  # the grid's
    assert cell_options("come-search", {"nsamples": 128}) == search
    assert cell_options("come-search", {"granularity": 5}) == search  # come-p's option: no effect here

    spec = get_spec("come-search")
    changed = dataclasses.replace(spec, defaults={**spec.defaults, "search_samples": 8})
    monkeypatch.setattr("come.methods._REGISTRY", {s.name: (changed if s is spec else s) for s in specs()})
    assert cell_options("come-search", {})["search_samples"] == 8 and cell_options("shortgpt", {}) == shortgpt


def test_old_cells_migrate_to_resolved_options_and_stay_valid(tmp_path):
    """Cells written when a cell was keyed by the user's overrides (grid-wide calibration for every method,
    --set for its own) are read in today's form: the committed tables reproduce with --report-only."""
    from come.cli.bench import cell_options, migrate_settings
    from come.distill.options import DistillOptions

    grid = {"model": None, "ppl": ["wikipedia"], "tasks": [], "limit": None, "ppl_max_tokens": 256, "seqlen": 512,
            "seed": 0}
    old = {**grid, "compress_options": {"nsamples": 32, "seqlen": 512, "search_samples": None, "granularity": 20},
           "method_options": {"search_samples": 4}, "base_method": "come-search"}
    new = migrate_settings(old, "come-search-512")
    # made before come-search's finalists screen: every candidate scored, whatever today's default
    assert new == {**grid, "method": "come-search",
                   "options": cell_options("come-search", {"nsamples": 32, "seqlen": 512, "search_samples": 4,
                                                           "search_finalists": 0, "search_autocast": "off",
                                                           "autocast": "off"})}
    assert cell_options("come-search", {})["search_finalists"] != 0
    assert cell_options("come-search", {})["search_autocast"] == "auto" == cell_options("come-search", {})["autocast"]
    assert migrate_settings(new, "come-search-512") == new
    before_screen = {k: v for k, v in new["options"].items() if not k.startswith("search_finalist")
                     and k not in ("search_autocast", "autocast")}
    assert migrate_settings({**new, "options": before_screen}, "come-search-512") == new
    shortgpt = {**grid, "method": "shortgpt", "options": cell_options("shortgpt", {})}
    assert migrate_settings(shortgpt, "shortgpt") == shortgpt  # an option it does not read is not added
    assert migrate_settings({**grid, "compress_options": {}, "method_options": {}}, "dense") == grid
    distilled = migrate_settings({**old, "distill": {"tokens": 256, "lora": 0}}, "come-search-512+distill")
    assert distilled["distill"]["tokens"] == 256 and distilled["distill"]["lora"] == 0
    assert distilled["distill"]["global_lr"] == DistillOptions().global_lr and "workers" not in distilled["distill"]
    # made before --autocast existed: in float32, whatever today's default; as is a resolved cell without the key
    assert distilled["distill"]["autocast"] == "off" != DistillOptions().autocast
    without = {k: v for k, v in distilled["distill"].items() if k != "autocast"}
    assert migrate_settings({**new, "distill": without}, "come-search-512+distill")["distill"] == distilled["distill"]
    assert migrate_settings(distilled, "come-search-512+distill") == distilled

    out = tmp_path / "bench"
    (out / "cells").mkdir(parents=True)
    for label in ("dense", "come-search-512", "shortgpt"):
        name = label if label == "dense" else f"{label}-r0.2"
        settings = {**old, "method_options": {} if label != "come-search-512" else old["method_options"]}
        if label != "come-search-512":
            settings.pop("base_method")
        row = {"method": label, "ratio": 0.0 if label == "dense" else 0.2, "removed_fraction": 0.2, "ppl_wikipedia": 20.0}
        (out / "cells" / f"{name}.json").write_text(json.dumps({"settings": settings, "row": row}))
    args = ["bench", "--out", str(out), "--methods", "dense,come-search-512:come-search,shortgpt,come-search",
            "--ratios", "0.2", "--ppl", "wikipedia", "--ppl-max-tokens", "256", "--tasks", "none", "--report-only",
            "--set", "come-search-512.nsamples=32", "--set", "come-search-512.seqlen=512",
            "--set", "come-search-512.search_samples=4", "-q"]
    # The old come-search cell scored every candidate in float32: today's default screen and autocast are
    # other settings.
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "not run yet: come-search-512-r0.2, come-search-r0.2." in (out / "results.md").read_text()
    result = runner.invoke(app, args + ["--set", "come-search-512.search_finalists=0"])
    assert "not run yet: come-search-512-r0.2, come-search-r0.2." in (out / "results.md").read_text()
    result = runner.invoke(app, args + ["--set", "come-search-512.search_finalists=0",
                                        "--set", "come-search-512.search_autocast=off",
                                        "--set", "come-search-512.autocast=off"])
    assert result.exit_code == 0, result.output
    # come-search ran with its own 128 x 128 calibration: the bench no longer gives it 32 x 512.
    assert "not run yet: come-search-r0.2." in (out / "results.md").read_text()
    assert result.output.count("done already") == 3


def test_a_benchmark_definition_is_the_grid_validated_before_any_work(tmp_path):
    from come.cli.bench import cell_options, load_definition

    out = tmp_path / "bench"
    definition = tmp_path / "grid.yaml"
    definition.write_text(f"""
out: {out}
ratios: [0.2, 0.1]
ppl: [wikipedia]
tasks: none
methods:
  dense:
  shortgpt:
  paper: {{method: come, ratios: [0.2], options: {{allow_remerge: false}}}}
distill: {{methods: [paper], options: {{tokens: 256}}}}
""")
    grid = load_definition(definition)
    assert grid["methods"] == ["dense:dense", "shortgpt:shortgpt", "paper:come@0.2"]
    assert grid["method_options"] == {"paper": {"allow_remerge": False}} and grid["tasks"] == []
    assert grid["distill_methods"] == ["paper"] and grid["out"] == out

    # The cells of that grid, as it would write them: --report-only finds them all.
    (out / "cells").mkdir(parents=True)
    base = {"model": None, "ppl": ["wikipedia"], "tasks": [], "limit": None, "ppl_max_tokens": None, "seqlen": 512,
            "seed": 0}
    from come.cli.bench import distill_settings

    for name, method, options in [("dense", None, None), ("shortgpt-r0.2", "shortgpt", {}),
                                  ("shortgpt-r0.1", "shortgpt", {}), ("paper-r0.2", "come", {"allow_remerge": False}),
                                  ("paper+distill-r0.2", "come", {"allow_remerge": False})]:
        settings = dict(base) if method is None else {**base, "method": method, "options": cell_options(method, options)}
        if "distill" in name:
            settings["distill"] = distill_settings({"tokens": 256})
        row = {"method": name.split("-r")[0], "ratio": 0.2, "removed_fraction": 0.2, "ppl_wikipedia": 20.0}
        (out / "cells" / f"{name}.json").write_text(json.dumps({"settings": settings, "row": row}))
    result = runner.invoke(app, ["bench", "--definition", str(definition), "--report-only", "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.count("done already") == 5 and "Partial table" not in (out / "results.md").read_text()
    assert f"--definition {definition}" in (out / "results.md").read_text()

    both = runner.invoke(app, ["bench", "--definition", str(definition), "--ratios", "0.3", "--report-only"])
    assert both.exit_code == 2 and "--ratios" in both.output and "not on the command line" in both.output
    definition.write_text(definition.read_text().replace("allow_remerge: false", "allow_remerge: false, granularity: 0"))
    bad = runner.invoke(app, ["bench", "--definition", str(definition), "--report-only"])
    assert bad.exit_code == 2 and "methods.paper.options.granularity" in bad.output
    definition.write_text(definition.read_text().replace("ppl:", "perplexity:"))
    bad = runner.invoke(app, ["bench", "--definition", str(definition), "--report-only"])
    assert bad.exit_code == 2 and "perplexity" in bad.output


def test_search_scale_counts_the_screens_passes_and_lm_head_rows(monkeypatch):
    """bench/search_scale.py's extrapolation: with the finalists screen, every candidate runs on the screen's
    share and only the finalists (lowest screen loss, else loss) on the rest; the LM head is charged for
    the sequences each loss call scored, and old cells (no row count) for every call on all of them."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "bench"))
    scale = importlib.import_module("search_scale")
    step = {"layers_before": 10, "chosen": {"op": "delete", "layer": 5},
            "candidates": [{"op": "merge", "window": [2, 3], "loss": 3.0},           # depth 7
                           {"op": "delete", "layer": 8, "loss": 2.0},                # depth 2
                           {"op": "delete", "layer": 4, "loss": None, "screen_loss": 1.0}]}  # depth 6
    assert scale.real_passes_per_layer([step], 0.5) == (7 + 2 + 6) * 0.5 / 10
    # Screen of 1 finalist on a 0.125 share: the one of lowest screen loss (else loss) goes on.
    assert scale.real_passes_per_layer([step], 0.5, screen=(1, 0.125)) == ((7 + 2 + 6) * 0.125 + 6 * 0.375) / 10
    assert scale.real_passes_per_layer([step], 0.5, screen=(3, 0.125)) == (7 + 2 + 6) * 0.5 / 10  # keeps all
    shape = {"layers": 2, "hidden": 4, "intermediate": 8, "heads": 2, "kv_heads": 1}
    cell = {"calibration": [8, 3], "search_samples": 4, "vocab": 10}
    head = 3 * 2.0 * 4 * 10  # one sequence of 3 tokens through a 4 -> 10 head
    assert scale.step_flops(shape, {"losses_calls": 2, "losses_rows": 5}, cell)["passes"] == 5 * head
    assert scale.step_flops(shape, {"losses_calls": 2}, cell)["passes"] == 2 * 4 * head


@pytest.mark.slow  # the SmolLM2 tokenizer and the Wikipedia calibration text: the real-model packages
def test_search_scale_times_every_step_of_a_tiny_synthetic_model(tmp_path):
    """bench/search_scale.py end to end on a tiny shape: its timing wrapper must pass search_step's arguments
    through (a new argument of search_step once broke it)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "bench" / "search_scale.py"
    subprocess.run([sys.executable, str(script), "--shapes", "4:64:128:4:2", "--steps", "1", "--nsamples", "4",
                    "--seqlen", "16", "--workdir", str(tmp_path / "models"), "--results", str(tmp_path / "scale")],
                   check=True, capture_output=True, timeout=600)
    (cell,) = (tmp_path / "scale_cells").glob("*.json")
    steps = json.loads(cell.read_text())["steps"]
    assert len(steps) == 1 and steps[0]["cpu_seconds"] > 0 and steps[0]["layers_before"] == 4
