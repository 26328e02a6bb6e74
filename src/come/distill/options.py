"""Distillation options and errors: one definition shared by the CLI, the Python API and recipes."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ComeError

METRICS_FILE = "metrics.jsonl"
LOSSES = ("mse", "cosine", "kl")
SELECTIONS = ("merged", "all")
AUTOCAST = ("off", "on", "auto")
TRAIN_CHOICES = ("merged", "neighbours", "all")  # stage 2: merged layers, those and the layers next to them, or all


class DistillError(ComeError, ValueError):
    """A distillation problem (mismatched models, bad plan or options, a conflicting work folder)."""


class NonFiniteLoss(DistillError):
    pass


class DistillInterrupted(DistillError):
    """Raised by the `stop_after` hook: the run stops as if killed; continue it with resume=True."""


def _opt(default, help: str = "", **bounds):
    """A field with its help text and bounds (min): `come distill`'s flags and recipe validation read them."""
    return field(default=default, metadata={"help": help, **bounds})


# Training tokens drawn from the data (a `distill()` argument, which also takes a ready tensor of ids).
DEFAULT_TOKENS = 262_144
TOKENS_HELP = ("Training tokens drawn from --data (stage 2 makes one pass over them unless --global-steps; stage 1 "
               "trains each layer on them).")


@dataclass
class DistillOptions:
    data: str = _opt("wikipedia", "Training text (calib split): wikipedia | lambada | a .txt/.json/.jsonl/.parquet file | HF "
                                  "dataset | a mixture A+B.")
    seqlen: int = _opt(512, "Tokens per training sequence.", min=2)
    epochs: int = _opt(1, "Stage-1 passes over the tokens.", min=1)
    # stage 1
    # Defaults: end to end only (stage 2, logit KD through rank-16 LoRA adapters on every layer), chosen by the
    # held-out KL gained per CPU-minute (bench/results/README.md, Distillation); stage 1 stays available.
    layers: str = _opt("none", "Stage-1 (per-layer, teacher-forced) layers: none (the default: end to end only) | "
                               "merged (stand for >1 original layer) | all.")
    loss: str = _opt("mse", "Stage-1 loss: mse (normalised) | cosine | kl (through the teacher's final norm and head).")
    lr: float = _opt(1e-4, "Stage-1 peak learning rate.")
    cache_dtype: str = _opt("bfloat16", "Teacher hidden-state cache on disk: float32 | bfloat16 | float16.")
    # stage 2
    global_steps: int | None = _opt(None, "Stage-2 (end-to-end logit KD) optimizer steps. Default: one pass over "
                                          "--tokens; 0 skips stage 2.", min=0)
    time_budget: float | None = _opt(None, "Stage 2: train for about this many minutes (wall clock, its held-out checks "
                                           "included) instead of one pass over --tokens: the step count is set from four "
                                           "trial steps, the learning-rate schedule spans it, and the tokens are reused "
                                           "(reshuffled) if it outlasts them. The count is recorded; --global-steps "
                                           "repeats it.")
    # for LoRA adapters; full-weight training (lora 0) wants a smaller one, near 1e-4
    global_lr: float = _opt(3e-3, "Stage-2 peak learning rate (the default suits --lora adapters; full-weight training, --lora 0, wants a smaller one).")
    temperature: float = _opt(1.0, "KD temperature.")
    hidden_weight: float = _opt(0.0, "Stage-2 weight of the hidden-state alignment loss (0: logit KD alone).")
    train: str = _opt("all", "Stage-2 trainable layers: merged | neighbours (merged and the layers next to them) | all.")
    lora: int = _opt(16, "Stage 2: train rank-R LoRA adapters (PEFT) on the trainable layers' linear maps instead of "
                         "their weights; merged into the weights at the end (a standard checkpoint). 0: train the "
                         "weights themselves (then use --global-lr near 1e-4).", min=0)
    lora_alpha: float = _opt(0.0, "LoRA alpha (scale alpha/R); 0 means 2 x R.", min=0.0)
    lora_vectors: bool = _opt(False, "Stage 2 with --lora: also train the trainable layers' 1-D parameters (norm gains, "
                                     "biases) and the final norm's gain in full; they are few and are saved as they are.")
    lora_plus: float = _opt(1.0, "Stage 2 with --lora: the adapters' B matrices learn at this multiple of --global-lr "
                                 "(LoRA+; B starts at zero); 1: one rate for A and B.")
    # held-out fidelity (KL to the teacher): judged before training, after stage 1, every eval_every stage-2 steps
    # and at the end; the output is the best of these, the input model itself when training did not help
    heldout_tokens: int = _opt(4096, "Held-out tokens (whole windows of --seqlen, never trained on) on which the KL "
                                     "to the teacher judges every candidate; the output is the best one, the input "
                                     "itself if training did not lower it.", min=1)
    heldout_data: str | None = _opt(None, "Held-out text for that check. Default: --data, windows disjoint from "
                                          "training.")
    eval_every: int = _opt(50, "Stage-2 steps between held-out checks (0: only at the end).", min=0)
    gradient_checkpointing: bool = _opt(False, "Stage 2: recompute activations in backward to save memory.")
    fsdp: bool = _opt(False, "Stage 2, --workers >= 2 or torchrun: shard the student (FSDP2) instead of DDP, for "
                             "models too big for one device.")
    # both stages
    warmup: float = _opt(0.05, "Warm-up fraction of the steps (then cosine decay).")
    batch_size: int = _opt(2, "Sequences per micro-batch (and per teacher-cache chunk).", min=1)
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.", min=1)
    weight_decay: float = _opt(0.0)
    max_grad_norm: float = _opt(1.0, "Gradient clipping; 0 disables it.")
    seed: int = _opt(0)
    # auto by default: the same held-out KL per token as float32 at a fraction of the CPU time where bf16 is native
    # (bench/results/recovery_smollm2.md)
    autocast: str = _opt("auto", "Stage 2: forward passes under bfloat16 autocast (weights, optimizer and held-out checks "
                                 "stay float32): auto (on where the device computes bfloat16 natively: a CUDA GPU that "
                                 "supports it, or a CPU with AMX or AVX512-BF16; off elsewhere, where it would be slower) | "
                                 "on | off.")
    dtype: str = _opt("float32", "Weight dtype: float32 | bfloat16 | float16.")
    device: str = _opt("cpu", "cpu | cuda | auto.")
    # run control: no effect on the result, so a resumed run may change them (workers: in stage 1)
    workers: int = _opt(1, "Processes (torch.distributed: gloo on CPU, nccl on GPU); ignored under torchrun.", min=1)
    save_every: int = _opt(50, "Checkpoint every this many optimizer steps.", min=1)
    progress: bool = _opt(True, cli=False)


_RUN_CONTROL = ("workers", "save_every", "progress")


def _check_options(o: DistillOptions) -> None:
    from ..engine.models import DTYPES

    choices = {"autocast": AUTOCAST, "loss": LOSSES, "layers": SELECTIONS + ("none",), "train": TRAIN_CHOICES, "cache_dtype": tuple(DTYPES), "dtype": tuple(DTYPES)}
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
    if o.lora_vectors and not o.lora:
        raise DistillError("--lora-vectors trains norm gains and biases beside LoRA adapters and needs --lora > 0 "
                           "(without adapters, --train chooses the weights trained)")
    if not o.lora_plus > 0:
        raise DistillError(f"--lora-plus must be a positive number, got {o.lora_plus!r}")
    if o.lora_plus != 1 and not o.lora:
        raise DistillError("--lora-plus sets the learning rate of LoRA adapters' B matrices and needs --lora > 0")
    if o.lora and o.fsdp:
        raise DistillError("--fsdp shards the weights stage 2 trains, and LoRA adapters (--lora, on by default) are not sharded: "
                           "pass --lora 0 with --fsdp")
    if o.global_steps is not None and (not isinstance(o.global_steps, int) or o.global_steps < 0):
        raise DistillError(f"--global-steps must be an integer >= 0, got {o.global_steps!r}")
    if o.time_budget is not None:
        if isinstance(o.time_budget, bool) or not isinstance(o.time_budget, (int, float)) or not o.time_budget > 0:
            raise DistillError(f"--time-budget must be a positive number of minutes, got {o.time_budget!r}")
        if o.global_steps is not None:
            raise DistillError("--time-budget sets the number of stage-2 steps: give it or --global-steps, not both")
    if not 0 <= o.warmup < 1 or o.temperature <= 0 or o.lr <= 0 or o.global_lr <= 0:
        raise DistillError("need --global-steps >= 0, 0 <= --warmup < 1, and positive --temperature, --lr, --global-lr")

