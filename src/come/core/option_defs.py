"""Option, the definition of one compression option, and SHARED, the options every method reads.

Apart from engine/options.py (which gathers every method's options) so that the methods' specs can declare
theirs without importing it: no import circle. Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin


@dataclass(frozen=True)
class Option:
    """One compression option. `min`/`max` bound a number, or each element of a tuple option."""

    name: str
    type: Any  # int, bool, str, float, a Literal of choices, tuple[T, ...], or T | None
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    unset: str = ""  # what a None default means, for help texts ("all")
    hidden: bool = False  # a CLI flag, not listed in --help
    cli: bool = True  # False: no CLI flag (set by another flag, e.g. progress by --quiet)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple | None:
        return get_args(self.type) if get_origin(self.type) is Literal else None

    @property
    def element(self) -> type | None:
        """The element type of a tuple option (a comma list on the CLI), else None."""
        return get_args(self.type)[0] if get_origin(self.type) is tuple else None

    def check(self, value) -> None:
        """Refuse a value outside the option's choices or bounds (None: not given, always fine)."""
        from ..errors import InvalidTarget

        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise InvalidTarget(f"{self.flag} must be one of {' | '.join(self.choices)}, got {value!r}")
        numbers = value if self.element is not None and isinstance(value, (list, tuple)) else [value]
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if self.min is not None and v < self.min:
                raise InvalidTarget(f"{self.flag} must be at least {self.min:g}, got {value!r}")
            if self.max is not None and v > self.max:
                raise InvalidTarget(f"{self.flag} must be at most {self.max:g}, got {value!r}")


# Options every method reads (some only matter to the methods named in their help).
SHARED: tuple[Option, ...] = (
    Option("calib", str, "wikipedia", "Calibration text: wikipedia | lambada | a .txt/.json/.jsonl/.parquet file | HF dataset "
                                      "(online) | a mixture A+B (equal shares, e.g. wikipedia+lambada)."),
    Option("nsamples", int, 32, "Calibration sequences.", min=1),
    Option("seqlen", int, 512, "Tokens per calibration sequence.", min=2),
    Option("seed", int, 0, "Seed for calibration sampling."),
    Option("batch_size", int, 8, "Sequences per forward pass during calibration.", min=1),
    Option("merge_size", int, 2, "Adjacent layers merged per step.", min=2),
    Option("allow_remerge", bool, False, "Allow windows that contain an already merged layer (the paper: no)."),
    Option("protect_first", int, 0, "The first N original layers are never merged or deleted (come, come-p, "
                                    "come-search).", min=0),
    Option("norm", Literal["fold", "mean"], "fold",
           "RMSNorm gains: fold (into the maps they feed: exact) | mean (the paper's average)."),
    Option("output_norm", Literal["scale", "mean"], "scale",
           "Post-norms (Gemma): scale (fold each source's gain and typical 1/rms into its output map, calibrate the "
           "merged gain) | mean (average the gains)."),
    Option("sbi_tokens", Literal["last", "all"], "last", "Tokens the window distance compares: last | all."),
    Option("search_samples", int | None, None, "Calibration sequences scored by loss/similarity searches "
                                               "(come-search, come-p, sleb, laco).", min=1, unset="all"),
    Option("search_loss", Literal["ce", "kl"], "ce",
           "Score of a candidate in loss-guided searches (come-search, sleb, come-p): ce (next-token cross-entropy on "
           "the calibration text) | kl (divergence from the original model's next-token distribution)."),
    Option("refit", bool, False, "After every merge or removal, refit the new layer's down_proj (ridge least squares) "
                                 "to reproduce the original model over the span it replaces."),
    Option("refit_damping", str | float, "auto", "Refit damping relative to the mean diagonal of Z^T Z, or auto "
                                                 "(chosen per layer on held-out calibration sequences by walking the damping grid to its lowest error), or grid (score every grid value)."),
    # Execution: where and in what precision activations are kept, progress.
    Option("incremental", bool, True, "Recompute only the layers after a merge (False: every layer; benchmarks).",
           hidden=True),
    Option("activation_dtype", Literal["float32", "bfloat16", "float16"], "float32",
           "Calibration activations: float32 | bfloat16 | float16 (scores stay float32)."),
    Option("autocast", Literal["auto", "on", "off"], "off",
           "A float32 model's layer passes over the calibration set (the boundaries, the refit statistics' "
           "and output norms' layer passes; not loss searches) under bfloat16 autocast: auto (where the device "
           "computes bfloat16 natively: a CPU with AMX or AVX512-BF16, a GPU) | on | off. Weights, merges, "
           "statistics and solves keep their precision, but the activations they read round as bfloat16 "
           "does, so picks and weights may differ slightly."),
    Option("activation_storage", Literal["auto", "ram", "disk"], "auto",
           "Activations: ram | disk | auto (disk if over half of free memory). With ram, the original model's "
           "activations that a step replaces (refit targets) move to disk. Layer-wise, merged layers go to disk "
           "unless ram."),
    Option("cache_dir", str | None, None, "Folder for the disk cache (default: $COME_CACHE/work)."),
    Option("progress", bool, True, "Progress bars.", cli=False),
)
SHARED_NAMES = frozenset(o.name for o in SHARED)
