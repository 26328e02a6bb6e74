"""What every stage shares: seeds, losses, optimiser steps, the picklable job each worker runs."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.adapters import adapter_for
from ..engine.models import load_model, resolve_device
from ..outputs import atomic_file
from .options import METRICS_FILE, DistillInterrupted, DistillOptions, NonFiniteLoss


# -- small helpers -------------------------------------------------------------
def _seed(*parts) -> int:
    """A 63-bit seed that depends on `parts` only (never on process, rank or call order)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _span(record: dict) -> tuple[int, int]:
    """(first, last) original layer of a plan record; covers are contiguous, so min..max."""
    return min(record["covers"]), max(record["covers"])


def _is_merged(record: dict) -> bool:
    # A shortgpt survivor that absorbed removed layers has covers > 1 and needs training too.
    return bool(record.get("merged")) or len(record["covers"]) > 1


def _save_atomic(obj, path: Path) -> None:
    with atomic_file(path, what="checkpoint") as tmp:
        torch.save(obj, tmp)


def _log(work: Path, record: dict) -> None:
    # One write per line in append mode: lines from several ranks never interleave.
    with open(work / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _optimizer(params: list, lr: float, o: DistillOptions, total_steps: int):
    """AdamW with linear warm-up over `warmup` of the steps, then cosine decay towards 0. `params`: parameters,
    or parameter groups (dicts) of which one may carry its own peak "lr"."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    warm = round(o.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _step(params, opt, sched, o: DistillOptions) -> float:
    lr = opt.param_groups[0]["lr"]
    if o.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
    opt.step()
    sched.step()
    return lr


@functools.lru_cache(maxsize=64)
def _epoch_order(n: int, *seed_parts) -> tuple[int, ...]:
    """A permutation of range(n) that depends on `seed_parts` (seed, stage, layer, epoch) only."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(_seed(*seed_parts))).tolist())


def _nmse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE relative to the target's mean square: comparable across layers whose scales differ by 100x."""
    y, target = y.float(), target.float()
    return (y - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


class _ChunkedKL(torch.autograd.Function):
    """KL(teacher || student) from logits, a block of rows at a time, with the gradient made in the forward.

    The plain composition (`.float()`, two `log_softmax`, `kl_div`, and autograd's backward through them)
    materialises about ten tensors the size of the logits (rows x vocabulary, hundreds of MB per micro-batch),
    each allocated, page-faulted in and freed every step. Here only blocks of `_KL_BLOCK` elements are
    temporary; the one full-size tensor kept is the gradient, in the student logits' dtype (what autograd
    would hand back for them anyway). Same value and gradient up to float summation order (tested)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature):
        s_all, t_all = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
        rows = s_all.shape[0]
        grad = None
        if ctx.needs_input_grad[0]:  # contiguous, so that its rows are a view the blocks write into
            grad = torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
        grad_rows = grad.flatten(0, -2) if grad is not None else None
        total = torch.zeros((), dtype=torch.float64, device=s_all.device)
        block = _KL_BLOCK if s_all.device.type == "cpu" else _KL_BLOCK_ACCELERATOR
        step = max(1, block // max(1, s_all.shape[-1]))
        with torch.autocast(s_all.device.type, enabled=False):
            for i in range(0, rows, step):
                total += _kl_block(s_all[i:i + step], t_all[i:i + step], temperature, grad_rows, i, rows)
        ctx.save_for_backward(grad)
        return (total * temperature**2 / rows).float()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def _kl_block(s, t, temperature: float, grad, first: int, rows: int) -> torch.Tensor:
    """One block's KL sum; writes its rows of the gradient into `grad` (if given)."""
    s, t = s.float(), t.float()
    if temperature != 1:
        s, t = s / temperature, t / temperature
    log_s, log_t = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    p_t = log_t.exp()
    value = torch.vdot(p_t.flatten(), (log_t - log_s).flatten()).double()
    if grad is not None:  # d/d(logits) of T^2 * KL / rows = (softmax(s / T) - p_t) * T / rows
        grad[first:first + s.shape[0]] = log_s.exp_().sub_(p_t).mul_(temperature / rows)
    return value


_KL_BLOCK = 1 << 21  # elements per block of rows: 8 MB in float32, under glibc malloc's largest mmap threshold (32 MiB)
_KL_BLOCK_ACCELERATOR = 1 << 26  # on a GPU, fewer and larger blocks: each block is a handful of kernel launches


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature`, scaled by T^2 (Hinton et al.)."""
    return _ChunkedKL.apply(student_logits, teacher_logits.detach(), float(temperature))


def _summarize(losses: list[float]) -> dict:
    tail = losses[-max(1, len(losses) // 10) :]
    return {"steps": len(losses), "initial_loss": losses[0] if losses else None, "final_loss": sum(tail) / len(tail) if tail else None}


# -- the job every rank runs ------------------------------------------------------
@dataclass
class _Job:
    """Everything a worker process needs (picklable: workers load the models themselves)."""

    student_dir: str
    teacher: str | None
    work: str
    plan_layers: list[dict]
    stage1_layers: list[int]
    options: DistillOptions
    threads: int
    stop_after: int | None = None
    steps_run: int = 0  # in this process, for the stop_after hook

    @property
    def dir(self) -> Path:
        return Path(self.work)

    def count_step(self) -> None:
        self.steps_run += 1
        if self.stop_after is not None and self.steps_run >= self.stop_after:
            raise DistillInterrupted(f"stopped after {self.steps_run} steps as asked; continue with --resume ({self.work})")


def _rank_device(device: str, rank: int, world: int) -> str:
    resolved = resolve_device(device)
    if resolved.type == "cuda" and world > 1:
        return f"cuda:{rank % torch.cuda.device_count()}"
    return str(resolved)


def _load_models(job: _Job, rank: int, world: int):
    o = job.options
    device = _rank_device(o.device, rank, world)
    teacher = load_model(job.teacher, dtype=o.dtype, device=device).model.requires_grad_(False)
    student = load_model(job.student_dir, dtype=o.dtype, device=device).model.requires_grad_(False)
    return teacher, student


def _layer_file(job: _Job, k: int, suffix: str) -> Path:
    return job.dir / "stage1" / f"layer_{k:03d}{suffix}"


def _apply_trained(student: nn.Module, job: _Job, stage1: bool = True, stage2: bool = True) -> None:
    """Load the finished stage-1 layers and/or the kept stage-2 result into `student`."""
    from safetensors.torch import load_file

    layers = adapter_for(student.config).layers(student)
    for k in job.stage1_layers if stage1 else ():
        if _layer_file(job, k, ".safetensors").is_file():
            layers[k].load_state_dict(load_file(_layer_file(job, k, ".safetensors")))
    final = job.dir / "stage2" / "final.pt"
    if stage2 and final.is_file():
        _load_named(student, torch.load(final, map_location="cpu"))


def _load_named(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _non_finite(where: str, checkpoint: Path, work: Path) -> NonFiniteLoss:
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint.is_file() else f"no checkpoint of it was saved yet (finished layers are in {work})"
    return NonFiniteLoss(f"non-finite loss (NaN/Inf) in {where}; stopped, {kept}; try a lower learning rate or --dtype float32")


