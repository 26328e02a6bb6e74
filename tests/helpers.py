"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

runner = CliRunner()


def compress_cli(*args):
    """`come compress ARGS` on a small calibration set, quietly."""
    from come.cli import app

    return runner.invoke(app, ["compress", *map(str, args), "--nsamples", "4", "--seqlen", "32", "-q"])


def assert_error_line(result, pattern: str) -> None:
    """Exit code 2 with exactly one `error:` line, containing `pattern`, and no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], result.output
    assert "Traceback" not in result.output


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def char_tokenizer():
    """A character-level tokenizer over ASCII (ids 1..127, 0 = unknown) that fits the tiny vocab of 128."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(i): i for i in range(1, 128)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")), unk_token="<unk>")
