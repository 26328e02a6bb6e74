"""End-to-end CLI runs on a tiny model saved with the real SmolLM2 tokenizer."""

import json
import re

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from come.cli import app
from come.methods import available_methods
from come.testing import tiny_model
from tests.helpers import assert_error_line, compress_cli

runner = CliRunner()


def test_compress_then_eval(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = compress_cli(tiny_dir, "--target-layers", "4", "--out", out)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    plan = json.loads((out / "come_plan.json").read_text())
    assert plan["calibration"]["tokens"] == 4 * 32 and plan["calibration"]["source"]["name"] == "wikipedia"

    report = tmp_path / "eval.json"
    result = runner.invoke(
        app, ["eval", str(out), "--ppl", "wikipedia", "--max-tokens", "300", "--seqlen", "64", "--tasks", "none", "--json", str(report), "-q"]
    )
    assert result.exit_code == 0, result.output
    numbers = json.loads(report.read_text())
    assert numbers["perplexity"]["wikipedia"]["tokens"] == 300 - 5  # 4 full windows + one of 44, one token less each
    assert numbers["layers"] == 4 and numbers["plan"]["method"] == "come-search"  # the default
    # The plan's source is the reference by default: KL on the 4 full perplexity windows.
    fid = numbers["fidelity"]["wikipedia"]
    assert numbers["reference"]["path"] == str(tiny_dir) and fid["tokens"] == 4 * 64 and fid["kl"] > 0 and 0 <= fid["top1"] <= 1
    args = ["eval", str(tiny_dir), "--ppl", "wikipedia", "--max-tokens", "300", "--seqlen", "64", "--tasks", "none", "-q"]
    itself = runner.invoke(app, [*args, "--reference", str(tiny_dir), "--json", str(report)])
    assert itself.exit_code == 0 and json.loads(report.read_text())["fidelity"]["wikipedia"]["kl"] < 1e-6
    skipped = runner.invoke(app, ["eval", str(out), *args[2:], "--no-reference", "--json", str(report)])
    assert skipped.exit_code == 0 and "fidelity" not in json.loads(report.read_text())


def test_reference_with_another_vocabulary_is_refused(tiny_dir, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", vocab_size=300).save_pretrained(other)
    result = runner.invoke(app, ["eval", str(tiny_dir), "--reference", str(other), "--tasks", "none", "--ppl", "wikipedia"])
    assert_error_line(result, "vocabulary")


def _assert_clean_failure(result, out, pattern):
    assert_error_line(result, pattern)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_bad_inputs_fail_cleanly(tiny_dir, tmp_path):
    out = tmp_path / "out"
    _assert_clean_failure(compress_cli(tmp_path / "missing", "--ratio", "0.3", "--out", out), out, "no such model folder")
    _assert_clean_failure(compress_cli(tiny_dir, "--ratio", "1.5", "--out", out), out, "(0, 1)")
    _assert_clean_failure(compress_cli(tiny_dir, "--target-layers", "0", "--out", out), out, "every layer")
    _assert_clean_failure(compress_cli(tiny_dir, "--target-layers", "6", "--out", out), out, "removes no layer")

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    _assert_clean_failure(compress_cli(gpt2, "--target-layers", "1", "--out", out), out, "supported families")

    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    _assert_clean_failure(compress_cli(tiny_dir, "--target-layers", "4", "--calib", short, "--out", out), out, "requested")


def test_existing_output_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    result = compress_cli(tiny_dir, "--target-layers", "5", "--out", out)
    assert_error_line(result, "exists; pass --overwrite to replace it")
    assert list(out.iterdir()) == []


def test_help_and_methods():
    result = runner.invoke(app, ["compress", "--help"])
    assert result.exit_code == 0
    assert re.search(r"--ratio\b", result.output) and re.search(r"--allow-remerge\b", result.output), result.output
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    # One line per registered method: its name, then its description.
    listed = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in result.output.splitlines() if line.strip()}
    assert listed == available_methods()


@pytest.mark.parametrize("method", ["shortgpt", "laco"])
def test_other_methods_through_the_cli(tiny_dir, tmp_path, method):
    out = tmp_path / method
    result = runner.invoke(
        app, ["compress", str(tiny_dir), "--method", method, "--target-layers", "4", "--merge-size", "3",
              "--nsamples", "4", "--seqlen", "32", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "layers 6 -> 4" in result.output
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_eval_and_bench_input_errors(tiny_dir, tmp_path):
    result = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", "mmlu", "--ppl", "none"])
    assert_error_line(result, "unknown offline task")
    result = runner.invoke(app, ["eval", str(tiny_dir), "--device", "tpu9", "--tasks", "none"])
    assert_error_line(result, "unknown device")
    result = runner.invoke(app, ["bench", str(tiny_dir), "--out", str(tmp_path / "b"), "--methods", "come", "--set", "lacoo.merge_size=4"])
    assert_error_line(result, "not in --methods")
    result = runner.invoke(app, ["bench", str(tiny_dir), "--out", str(tmp_path / "b"), "--methods", "come", "--set", "come.seed=3"])
    assert_error_line(result, "unknown option 'seed'")


def test_model_card_carries_the_plan_picture_and_results(tiny_dir, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    assert compress_cli(tiny_dir, "--target-layers", "4", "--out", out).exit_code == 0
    assert (out / "come_plan.png").stat().st_size > 0
    assert "Not evaluated yet" in (out / "README.md").read_text()
    args = ["eval", str(out), "--ppl", "wikipedia", "--max-tokens", "200", "--seqlen", "50", "--tasks", "none", "-q"]
    result = runner.invoke(app, [*args, "--update-card"])
    assert result.exit_code == 0, result.output
    text = (out / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| wikipedia perplexity |"))
    dense, compressed = (float(cell.split()[0]) for cell in row.split("|")[2:4])
    numbers = json.loads((out / "come_eval.json").read_text())
    assert compressed == pytest.approx(numbers["compressed"]["perplexity"]["wikipedia"]["ppl"], abs=0.01)
    assert dense == pytest.approx(numbers["dense"]["perplexity"]["wikipedia"]["ppl"], abs=0.01)
    assert numbers["dense"]["layers"] == 6 and numbers["compressed"]["layers"] == 4
    card = ModelCard.load(out / "README.md")
    (evaluation,) = card.data.eval_results
    assert evaluation.metric_type == "perplexity" and evaluation.metric_value == pytest.approx(compressed, abs=0.01)
    # Not a come folder: refused before any work.
    bad = runner.invoke(app, ["eval", str(tiny_dir), "--update-card", "--tasks", "none"])
    assert_error_line(bad, "--update-card needs a folder written by come compress")


@pytest.mark.parametrize("kind", ["default", "builtin"])
def test_dense_reference_of_a_built_in_model_is_found(tmp_path, monkeypatch, kind):
    """A plan made from a built-in model (the default one too) names it, not a folder: the card's dense column
    must come from its evaluation, not be left empty because no folder called 'smollm2-135m' exists."""
    import come.engine.models
    import come.evaluation.evaluate

    monkeypatch.setenv("COME_CACHE", str(tmp_path))
    monkeypatch.setattr(come.engine.models, "_CACHE_CHOICE", {})
    calls = []
    monkeypatch.setattr(come.evaluation.evaluate, "evaluate",
                        lambda source, **kw: calls.append(source) or {"layers": 30})
    plan = {"model": {"kind": kind, "builtin": "smollm2-135m", "path": str(tmp_path / "gone")}}
    settings = {"ppl_sources": ["wikipedia"], "tasks": [], "limit": None}
    assert come.evaluation.evaluate.dense_reference(plan, settings, progress=False) == {"layers": 30}
    assert come.evaluation.evaluate.dense_reference(plan, settings, progress=False) == {"layers": 30}  # cached
    assert calls == ["smollm2-135m"]
    # A local source that is gone: no dense column, no error.
    gone = {"model": {"kind": "local", "path": str(tmp_path / "gone")}}
    assert come.evaluation.evaluate.dense_reference(gone, settings) is None


def test_every_option_is_a_flag_defined_once():
    """`come compress` has a flag for every compression option, shared or a method's own, with the defaults and
    bounds of its one definition; values outside them are refused however the options are made."""
    from come.engine.options import CompressionOptions, all_options
    from come.errors import InvalidTarget

    text = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "250"}).output
    for option in all_options().values():
        assert (option.flag in text) == (option.cli and not option.hidden), option.name
    assert "come-p: channel-ratio grid steps" in text and "Default: the method's (come-search: 128; others: 32)" in text
    for bad in ({"granularity": 0}, {"laco_interval": 0}, {"search_ratios": (0.5, 2.0)}, {"norm": "max"}):
        with pytest.raises(InvalidTarget):
            CompressionOptions(**bad)
    result = runner.invoke(app, ["compress", "--out", "x", "--granularity", "0"], env={"COLUMNS": "250"})
    assert result.exit_code == 2 and "--granularity" in result.output and "greater than or equal to 1" in result.output
