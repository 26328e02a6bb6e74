"""Knowledge distillation of a compressed model from the model it was made from.

Stage 1 (local, teacher-forced): each student layer to train covers original
layers i..j; it learns to map the teacher's hidden state entering layer i to
the state leaving layer j. Those teacher states are computed once into a disk
cache (one safetensors file per boundary and chunk of sequences) and streamed,
so memory stays at one chunk per boundary. Given the cache the layers are
independent, so `workers` processes split them round robin. Every random choice
of a layer (data order, torch RNG) derives from (seed, layer, epoch/step) alone,
so 1 and N processes, and interrupted-then-resumed runs, give identical weights.

Stage 2 (global, optional): end-to-end logit distillation (forward KL
teacher||student) plus hidden-state alignment at the plan's correspondence
points (student layer k <-> teacher layer max(covers_k)), DDP when workers > 1,
or with `fsdp` the student sharded over the workers by FSDP2 (`fully_shard` per
decoder layer, then the root; the frozen teacher stays whole on every worker).

Work state lives in OUT.partial/ next to OUT (token ids, teacher cache, layer
results, checkpoints, metrics); the result is moved into OUT in one rename.

Modules: `options` (DistillOptions, errors), `common` (seeds, losses, the job), `cache` (teacher
boundary cache), `stage1`, `stage2`, `launch` (processes), `run` (the `distill` driver).
"""

from .options import (
           DEFAULT_TOKENS,
           LOSSES,
           METRICS_FILE,
           SELECTIONS,
           DistillError,
           DistillInterrupted,
           DistillOptions,
           NonFiniteLoss,
)

# The training code (torch) is imported on first use, so the options above stay light for the CLI.
_LAZY = {"distill": ".run", "span_errors": ".cache", "_kl": ".common"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
           "DEFAULT_TOKENS",
           "LOSSES",
           "METRICS_FILE",
           "SELECTIONS",
           "DistillError",
           "DistillInterrupted",
           "DistillOptions",
           "NonFiniteLoss",
           "_kl",
           "distill",
           "span_errors",
]
