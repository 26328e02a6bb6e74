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


def without_walks(layers: list[dict]) -> list[dict]:
    """Plan layer records with each refit's held-out errors reduced to that of the damping it chose: which
    dampings a refit's walk scored on the way depends on where it started (the previous refit's choice),
    and a replay refits only the chosen operations, so only the choice must agree."""
    out = []
    for layer in layers:
        refit = layer.get("refit")
        if refit and "held_out_errors" in refit:
            chosen = refit.get("damping")
            kept = {f"{chosen:g}": refit["held_out_errors"][f"{chosen:g}"]} if chosen is not None else None
            layer = {**layer, "refit": {**refit, "held_out_errors": kept}}
        out.append(layer)
    return out
