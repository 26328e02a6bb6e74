"""A compressed model's output folder, written atomically: the weights (from `export` for a model in
memory, or streamed by `layerwise`), then the tokenizer, the plan (`plan`) and the model card (`card`).

The folder is written under a temporary name beside the target and renamed at the end, so a failed
or interrupted run never leaves a half-written output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..outputs import atomic_folder
from .card import write_card
from .export import write_model
from .plan import write_plan


def write_metadata(folder: Path, tokenizer, plan: dict) -> None:
    """Tokenizer, plan and model card: everything but the weights and config."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_plan(folder, plan)
    write_card(folder, plan)


def publish(out: str | Path, tokenizer, plan: dict, write_weights: Callable[[Path], None], overwrite: bool = False,
            sources: list | None = None) -> Path:
    """Write a model folder at `out`: `write_weights(folder)` writes the weights and config, then the metadata."""
    with atomic_folder(out, overwrite, sources) as tmp:
        write_weights(tmp)
        write_metadata(tmp, tokenizer, plan)
    return Path(out).expanduser().resolve()


def save_compressed(model, tokenizer, plan: dict, out: Path, overwrite: bool = False, sources: list | None = None,
                    save_dtype=None) -> Path:
    """Write `model` as a checkpoint folder, atomically; floating weights in `save_dtype` (default: as held)."""
    return publish(out, tokenizer, plan, lambda folder: write_model(model, folder, save_dtype), overwrite, sources)
