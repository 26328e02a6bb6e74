"""Loading models: damaged or mismatched checkpoints and missing paths are one error line; GGUF sources
are converted once and their duplicate output matrix tied; an unwritable cache falls back with a warning."""

import json
import os
import stat
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from come.cli import app
from come.testing import tiny_model
from tests.helpers import assert_error_line, char_tokenizer, compress_cli, copy_folder, runner


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_are_an_error_line(tiny_dir, tmp_path, damage):
    bad = copy_folder(tiny_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64)
    out = tmp_path / "out"
    assert_error_line(compress_cli(bad, "--target-layers", "4", "--out", out), "cannot load the weights")
    assert not out.exists()
    assert_error_line(runner.invoke(app, ["eval", str(bad), "--tasks", "none", "--ppl", "none"]), "cannot load the weights")


@pytest.mark.parametrize("claimed", [4, 8])
def test_config_that_does_not_match_the_weights_is_refused(tiny_dir, tmp_path, claimed):
    bad = copy_folder(tiny_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = claimed
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = compress_cli(bad, "--target-layers", "3", "--out", out)
    assert_error_line(result, "do not match its config.json")
    assert ("unexpected weights: model.layers.4" if claimed == 4 else "missing weights: model.layers.6") in result.output
    assert not out.exists()


def test_eval_of_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    assert_error_line(runner.invoke(app, ["eval", str(tmp_path / "notes"), "--tasks", "none"]), "has no config.json")


def test_missing_relative_path_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fx").mkdir()
    started = time.perf_counter()
    assert_error_line(compress_cli("fx/nope", "--ratio", "0.3", "--out", tmp_path / "o"), "no such model folder")
    # An owner/name that is no local folder is a hub id; offline that is known at once too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_error_line(compress_cli("someone/some-model", "--ratio", "0.3", "--out", tmp_path / "o"), "not reachable")
    assert time.perf_counter() - started < 10


def test_read_only_cache_falls_back_with_a_warning(tiny_dir, tmp_path, monkeypatch, read_only):
    import come.engine.models

    monkeypatch.setattr(come.engine.models, "_CACHE_CHOICE", {})
    with read_only(tmp_path / "cache") as ro:
        monkeypatch.setenv("COME_CACHE", str(ro))
        result = runner.invoke(app, ["eval", str(tiny_dir), "--ppl", "wikipedia", "--max-tokens", "100",
                                     "--seqlen", "32", "--tasks", "none", "-q"])
    assert result.exit_code == 0, result.output
    assert "not writable" in result.output and "Traceback" not in result.output


def test_duplicate_output_matrix_is_tied(capsys):
    from come.engine.models import count_parameters, tie_duplicate_head

    model = tiny_model("llama")
    state = model.state_dict()
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed + 1e-3 * embed.std() * torch.randn_like(embed)  # requantised copy
    config = model.config
    assert tie_duplicate_head(config, state, "x.gguf") and config.tie_word_embeddings
    assert "lm_head.weight" not in state and "tied them, as the original checkpoint does" in capsys.readouterr().err
    tied = AutoModelForCausalLM.from_config(config)
    tied.load_state_dict(state, strict=False)
    assert count_parameters(tied) == count_parameters(model) - embed.numel()
    # A genuinely different head stays.
    other = tiny_model("llama", seed=1)
    state = other.state_dict()
    assert not tie_duplicate_head(other.config, state) and "lm_head.weight" in state


def test_a_gguf_is_converted_once(tmp_path, monkeypatch):
    import come.engine.models

    monkeypatch.setenv("COME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(come.engine.models, "_CACHE_CHOICE", {})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf")
    conversions = []

    def fake_from_gguf(path, dtype):
        conversions.append(path)
        return tiny_model("llama"), char_tokenizer()

    monkeypatch.setattr(come.engine.models, "_from_gguf", fake_from_gguf)
    first = come.engine.models.load_model(str(gguf))
    second = come.engine.models.load_model(str(gguf))
    assert len(conversions) == 1 and first.source["kind"] == second.source["kind"] == "gguf"
    folder = come.engine.models._gguf_cache_folder(gguf)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

