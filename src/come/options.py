"""Compression options: one definition (default, help) shared by the Python API, the CLI and recipes.

Each field's default is the global one; a method may declare its own defaults
(`methods.register(defaults=...)`), used when the option is not given (None
means "not given" everywhere). The CLI reads its defaults and help texts from
the metadata here, so the two never drift apart. This module imports nothing
heavy, so `come --help` stays fast.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Literal, get_args, get_origin, get_type_hints


def _opt(default, help: str, **cli):
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class CompressionOptions:
    calib: str = _opt("wikipedia", "Calibration text: wikipedia | lambada | a .txt/.jsonl/.parquet file | HF dataset (online) | "
                                   "a mixture A+B (equal shares, e.g. wikipedia+lambada).")
    nsamples: int = _opt(32, "Calibration sequences. Default: the method's (come-search: 128; others: 32).", min=1)
    seqlen: int = _opt(512, "Tokens per calibration sequence. Default: the method's (come-search: 128; others: 512).",
                       min=2)
    seed: int = _opt(0, "Seed for calibration sampling.")
    batch_size: int = _opt(8, "Sequences per forward pass during calibration.", min=1)
    merge_size: int = _opt(2, "Adjacent layers merged per step.", min=2)
    allow_remerge: bool = _opt(False, "Allow windows that contain an already merged layer. Default: the method's "
                                      "(come-search, come: yes; come-p: no; the paper: no).")
    protect_first: int = _opt(0, "The first N original layers are never merged or deleted (come, come-p, come-search). "
                                 "Default: the method's (come-search: 1).", min=0)
    norm: Literal["fold", "mean"] = _opt("fold", "RMSNorm gains: fold (into the maps they feed: exact) | mean (the paper's average).")
    output_norm: Literal["scale", "mean"] = _opt("scale", "Post-norms (Gemma): scale (fold each source's gain and typical 1/rms into its "
                                     "output map, calibrate the merged gain) | mean (average the gains).")
    sbi_tokens: Literal["last", "all"] = _opt("last", "Tokens the window distance compares: last | all.")
    incremental: bool = _opt(True, "Recompute only the layers after a merge (False: every layer; benchmarks).")
    activation_dtype: Literal["float32", "bfloat16", "float16"] = _opt("float32", "Calibration activations: float32 | bfloat16 | float16 (scores stay float32).")
    activation_storage: Literal["auto", "ram", "disk"] = _opt("auto", "Activations: ram | disk | auto (disk if over half of free memory). "
                                           "Layer-wise, merged layers go to disk unless ram.")
    cache_dir: str | None = _opt(None, "Folder for the disk cache (default: $COME_CACHE/work).")
    progress: bool = _opt(True, "Progress bars.")
    granularity: int = _opt(20, "come-p: channel-ratio grid steps (G+1 candidates per merge).", min=1)
    search_samples: int | None = _opt(None, "Calibration sequences scored by loss/similarity searches. Default: the "
                                            "method's (come-search: 16; come-p, sleb, laco: all).", min=1)
    laco_thresholds: tuple[float, ...] = _opt((0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5),
                                  "laco: similarity thresholds tried from high to low.")
    laco_interval: int = _opt(2, "laco: step down after an accepted merge.", min=1)
    laco_min_layer: int = _opt(1, "laco: lowest layer a merge may start at.", min=0)
    search_loss: Literal["ce", "kl"] = _opt(
        "ce", "Score of a candidate in loss-guided searches (come-search, sleb, come-p): ce (next-token "
              "cross-entropy on the calibration text) | kl (divergence from the original model's next-token "
              "distribution).")
    refit: bool = _opt(False, "After every merge or removal, refit the new layer's down_proj (ridge least squares) to "
                              "reproduce the original model over the span it replaces. Default: the method's "
                              "(come-search: on; others: off).")
    refit_damping: str | float = _opt("auto", "Refit damping relative to the mean diagonal of Z^T Z, or auto "
                                              "(chosen per layer on held-out calibration sequences).")
    search_windows: int = _opt(3, "come-search: merge candidates (most redundant windows) per step.", min=0)
    search_deletions: int = _opt(4, "come-search: deletion candidates per step (see --search-deletion-rank).", min=0)
    search_deletion_rank: Literal["error", "bi", "loss", "error+loss"] = _opt(
        "error", "come-search: rank deletion candidates by skip error (distance to the original model at the end "
                 "of the layer's span if it is skipped), by block influence (bi), by the loss without refit on "
                 "--search-screen-samples sequences (loss: SLEB's score, every layer), or half by each of error "
                 "and loss (error+loss: more layer passes; results in bench/results/README.md).")
    search_screen_samples: int = _opt(2, "come-search: calibration sequences of the loss screen of "
                                         "--search-deletion-rank loss / error+loss.", min=1)
    search_ratios: tuple[float, ...] = _opt((), "come-search: first-layer channel shares tried besides the BI ratio "
                                                "(none by default: slower, and no better in bench/results/README.md).")
    drop_layers: tuple[int, ...] = _opt((), "drop: the original layers to delete (as many as the target removes).")
    replaceme_objective: Literal["lstsq", "cosine"] = _opt("lstsq", "replaceme: lstsq (closed form) | cosine (Adam, the authors' solver).")
    replaceme_blocks: int = _opt(1, "replaceme: remove the layers as this many blocks.", min=1)
    replaceme_epochs: int = _opt(10, "replaceme cosine: Adam epochs over the calibration tokens.", min=1)


OPTION_FIELDS = {f.name: f for f in fields(CompressionOptions)}


def default(name: str):
    f = OPTION_FIELDS[name]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def help_text(name: str) -> str:
    return OPTION_FIELDS[name].metadata["help"]


def choice_enum(name: str):
    """A str Enum of a Literal option's values, for CLIs that list choices (typer): the choices stay
    defined once, here."""
    from enum import Enum

    values = get_args(get_type_hints(CompressionOptions)[name])
    return Enum("".join(part.title() for part in name.split("_")), {v: v for v in values}, type=str)


def resolve_options(method_defaults: dict, options: dict) -> CompressionOptions:
    """Options given (None means "not given") over the method's defaults over the global ones."""
    from .errors import InvalidTarget

    unknown = sorted(set(options) - set(OPTION_FIELDS))
    if unknown:
        raise InvalidTarget(f"unknown compression option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    hints = get_type_hints(CompressionOptions)
    for name, value in given.items():
        if get_origin(hints[name]) is Literal and value not in get_args(hints[name]):
            choices = " | ".join(get_args(hints[name]))
            raise InvalidTarget(f"--{name.replace('_', '-')} must be one of {choices}, got {value!r}")
    return CompressionOptions(**{**method_defaults, **given})
