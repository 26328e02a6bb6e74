"""Distillation options and errors: one definition shared by the CLI, the Python API and recipes."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ComeError
from ..models import DTYPES

METRICS_FILE = "metrics.jsonl"
LOSSES = ("mse", "cosine", "kl")
SELECTIONS = ("merged", "all")
TRAIN_CHOICES = ("merged", "neighbours", "all")  # stage 2: merged layers, those and the layers next to them, or all


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
    # Defaults: end to end only (stage 2, logit KD through rank-16 LoRA adapters on every layer), chosen by the
    # held-out KL gained per CPU-minute (bench/results/README.md, Distillation); stage 1 stays available.
    layers: str = "none"  # stage-1 layers: merged (covers > 1 original layer) | all | none (stage 2 only)
    loss: str = "mse"
    lr: float = 1e-4
    cache_dtype: str = "bfloat16"
    # stage 2
    global_steps: int | None = None  # None: one pass over the training tokens; 0 skips stage 2
    global_lr: float = 1e-3  # for LoRA adapters; full-weight training (lora 0) wants a smaller one, near 1e-4
    temperature: float = 1.0
    hidden_weight: float = 0.0
    train: str = "all"  # layers trained in stage 2: merged | neighbours | all
    lora: int = 16  # stage 2: train rank-r LoRA adapters (merged into the weights at the end) instead of full weights
    lora_alpha: float = 0.0  # LoRA scale alpha / r; 0 means alpha = 2 r
    gradient_checkpointing: bool = False
    fsdp: bool = False  # stage 2 with workers > 1: shard the student with FSDP2 instead of replicating it (DDP)
    # held-out fidelity (KL to the teacher): judged before training, after stage 1, every eval_every stage-2 steps
    # and at the end; the output is the best of these, the input model itself when training did not help
    heldout_tokens: int = 4096
    heldout_data: str | None = None  # default: --data, in windows disjoint from the training ones
    eval_every: int = 50  # stage-2 steps between held-out checks (0: only at the end)
    # both stages
    warmup: float = 0.05  # fraction of the steps
    batch_size: int = 2
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
    choices = {"loss": LOSSES, "layers": SELECTIONS + ("none",), "train": TRAIN_CHOICES, "cache_dtype": tuple(DTYPES), "dtype": tuple(DTYPES)}
    for name, allowed in choices.items():
        if getattr(o, name) not in allowed:
            raise DistillError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(o, name)!r}")
    for name in ("seqlen", "epochs", "batch_size", "grad_accum", "workers", "save_every"):
        if not isinstance(getattr(o, name), int) or getattr(o, name) < (2 if name == "seqlen" else 1):
            raise DistillError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(o, name)!r}")
    if not isinstance(o.heldout_tokens, int) or o.heldout_tokens < 1:
        raise DistillError(f"--heldout-tokens must be a positive integer, got {o.heldout_tokens!r}")
    if not isinstance(o.eval_every, int) or o.eval_every < 0:
        raise DistillError(f"--eval-every must be an integer >= 0, got {o.eval_every!r}")
    if not isinstance(o.lora, int) or o.lora < 0 or o.lora_alpha < 0:
        raise DistillError(f"--lora must be an integer >= 0 and --lora-alpha >= 0, got {o.lora!r} and {o.lora_alpha!r}")
    if o.lora and o.fsdp:
        raise DistillError("--fsdp shards the weights stage 2 trains, and LoRA adapters (--lora, on by default) are not sharded: "
                           "pass --lora 0 with --fsdp")
    if o.global_steps is not None and (not isinstance(o.global_steps, int) or o.global_steps < 0):
        raise DistillError(f"--global-steps must be an integer >= 0, got {o.global_steps!r}")
    if not 0 <= o.warmup < 1 or o.temperature <= 0 or o.lr <= 0 or o.global_lr <= 0:
        raise DistillError("need --global-steps >= 0, 0 <= --warmup < 1, and positive --temperature, --lr, --global-lr")

