"""Bad input and faults: one `error:` line (exit 2), no corrupted output, no stray files, nothing silent."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from come.cli import app
from come.testing import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("faults") / "model"
    tiny_model("llama", vocab_size=len(smollm2_tokenizer), num_hidden_layers=6).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _compress(*args):
    return runner.invoke(app, ["compress", *map(str, args), "--nsamples", "4", "--seqlen", "32", "-q"])


def _assert_error(result, pattern):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], result.output
    assert "Traceback" not in result.output


@contextmanager
def read_only_dir(path):
    """A folder nothing can be written to: a read-only tmpfs when running as root (which ignores
    permission bits), or a mode-0555 folder otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)  # noqa: PLW1510 (the return code is checked)
        if mounted.returncode != 0:
            pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


# -- damaged or inconsistent checkpoints --------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_are_an_error_line(model_dir, tmp_path, damage):
    bad = _copy(model_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64)
    out = tmp_path / "out"
    _assert_error(_compress(bad, "--target-layers", "4", "--out", out), "cannot load the weights")
    assert not out.exists()
    _assert_error(runner.invoke(app, ["eval", str(bad), "--tasks", "none", "--ppl", "none"]), "cannot load the weights")


@pytest.mark.parametrize("claimed", [4, 8])
def test_config_that_does_not_match_the_weights_is_refused(model_dir, tmp_path, claimed):
    bad = _copy(model_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = claimed
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = _compress(bad, "--target-layers", "3", "--out", out)
    _assert_error(result, "do not match its config.json")
    assert ("unexpected weights: model.layers.4" if claimed == 4 else "missing weights: model.layers.6") in result.output
    assert not out.exists()


def test_eval_of_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    _assert_error(runner.invoke(app, ["eval", str(tmp_path / "notes"), "--tasks", "none"]), "has no config.json")


def test_missing_relative_path_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fx").mkdir()
    started = time.perf_counter()
    _assert_error(_compress("fx/nope", "--ratio", "0.3", "--out", tmp_path / "o"), "no such model folder")
    # An owner/name that is no local folder is a hub id; offline that is known at once too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_error(_compress("someone/some-model", "--ratio", "0.3", "--out", tmp_path / "o"), "not reachable")
    assert time.perf_counter() - started < 10


# -- outputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_may_not_touch_the_source(model_dir, tmp_path, where):
    src = _copy(model_dir, tmp_path / "parent" / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = {"same": src, "inside": src / "sub", "parent": tmp_path / "parent"}[where]
    _assert_error(_compress(src, "--target-layers", "4", "--out", out, "--overwrite"), "would overwrite the model")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_python_api_protects_the_folder_a_loaded_model_came_from(model_dir, tmp_path):
    from come.models import load_model
    from come.pipeline import compress

    src = _copy(model_dir, tmp_path / "src")
    loaded = load_model(str(src))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(Exception, match="would overwrite the model"):
        compress(loaded, target_layers=4, out=src, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_read_only_output_location_fails_before_any_work(model_dir, tmp_path, monkeypatch):
    calls = []
    import come.execution

    monkeypatch.setattr(come.execution, "load_model", lambda *a, **k: calls.append(1))  # must not be reached
    with read_only_dir(tmp_path / "ro") as ro:
        _assert_error(_compress(model_dir, "--target-layers", "4", "--out", ro / "out"), "not writable")
        _assert_error(runner.invoke(app, ["bench", str(model_dir), "--out", str(ro / "bench"), "--tasks", "none"]),
                      "not writable")
        _assert_error(runner.invoke(app, ["distill", str(model_dir), "--out", str(ro / "d")]), "not writable")
    assert calls == []


def test_read_only_cache_falls_back_with_a_warning(model_dir, tmp_path, monkeypatch):
    import come.models

    monkeypatch.setattr(come.models, "_CACHE_CHOICE", {})
    with read_only_dir(tmp_path / "cache") as ro:
        monkeypatch.setenv("COME_CACHE", str(ro))
        result = runner.invoke(app, ["eval", str(model_dir), "--ppl", "wikipedia", "--max-tokens", "100",
                                     "--seqlen", "32", "--tasks", "none", "-q"])
    assert result.exit_code == 0, result.output
    assert "not writable" in result.output and "Traceback" not in result.output


def test_outputs_follow_the_umask(model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        result = _compress(model_dir, "--target-layers", "4", "--out", tmp_path / "out")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir()), {
        p.name: oct(p.stat().st_mode) for p in out.iterdir()}


def test_plan_names_the_source_by_its_resolved_path(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    result = _compress("model", "--target-layers", "4", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "out" / "come_plan.json").read_text())
    assert plan["model"]["path"] == str(model_dir.resolve()) and plan["model"]["name"] == "model"


# -- leftovers of killed runs ----------------------------------------------------------
def test_leftovers_of_a_killed_run_are_removed_by_the_next(model_dir, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from come.outputs import atomic_folder, work_folder
        folder = work_folder({str(cache)!r})  # held: a dropped TemporaryDirectory removes itself
        work = folder.__enter__()
        (Path(work) / "boundary.bin").write_bytes(b"x" * 1000)
        with atomic_folder({str(out)!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)  # noqa: PLW1510 (the return code is checked)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")] + list(cache.iterdir())
    assert len(leftovers) == 2  # the half-written output and the work folder
    result = runner.invoke(app, ["compress", str(model_dir), "--target-layers", "4", "--out", str(out),
                                 "--nsamples", "4", "--seqlen", "32", "--activation-storage", "disk",
                                 "--cache-dir", str(cache), "-q"])
    assert result.exit_code == 0, result.output
    assert "leftover" in result.output
    assert not any(p.exists() for p in leftovers)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


# -- GGUF --------------------------------------------------------------------------------
def test_duplicate_output_matrix_is_tied(capsys):
    from come.models import count_parameters, tie_duplicate_head

    model = tiny_model("llama")
    state = model.state_dict()
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed + 1e-3 * embed.std() * torch.randn_like(embed)  # requantised copy
    config = model.config
    assert tie_duplicate_head(config, state, "x.gguf") and config.tie_word_embeddings
    assert "lm_head.weight" not in state and "tied" in capsys.readouterr().err
    tied = AutoModelForCausalLM.from_config(config)
    tied.load_state_dict(state, strict=False)
    assert count_parameters(tied) == count_parameters(model) - embed.numel()
    # A genuinely different head stays.
    other = tiny_model("llama", seed=1)
    state = other.state_dict()
    assert not tie_duplicate_head(other.config, state) and "lm_head.weight" in state


def test_a_gguf_is_converted_once(tmp_path, monkeypatch):
    import come.models

    monkeypatch.setenv("COME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(come.models, "_CACHE_CHOICE", {})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf")
    conversions = []

    def fake_from_gguf(path, dtype):
        from tests.test_distill import char_tokenizer

        conversions.append(path)
        return tiny_model("llama"), char_tokenizer()

    monkeypatch.setattr(come.models, "_from_gguf", fake_from_gguf)
    first = come.models.load_model(str(gguf))
    second = come.models.load_model(str(gguf))
    assert len(conversions) == 1 and first.source["kind"] == second.source["kind"] == "gguf"
    folder = come.models._gguf_cache_folder(gguf)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_zero_shot_prints_no_git_noise(model_dir, tmp_path, monkeypatch, capfd):
    from come.models import load_model
    from come.tasks import zero_shot

    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's own `git describe` would print "fatal: ..."
    loaded = load_model(str(model_dir))
    result = zero_shot(loaded.model, loaded.tokenizer, tasks=["piqa"], limit=2, batch_size=2)
    assert result["tasks"]["piqa"]["n"] == 2
    assert "fatal" not in capfd.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "more layers", "fewer layers"])
def test_layerwise_refuses_damaged_or_mismatched_checkpoints(model_dir, tmp_path, damage):
    bad = _copy(model_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    if damage in ("truncated", "garbage"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64)
    else:
        config = json.loads((bad / "config.json").read_text())
        config["num_hidden_layers"] = 8 if damage == "more layers" else 4
        (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = _compress(bad, "--target-layers", "3", "--layerwise", "--out", out)
    _assert_error(result, {"truncated": "cannot read the weights", "garbage": "cannot read the weights",
                           "more layers": "lacks model.layers.6", "fewer layers": "unexpected weights"}[damage])
    assert not out.exists()


# -- saved dtype -------------------------------------------------------------------------
@pytest.mark.parametrize("source_dtype,request_dtype,expected", [
    ("bfloat16", None, torch.bfloat16),   # bf16 stays bf16 though computed in float32
    ("float32", None, torch.float32),
    ("bfloat16", "float16", torch.float16),  # --save-dtype overrides
])
@pytest.mark.parametrize("layerwise", [False, True])
def test_weights_are_saved_in_the_source_dtype(tmp_path, source_dtype, request_dtype, expected, layerwise):
    from come.pipeline import compress
    from come.testing import tiny_tokens

    src = tmp_path / "src"
    tiny_model("llama").to(getattr(torch, source_dtype)).save_pretrained(src)
    result = compress(str(src), target_layers=4, method="shortgpt", tokens=tiny_tokens(), progress=False,
                      out=tmp_path / "out", save_dtype=request_dtype, layerwise=layerwise, dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {expected}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    assert result.plan["save_dtype"]["dtype"] == str(expected).removeprefix("torch.")
    if not layerwise:  # the saved weights are the computed ones, rounded
        for k, v in reloaded.state_dict().items():
            torch.testing.assert_close(v, result.model.state_dict()[k].to(expected))


def test_a_gguf_source_is_saved_as_bfloat16(tmp_path, monkeypatch):
    import come.models
    from come.pipeline import compress
    from come.testing import tiny_tokens

    monkeypatch.setenv("COME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(come.models, "_CACHE_CHOICE", {})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"stand-in")

    def fake_from_gguf(path, dtype):
        from tests.test_distill import char_tokenizer

        return tiny_model("llama"), char_tokenizer()

    monkeypatch.setattr(come.models, "_from_gguf", fake_from_gguf)
    result = compress(str(gguf), target_layers=4, method="shortgpt", tokens=tiny_tokens(), progress=False,
                      out=tmp_path / "out")
    assert result.plan["save_dtype"] == {"dtype": "bfloat16", "why": "the source is a quantised GGUF"}
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").parameters()} == {torch.bfloat16}


def test_output_may_not_overwrite_a_cached_builtin_model(tmp_path, monkeypatch):
    import come.models
    from come.pipeline import source_paths

    monkeypatch.setenv("COME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(come.models, "_CACHE_CHOICE", {})
    cached = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    cached.mkdir(parents=True)
    assert source_paths(None) == [cached] and source_paths("smollm2-135m") == [cached]
    _assert_error(_compress("--ratio", "0.3", "--out", cached, "--overwrite"), "would overwrite the model")
    assert cached.is_dir()


@contextmanager
def read_only_view(src, path):
    """`src`'s files, seen read-only at `path` (a read-only bind mount as root, a mode-0555 copy otherwise)."""
    import shutil

    if os.geteuid() == 0:
        path.mkdir(parents=True)
        steps = [["mount", "--bind", str(src), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]]
        for step in steps:
            done = subprocess.run(step, capture_output=True)  # noqa: PLW1510 (the return code is checked)
            if done.returncode != 0:
                subprocess.run(["umount", str(path)], check=False, capture_output=True)
                pytest.skip(f"running as root and cannot bind-mount read-only: {done.stderr.decode().strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
    else:
        shutil.copytree(src, path)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


def test_eval_checks_every_file_it_writes_before_evaluating(model_dir, tmp_path, monkeypatch):
    import come.evaluate

    calls = []
    monkeypatch.setattr(come.evaluate, "evaluate", lambda *a, **k: calls.append(1))  # must not be reached
    args = ["eval", "--ppl", "wikipedia", "--tasks", "none", "-q"]
    with read_only_dir(tmp_path / "ro") as ro:
        _assert_error(runner.invoke(app, [*args, str(model_dir), "--json", str(ro / "r.json")]), "not writable")
    _assert_error(runner.invoke(app, [*args, str(model_dir), "--json", str(tmp_path)]), "is a folder")
    out = tmp_path / "compressed"
    assert _compress(model_dir, "--target-layers", "4", "--out", out).exit_code == 0
    with read_only_view(out, tmp_path / "view") as view:
        _assert_error(runner.invoke(app, [*args, str(view), "--update-card"]), "not writable")
    assert calls == []


def test_a_recipe_whose_model_is_missing_leaves_no_run_folder(tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    run = tmp_path / "runs" / "r"
    recipe.write_text(yaml.safe_dump({"model": str(tmp_path / "no-such-model"), "out": str(run),
                                      "compress": {"method": "shortgpt", "target_layers": 2}}))
    result = runner.invoke(app, ["run", str(recipe), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not run.exists()


def test_export_gguf_onto_a_folder_is_refused_before_writing(model_dir, tmp_path):
    folder = tmp_path / "x.gguf"
    folder.mkdir()
    result = runner.invoke(app, ["export-gguf", str(model_dir), "--out", str(folder), "--overwrite"])
    _assert_error(result, "is a folder")
    assert list(folder.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["x.gguf"]
