"""What the commands write: never onto a source, nowhere unwritable (checked before any work), with the
umask, atomically (a killed run's leftovers are removed by the next), in the source checkpoint's dtype."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from come.cli import app
from come.engine.pipeline import compress
from come.errors import OutputExists
from come.testing import tiny_model, tiny_tokens
from tests.helpers import assert_error_line, char_tokenizer, compress_cli, copy_folder, runner


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_may_not_touch_the_source(tiny_dir, tmp_path, where):
    src = copy_folder(tiny_dir, tmp_path / "parent" / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = {"same": src, "inside": src / "sub", "parent": tmp_path / "parent"}[where]
    assert_error_line(compress_cli(src, "--target-layers", "4", "--out", out, "--overwrite"), "would overwrite the model")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_python_api_protects_the_folder_a_loaded_model_came_from(tiny_dir, tmp_path):
    from come.engine.models import load_model

    src = copy_folder(tiny_dir, tmp_path / "src")
    loaded = load_model(str(src))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(OutputExists, match="would overwrite the model"):
        compress(loaded, target_layers=4, out=src, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_read_only_output_location_fails_before_any_work(tiny_dir, tmp_path, monkeypatch, read_only):
    calls = []
    import come.engine.execution

    monkeypatch.setattr(come.engine.execution, "load_model", lambda *a, **k: calls.append(1))  # must not be reached
    with read_only(tmp_path / "ro") as ro:
        assert_error_line(compress_cli(tiny_dir, "--target-layers", "4", "--out", ro / "out"), "not writable")
        assert_error_line(runner.invoke(app, ["bench", str(tiny_dir), "--out", str(ro / "bench"), "--tasks", "none"]),
                          "not writable")
        assert_error_line(runner.invoke(app, ["distill", str(tiny_dir), "--out", str(ro / "d")]), "not writable")
    assert calls == []


def test_outputs_follow_the_umask(tiny_dir, tmp_path):
    old = os.umask(0o022)
    try:
        result = compress_cli(tiny_dir, "--target-layers", "4", "--out", tmp_path / "out")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir()), {
        p.name: oct(p.stat().st_mode) for p in out.iterdir()}


def test_plan_names_the_source_by_its_resolved_path(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    result = compress_cli("model", "--target-layers", "4", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "out" / "come_plan.json").read_text())
    assert plan["model"]["path"] == str(tiny_dir.resolve()) and plan["model"]["name"] == "model"


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tiny_dir, tmp_path):
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
    result = runner.invoke(app, ["compress", str(tiny_dir), "--target-layers", "4", "--out", str(out),
                                 "--nsamples", "4", "--seqlen", "32", "--activation-storage", "disk",
                                 "--cache-dir", str(cache), "-q"])
    assert result.exit_code == 0, result.output
    assert f"removed 1 leftover(s) of interrupted runs in {tmp_path}: .out.tmp-" in result.output
    assert f"removed 1 leftover(s) of interrupted runs in {cache}: " in result.output
    assert not any(p.exists() for p in leftovers)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_output_may_not_overwrite_a_cached_builtin_model(tmp_path, monkeypatch):
    import come.engine.models
    from come.engine.pipeline import source_paths

    monkeypatch.setenv("COME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(come.engine.models, "_CACHE_CHOICE", {})
    cached = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    cached.mkdir(parents=True)
    assert source_paths(None) == [cached] and source_paths("smollm2-135m") == [cached]
    assert_error_line(compress_cli("--ratio", "0.3", "--out", cached, "--overwrite"), "would overwrite the model")
    assert cached.is_dir()


def test_eval_checks_every_file_it_writes_before_evaluating(tiny_dir, tmp_path, monkeypatch, read_only):
    import come.evaluation.evaluate

    calls = []
    monkeypatch.setattr(come.evaluation.evaluate, "evaluate", lambda *a, **k: calls.append(1))  # must not be reached
    args = ["eval", "--ppl", "wikipedia", "--tasks", "none", "-q"]
    with read_only(tmp_path / "ro") as ro:
        assert_error_line(runner.invoke(app, [*args, str(tiny_dir), "--json", str(ro / "r.json")]), "not writable")
    assert_error_line(runner.invoke(app, [*args, str(tiny_dir), "--json", str(tmp_path)]), "is a folder")
    out = tmp_path / "compressed"
    assert compress_cli(tiny_dir, "--target-layers", "4", "--out", out).exit_code == 0
    with read_only(tmp_path / "view", contents=out) as view:
        assert_error_line(runner.invoke(app, [*args, str(view), "--update-card"]), "not writable")
    assert calls == []


@pytest.mark.parametrize("source_dtype,request_dtype,expected", [
    ("bfloat16", None, torch.bfloat16),   # bf16 stays bf16 though computed in float32
    ("float32", None, torch.float32),
    ("bfloat16", "float16", torch.float16),  # --save-dtype overrides
])
@pytest.mark.parametrize("layerwise", [False, True])
def test_weights_are_saved_in_the_source_dtype(tmp_path, source_dtype, request_dtype, expected, layerwise):
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
    import come.engine.models
    monkeypatch.setenv("COME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(come.engine.models, "_CACHE_CHOICE", {})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"stand-in")

    def fake_from_gguf(path, dtype):
        return tiny_model("llama"), char_tokenizer()

    monkeypatch.setattr(come.engine.models, "_from_gguf", fake_from_gguf)
    result = compress(str(gguf), target_layers=4, method="shortgpt", tokens=tiny_tokens(), progress=False,
                      out=tmp_path / "out")
    assert result.plan["save_dtype"] == {"dtype": "bfloat16", "why": "the source is a quantised GGUF"}
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").parameters()} == {torch.bfloat16}



def test_in_memory_compression_runs_without_a_writable_work_folder(tmp_path, read_only):
    """The work folder is where replaced original-model boundaries go; an in-memory run with RAM storage that
    cannot make one keeps them in RAM, and picks exactly what it picks with the folder."""
    import come
    from come.engine.models import LoadedModel
    from come.testing import tiny_model, tiny_tokens

    def run(cache_dir):
        result = come.compress(LoadedModel(tiny_model("llama", seed=4, num_hidden_layers=6), None, {}), target_layers=4,
                               tokens=tiny_tokens(nsamples=8, seqlen=16), progress=False, batch_size=4,
                               activation_storage="ram", cache_dir=str(cache_dir))
        return [(layer["covers"], (layer.get("refit") or {}).get("damping")) for layer in result.plan["layers"]]

    with read_only(tmp_path / "ro") as ro:
        assert run(ro / "work") == run(tmp_path / "work")
