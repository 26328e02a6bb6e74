"""`come run`: recipe validation before any work, stage skipping, and resuming a killed run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from come.cli import app
from tests.helpers import assert_error_line

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, body: dict, name="recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def _base(model, out):
    return {
        "model": str(model),
        "out": str(out),
        "compress": {"method": "shortgpt", "target_layers": 4, "options": {"nsamples": 4, "seqlen": 32}},
        "eval": {"ppl": ["wikipedia"], "max_tokens": 128, "seqlen": 32, "tasks": "none"},
    }


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(stages=1), "stages: Extra inputs are not permitted"),
    (lambda r: r["compress"]["options"].update(nsample=4), "compress.options.nsample: Extra inputs"),
    (lambda r: r["compress"]["options"].update(nsamples="many"), "compress.options.nsamples: Input should be a valid integer"),
    (lambda r: r["compress"]["options"].update(nsamples=0), "compress.options.nsamples: Input should be greater than or equal to 1"),
    (lambda r: r["compress"].update(ratio=1.5), "compress.ratio: Input should be less than 1"),
    (lambda r: r["compress"].update(ratio=0.3), "exactly one of ratio or target_layers"),
    (lambda r: r["compress"].update(method="nope"), "compress.method: unknown method 'nope'"),
    (lambda r: r["compress"].update(method="sleb", layerwise=True), "compress.layerwise: method 'sleb' cannot run layer-wise"),
    (lambda r: r["eval"].update(tasks=["arc_easy", "mmlu"]), "eval.tasks: unknown task(s) mmlu"),
    (lambda r: r.update(distill={"tokenz": 5}), "distill.tokenz: Extra inputs"),
    (lambda r: r["compress"]["options"].update(norm="avg"), "compress.options.norm: Input should be 'fold' or 'mean'"),
    (lambda r: r["compress"]["options"].update(refit_damping="lots"), "compress.options.refit_damping"),
    (lambda r: r["compress"]["options"].update(seed=3), "compress.options.seed: set the seed once"),
    (lambda r: r.pop("out"), "out: the run folder is not set"),
])
def test_invalid_recipes_fail_before_any_work(tmp_path, edit, message):
    body = _base(tmp_path / "missing-model", tmp_path / "run")
    edit(body)
    result = runner.invoke(app, ["run", str(_recipe(tmp_path, body))])
    assert_error_line(result, message)
    assert not (tmp_path / "run").exists()  # nothing was started (the model path is not even looked at)


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("compress: [unclosed")
    assert_error_line(runner.invoke(app, ["run", str(bad)]), "not valid YAML")
    bad.write_text("- a list")
    assert_error_line(runner.invoke(app, ["run", str(bad)]), "a recipe is a mapping")


def test_stages_are_skipped_when_their_settings_match(tiny_dir, tmp_path):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, _base(tiny_dir, run))
    first = runner.invoke(app, ["run", str(recipe), "-q"])
    assert first.exit_code == 0, first.output
    assert (run / "compressed" / "come_plan.json").is_file() and (run / "eval.json").is_file()
    card = (run / "compressed" / "README.md").read_text()
    assert "| wikipedia perplexity |" in card  # the eval stage wrote the results into the card
    again = runner.invoke(app, ["run", str(recipe), "-q"])
    assert again.exit_code == 0 and again.output.count("done already") == 2, again.output
    # A changed eval setting reruns the eval only.
    body = _base(tiny_dir, run)
    body["eval"]["max_tokens"] = 96
    changed = runner.invoke(app, ["run", str(_recipe(tmp_path, body)), "-q"])
    assert "compress: done already" in changed.output and "eval: done already" not in changed.output
    assert json.loads((run / "eval.json").read_text())["perplexity"]["wikipedia"]["tokens"] < 96


def test_a_killed_run_continues_at_the_stage_that_did_not_finish(tiny_dir, tmp_path):
    run = tmp_path / "run"
    body = _base(tiny_dir, run)
    body["distill"] = {"tokens": 4096, "seqlen": 32, "epochs": 40, "batch_size": 2, "save_every": 5, "layers": "merged", "global_steps": 0}
    recipe = _recipe(tmp_path, body)
    command = [sys.executable, "-m", "come.cli", "run", str(recipe), "-q"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = run / "come_run.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if state.is_file() and "compress" in json.loads(state.read_text()):
            time.sleep(2)  # inside the distillation
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert "distill" not in json.loads(state.read_text())  # it died before the distillation finished
    resumed = runner.invoke(app, ["run", str(recipe), "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert "compress: done already" in resumed.output
    assert set(json.loads(state.read_text())) == {"compress", "distill", "eval"}
    assert (run / "distilled" / "come_plan.json").is_file() and not (run / "distilled.partial").exists()


def test_a_recipe_whose_model_is_missing_leaves_no_run_folder(tmp_path):
    recipe = tmp_path / "r.yaml"
    run = tmp_path / "runs" / "r"
    recipe.write_text(yaml.safe_dump({"model": str(tmp_path / "no-such-model"), "out": str(run),
                                      "compress": {"method": "shortgpt", "target_layers": 2}}))
    result = runner.invoke(app, ["run", str(recipe), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not run.exists()
