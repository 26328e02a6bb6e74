"""Distillation options and errors: one definition shared by the CLI, the Python API and recipes."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ComeError
from ..models import DTYPES

METRICS_FILE = "metrics.jsonl"
LOSSES = ("mse", "cosine", "kl")
SELECTIONS = ("merged", "all")


class DistillError(ComeError, ValueError):
    """A distillation problem (mismatched models, bad plan or options, a conflicting work folder)."""


class NonFiniteLoss(DistillError):
    pass


class DistillInterrupted(DistillError):
    """Raised by the `stop_after` hook: the run stops as if killed; continue it with resume=True."""


@dataclass
class DistillOptions:
    data: str = "wikipedia"
    seqlen: int = 512
    epochs: int = 1
    # stage 1
    layers: str = "merged"  # student layers to train: merged (covers > 1 original layer) | all | none (stage 2 only)
    loss: str = "mse"
    lr: float = 1e-4
    cache_dtype: str = "bfloat16"
    # stage 2
    global_steps: int = 0
    global_lr: float = 2e-5
    temperature: float = 1.0
    hidden_weight: float = 1.0
    train: str = "merged"  # parameters trained in stage 2: merged layers | all
    gradient_checkpointing: bool = False
    fsdp: bool = False  # stage 2 with workers > 1: shard the student with FSDP2 instead of replicating it (DDP)
    # both stages
    warmup: float = 0.05  # fraction of the steps
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    # run control: no effect on the result, so a resumed run may change them (workers: in stage 1)
    workers: int = 1
    save_every: int = 50
    progress: bool = True


_RUN_CONTROL = ("workers", "save_every", "progress")


def _check_options(o: DistillOptions) -> None:
    choices = {"loss": LOSSES, "layers": SELECTIONS + ("none",), "train": SELECTIONS, "cache_dtype": tuple(DTYPES), "dtype": tuple(DTYPES)}
    for name, allowed in choices.items():
        if getattr(o, name) not in allowed:
            raise DistillError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(o, name)!r}")
    for name in ("seqlen", "epochs", "batch_size", "grad_accum", "workers", "save_every"):
        if not isinstance(getattr(o, name), int) or getattr(o, name) < (2 if name == "seqlen" else 1):
            raise DistillError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(o, name)!r}")
    if o.global_steps < 0 or not 0 <= o.warmup < 1 or o.temperature <= 0 or o.lr <= 0 or o.global_lr <= 0:
        raise DistillError("need --global-steps >= 0, 0 <= --warmup < 1, and positive --temperature, --lr, --global-lr")

