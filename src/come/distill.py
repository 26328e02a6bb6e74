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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from .adapters import Adapter, adapter_for
from .errors import ComeError, ModelLoadError, NonFiniteActivations, OutputExists
from .export import PLAN_FILE, save_compressed, versions
from .outputs import check_not_source, prepare_output, write_json_atomic
from .models import DTYPES, load_model, resolve_device
from .scoring import _capture_layer_inputs

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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _log(work: Path, record: dict) -> None:
    # One write per line in append mode: lines from several ranks never interleave.
    with open(work / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _optimizer(params: list[nn.Parameter], lr: float, o: DistillOptions, total_steps: int):
    """AdamW with linear warm-up over `warmup` of the steps, then cosine decay towards 0."""
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


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature`, scaled by T^2 (Hinton et al.)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _summarize(losses: list[float]) -> dict:
    tail = losses[-max(1, len(losses) // 10) :]
    return {"steps": len(losses), "initial_loss": losses[0] if losses else None, "final_loss": sum(tail) / len(tail) if tail else None}


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


# -- teacher boundaries ---------------------------------------------------------
class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_boundaries(model: nn.Module, adapter: Adapter, ids: torch.Tensor, boundaries: set[int]) -> dict[int, torch.Tensor]:
    """Hidden states at `boundaries` (b < L: input of layer b; b = L: output of the last layer),
    from the model's own forward, stopped as soon as the deepest one is seen."""
    layers = adapter.layers(model)
    deepest, found = max(boundaries), {}

    def keep(b, h):
        found[b] = h
        if b == deepest:
            raise _Stop

    hooks = [
        layers[b].register_forward_pre_hook(lambda m, a, kw, b=b: keep(b, a[0] if a else kw["hidden_states"]), with_kwargs=True)
        for b in boundaries
        if b < len(layers)
    ]
    if len(layers) in boundaries:
        hooks.append(layers[-1].register_forward_hook(lambda m, a, out: keep(len(layers), _layer_out(out))))
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return found


def _cache_file(cache: Path, boundary: int, chunk: int) -> Path:
    return cache / f"b{boundary:03d}_c{chunk:05d}.safetensors"


def _build_cache(teacher, adapter, tokens: torch.Tensor, boundaries: set[int], o: DistillOptions, cache: Path) -> None:
    """Teacher states at `boundaries` for every chunk of `batch_size` sequences, written once."""
    from safetensors.torch import save_file

    if (cache / "manifest.json").is_file():
        return  # complete: the manifest is written last
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device, dtype = next(teacher.parameters()).device, DTYPES[o.cache_dtype]
    starts = range(0, tokens.shape[0], o.batch_size)
    for c, b0 in enumerate(tqdm(starts, desc="teacher cache", unit="chunk", disable=not o.progress, leave=False)):
        states = _capture_boundaries(teacher, adapter, tokens[b0 : b0 + o.batch_size].to(device), boundaries)
        for b, h in states.items():
            if not torch.isfinite(h).all():
                raise NonFiniteActivations(f"the teacher has non-finite hidden states (NaN/Inf) at layer boundary {b}; try --dtype float32")
            save_file({"h": h.to(dtype).cpu().contiguous()}, _cache_file(tmp, b, c))
    write_json_atomic(tmp / "manifest.json", {"boundaries": sorted(boundaries), "chunks": len(starts), "dtype": o.cache_dtype})
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


def _read_chunk(cache: Path, boundary: int, chunk: int) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(_cache_file(cache, boundary, chunk))["h"]


@torch.no_grad()
def span_errors(teacher: nn.Module, student: nn.Module, plan_layers: list[dict], tokens: torch.Tensor, batch_size: int = 8) -> dict[int, float]:
    """Teacher-forced normalised MSE of every student layer against the teacher span it stands for,
    on `tokens` ([n, seqlen] ids): the stage-1 objective, e.g. on held-out text."""
    adapter = adapter_for(teacher.config)
    device = next(teacher.parameters()).device
    kwargs = _capture_layer_inputs(teacher, adapter, tokens[:1].to(device), all_layers=True)[1]
    boundaries = {b for rec in plan_layers for b in (_span(rec)[0], _span(rec)[1] + 1)}
    sums: dict[int, list[float]] = {k: [0.0, 0.0] for k in range(len(plan_layers))}
    for b0 in range(0, tokens.shape[0], batch_size):
        h = _capture_boundaries(teacher, adapter, tokens[b0 : b0 + batch_size].to(device), boundaries)
        for k, rec in enumerate(plan_layers):
            first, last = _span(rec)
            y = _layer_out(adapter.layers(student)[k](h[first], **kwargs[first])).float()
            target = h[last + 1].float()
            sums[k][0] += (y - target).pow(2).sum().item()
            sums[k][1] += target.pow(2).sum().item()
    return {k: err / norm for k, (err, norm) in sums.items()}


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


def _apply_trained(student: nn.Module, job: _Job, stage2: bool = True) -> None:
    """Load the finished stage-1 layers (and the stage-2 result) into `student`."""
    from safetensors.torch import load_file

    layers = adapter_for(student.config).layers(student)
    for k in job.stage1_layers:
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


# -- stage 1 -----------------------------------------------------------------------
def _stage1(rank: int, world: int, job: _Job, models=None) -> None:
    mine = [k for k in job.stage1_layers[rank::world] if not _layer_file(job, k, ".safetensors").is_file()]
    if not mine:
        return
    teacher, student = models or _load_models(job, rank, world)
    adapter = adapter_for(student.config)
    device = next(student.parameters()).device
    tokens = torch.load(job.dir / "tokens.pt")
    # Masks and rotary embeddings depend only on the sequence shape: one capture serves every chunk.
    kwargs = _capture_layer_inputs(teacher, adapter, tokens[:1].to(device), all_layers=True)[1]
    head = None
    if job.options.loss == "kl":
        norm, lm_head = teacher.get_submodule(adapter.final_norm_path), teacher.get_submodule(adapter.lm_head_path)
        head = lambda h: lm_head(norm(h))  # noqa: E731
    for k in mine:
        first, last = _span(job.plan_layers[k])
        _train_layer(k, adapter.layers(student)[k], kwargs[first], first, last + 1, head, tokens.shape[0], job, rank)


def _train_layer(k, layer, kwargs, source, target, head, nsamples, job: _Job, rank: int) -> None:
    from safetensors.torch import save_file

    o, cache = job.options, job.dir / "cache"
    device, dtype = next(layer.parameters()).device, next(layer.parameters()).dtype
    n_chunks = math.ceil(nsamples / o.batch_size)
    micro_total = o.epochs * n_chunks
    total = math.ceil(micro_total / o.grad_accum)
    layer.requires_grad_(True).train()
    params = list(layer.parameters())
    opt, sched = _optimizer(params, o.lr, o, total)
    checkpoint = _layer_file(job, k, ".ckpt.pt")
    progress = {"step": 0, "losses": []}
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device)
        layer.load_state_dict(saved["layer"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"].cpu())
        progress = saved["progress"]
    bar = tqdm(total=total, initial=progress["step"], desc=f"stage 1 layer {k}", position=rank, disable=not o.progress, leave=False)
    while progress["step"] < total:
        step = progress["step"]
        if step == 0:
            torch.manual_seed(_seed(o.seed, "stage1", k))  # no layer randomness today (no dropout), but seeded
        opt.zero_grad(set_to_none=True)
        micro = range(step * o.grad_accum, min(micro_total, (step + 1) * o.grad_accum))
        step_loss = 0.0
        for m in micro:  # data position = step * grad_accum: restored by the step count
            epoch, i = divmod(m, n_chunks)  # the m-th micro-batch: a chunk of the epoch's permutation
            chunk = _epoch_order(n_chunks, o.seed, "stage1", k, epoch)[i]
            x = _read_chunk(cache, source, chunk).to(device, dtype)
            y = _layer_out(layer(x, **kwargs))
            t = _read_chunk(cache, target, chunk).to(device)
            if head is None:
                loss = _nmse(y, t) if o.loss == "mse" else (1 - F.cosine_similarity(y.float(), t.float(), dim=-1)).mean()
            else:
                with torch.no_grad():
                    teacher_logits = head(t.to(dtype))
                loss = _kl(head(y), teacher_logits, o.temperature)
            if not torch.isfinite(loss):
                raise _non_finite(f"stage 1, layer {k}, step {step + 1}", checkpoint, job.dir)
            (loss / len(micro)).backward()
            step_loss += loss.item() / len(micro)
        lr = _step(params, opt, sched, o)
        progress["step"] += 1
        progress["losses"].append(step_loss)
        _log(job.dir, {"stage": 1, "layer": k, "step": progress["step"], "loss": step_loss, "lr": lr})
        bar.update()
        bar.set_postfix(loss=f"{step_loss:.4g}")
        if progress["step"] % o.save_every == 0 and progress["step"] < total:
            state = {"layer": layer.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
            _save_atomic({**state, "rng": torch.get_rng_state(), "progress": progress}, checkpoint)
        job.count_step()
    bar.close()
    layer.requires_grad_(False).eval()
    weights = _layer_file(job, k, ".safetensors")
    write_json_atomic(_layer_file(job, k, ".json"), {"covers": job.plan_layers[k]["covers"], **_summarize(progress["losses"])})
    save_file({n: t.detach().cpu().contiguous() for n, t in layer.state_dict().items()}, weights.with_name(weights.name + ".tmp"))
    os.replace(weights.with_name(weights.name + ".tmp"), weights)  # the weights file marks the layer done
    checkpoint.unlink(missing_ok=True)


# -- stage 2 -----------------------------------------------------------------------
def _stage2_parameters(student: nn.Module, job: _Job) -> list[tuple[str, nn.Parameter]]:
    if job.options.train == "all":
        return list(student.named_parameters())
    prefix = adapter_for(student.config).layers_path
    chosen = {f"{prefix}.{k}." for k, rec in enumerate(job.plan_layers) if _is_merged(rec)}
    return [(n, p) for n, p in student.named_parameters() if any(n.startswith(c) for c in chosen)]


def _stage2_rows(n: int, seed: int, start: int, count: int) -> list[int]:
    """Rows start..start+count of an endless stream of seeded per-epoch permutations of range(n)."""
    return [_epoch_order(n, seed, "stage2", pos // n)[pos % n] for pos in range(start, start + count)]


def _shard(student: nn.Module, device: torch.device, world: int) -> nn.Module:
    """FSDP2: each decoder layer its own shard group, the rest (embeddings, final norm, head) the root's.
    Parameters become DTensors under the same names; frozen ones simply get no gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in adapter_for(student.config).layers(student):
        fully_shard(layer, mesh=mesh)
    return fully_shard(student, mesh=mesh)


def _full_state(model: nn.Module, opt, names: list[str], fsdp: bool, optimizer: bool = True) -> tuple[dict, dict | None]:
    """(trainable tensors by name, optimizer state) as ordinary full CPU tensors. Under FSDP a collective
    (every rank calls it) whose result only rank 0 holds; the optimizer state is then keyed by name."""
    if not fsdp:
        params = dict(model.named_parameters())
        return {n: params[n].detach().cpu() for n in names}, (opt.state_dict() if optimizer else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=full)
    trainable = {n: state[n] for n in names if n in state}
    return trainable, (get_optimizer_state_dict(model, opt, options=full) if optimizer else None)


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing (`activation_*` in recent transformers, `gradient_*` before)."""
    kwargs = {"use_reentrant": False}  # reentrant needs inputs that require grad; embeddings may be frozen
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs) if on else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs) if on else model.gradient_checkpointing_disable()


def _stage2(rank: int, world: int, job: _Job, models=None) -> None:
    final, checkpoint = job.dir / "stage2" / "final.pt", job.dir / "stage2" / "checkpoint.pt"
    if final.is_file():
        return
    o = job.options
    teacher, student = models or _load_models(job, rank, world)
    _apply_trained(student, job, stage2=False)
    adapter = adapter_for(student.config)
    device = next(student.parameters()).device
    tokens = torch.load(job.dir / "tokens.pt")
    named = _stage2_parameters(student, job)
    for _, p in named:
        p.requires_grad_(True)
    names = [n for n, _ in named]
    fsdp = o.fsdp and world > 1
    saved = torch.load(checkpoint, map_location="cpu" if fsdp else device) if checkpoint.is_file() else None
    if saved is not None:
        _load_named(student, saved["trainable"])  # before sharding: every rank reads the full tensors
    if o.gradient_checkpointing:
        _set_checkpointing(student, True)
    student.train()
    net = student
    if fsdp:
        net = _shard(student, device, world)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    params = [dict(student.named_parameters())[n] for n in names]  # after sharding: FSDP's DTensor parameters
    opt, sched = _optimizer(params, o.global_lr, o, o.global_steps)
    progress = {"step": 0, "losses": []}
    if saved is not None:
        if fsdp:  # the full, name-keyed state every rank loaded: each keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(net, opt, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        progress = saved["progress"]
        del saved

    pairs = [(k, _span(rec)[1]) for k, rec in enumerate(job.plan_layers)]
    s_out, t_out = {}, {}

    def keep(store, key):  # assignment, so a checkpointing replay just overwrites
        return lambda m, a, out: store.__setitem__(key, _layer_out(out))

    hooks = [adapter.layers(student)[k].register_forward_hook(keep(s_out, k)) for k, _ in pairs]
    hooks += [adapter.layers(teacher)[j].register_forward_hook(keep(t_out, j)) for j in {j for _, j in pairs}]
    bar = tqdm(total=o.global_steps, initial=progress["step"], desc="stage 2", disable=not o.progress or rank > 0, leave=False)
    try:
        while progress["step"] < o.global_steps:
            step = progress["step"]
            torch.manual_seed(_seed(o.seed, "stage2", step, rank))
            opt.zero_grad(set_to_none=True)
            parts = torch.zeros(3, device=device)  # loss, kd, hidden: averaged over micro-batches and ranks
            for a in range(o.grad_accum):
                first_row = ((step * o.grad_accum + a) * world + rank) * o.batch_size
                ids = tokens[_stage2_rows(tokens.shape[0], o.seed, first_row, o.batch_size)].to(device)
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                sync = world == 1 or a == o.grad_accum - 1
                if fsdp:
                    net.set_requires_gradient_sync(sync)  # FSDP2's no_sync: reduce-scatter on the last micro-batch
                with contextlib.nullcontext() if sync or fsdp else net.no_sync():
                    kd = _kl(net(input_ids=ids, use_cache=False).logits, teacher_logits, o.temperature)
                    hidden = torch.stack([_nmse(s_out[k], t_out[j]) for k, j in pairs]).mean()
                    loss = kd + o.hidden_weight * hidden
                    now = torch.stack([loss, kd, hidden]).detach()
                    if world > 1:
                        dist.all_reduce(now)  # every rank sees the same values and stops together
                        now /= world
                    if not torch.isfinite(now).all():
                        raise _non_finite(f"stage 2, step {step + 1}", checkpoint, job.dir)
                    (loss / o.grad_accum).backward()
                parts += now / o.grad_accum
            lr = _step(params, opt, sched, o)
            loss, kd, hidden = parts.tolist()
            progress["step"] += 1
            progress["losses"].append(kd)
            bar.update()
            bar.set_postfix(kd=f"{kd:.4g}", hidden=f"{hidden:.3g}")
            if rank == 0:
                _log(job.dir, {"stage": 2, "layer": None, "step": progress["step"], "loss": loss, "kd": kd, "hidden": hidden, "lr": lr})
            if progress["step"] % o.save_every == 0 and progress["step"] < o.global_steps and (rank == 0 or fsdp):
                trainable, opt_state = _full_state(student, opt, names, fsdp)  # FSDP: gathered by every rank
                if rank == 0:
                    state = {"optimizer": opt_state, "scheduler": sched.state_dict()}
                    _save_atomic({"trainable": trainable, **state, "progress": progress}, checkpoint)
            job.count_step()
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    if o.gradient_checkpointing:
        _set_checkpointing(student, False)
    trainable = _full_state(student, opt, names, fsdp, optimizer=False)[0] if rank == 0 or fsdp else None
    student.eval().requires_grad_(False)
    if rank == 0:
        write_json_atomic(job.dir / "stage2" / "summary.json", _summarize(progress["losses"]))
        _save_atomic(trainable, final)
        checkpoint.unlink(missing_ok=True)


# -- launching -------------------------------------------------------------------
def _backend(device: str) -> str:
    return "nccl" if resolve_device(device).type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ERRORS = {cls.__name__: cls for cls in (DistillError, NonFiniteLoss, DistillInterrupted, data_mod.DataError, ModelLoadError, NonFiniteActivations)}


def _worker(rank: int, world: int, port: int, stage: str, job: _Job) -> None:
    torch.set_num_threads(job.threads)
    dist.init_process_group(_backend(job.options.device), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        (_stage1 if stage == "stage1" else _stage2)(rank, world, job)
        dist.barrier()
    except ComeError as exc:  # handed to the parent as a one-line error, not a traceback
        write_json_atomic(job.dir / "errors" / f"rank{rank}.json", {"type": type(exc).__name__, "message": str(exc)})
        raise
    finally:
        dist.destroy_process_group()


def _run_stage(stage: str, job: _Job, world: int, external: bool, models) -> None:
    """Run a stage in this process (world 1), in this rank (torchrun), or in `world` spawned workers."""
    fn = _stage1 if stage == "stage1" else _stage2
    if world == 1:
        return fn(0, 1, job, models)
    if external:
        fn(dist.get_rank(), world, job, models)
        dist.barrier()
        return
    import torch.multiprocessing as mp

    shutil.rmtree(job.dir / "errors", ignore_errors=True)
    try:
        mp.spawn(_worker, args=(world, _free_port(), stage, job), nprocs=world, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        reports = sorted((job.dir / "errors").glob("rank*.json"))
        if not reports:
            raise
        report = json.loads(reports[0].read_text())
        raise _ERRORS.get(report["type"], DistillError)(report["message"]) from None


# -- the driver ---------------------------------------------------------------------
def _load_plan(compressed_dir: Path) -> dict:
    path = compressed_dir / PLAN_FILE
    if not path.is_file():
        raise DistillError(f"{compressed_dir} has no {PLAN_FILE}: distill needs a folder written by `come compress`")
    return json.loads(path.read_text())


def _teacher_source(plan: dict, teacher) -> str | None:
    if teacher is not None:
        return str(teacher)
    model = plan.get("model") or {}
    if model.get("kind") == "default":
        return None
    if model.get("kind") == "builtin":
        return model["builtin"]
    path = model.get("path")
    if path and (Path(path).is_dir() or (model.get("kind") == "gguf" and Path(path).is_file())):
        return path
    raise DistillError(f"the plan's original model {model.get('name', path)!r} is not available locally; pass --teacher")


def _check_compatible(teacher: nn.Module, student: nn.Module, plan: dict) -> None:
    t, s = teacher.config, student.config
    for field, what in (("model_type", "architecture"), ("vocab_size", "vocabulary size"), ("hidden_size", "hidden size")):
        if getattr(t, field) != getattr(s, field):
            raise DistillError(f"teacher and student differ in {what}: {getattr(t, field)} vs {getattr(s, field)}")
    t_layers, s_layers = len(adapter_for(t).layers(teacher)), len(adapter_for(s).layers(student))
    if len(plan["layers"]) != s_layers:
        raise DistillError(f"the plan describes {len(plan['layers'])} layers but the student has {s_layers}")
    if plan.get("original_layers") not in (None, t_layers):
        raise DistillError(f"the plan was made from a {plan['original_layers']}-layer model but the teacher has {t_layers} layers")
    for rec in plan["layers"]:
        if not rec["covers"] or min(rec["covers"]) < 0 or max(rec["covers"]) >= t_layers:
            raise DistillError(f"plan layer {rec['index']} covers {rec['covers']}, outside the teacher's layers 0..{t_layers - 1}")


def _training_tokens(tokenizer, tokens, o: DistillOptions, vocab_size: int) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype != torch.long:
            raise data_mod.DataError("tokens must be a [n, seqlen] tensor of token ids (int64, seqlen >= 2)")
        if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
            raise data_mod.DataError(f"tokens hold ids outside the vocabulary (0..{vocab_size - 1})")
        return tokens.cpu()
    if not isinstance(tokens, int) or tokens < 1:
        raise data_mod.DataError(f"--tokens must be a positive integer, got {tokens!r}")
    nsamples = math.ceil(tokens / o.seqlen)
    try:
        return data_mod.calibration_tokens(tokenizer, o.data, nsamples, o.seqlen, seed=o.seed, split="calib")
    except data_mod.DataError as exc:
        if "has only" in str(exc):  # the too-small case: say what was asked in distill's terms
            raise data_mod.DataError(f"not enough text for --tokens {tokens}: {exc}") from None
        raise


def _prepare_work(work: Path, settings: dict, tokens: torch.Tensor, resume: bool, overwrite: bool) -> bool:
    """Create or reopen the work folder; True when an earlier run is continued."""
    run_file = work / "run.json"
    if work.exists() and resume and run_file.is_file():
        before = json.loads(run_file.read_text())
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            name = changed[0]
            raise DistillError(
                f"cannot resume {work}: it was started with {name} = {before.get(name)!r}, now {settings[name]!r}; "
                "use the same settings or pass --overwrite to start over"
            )
        return True
    if work.exists() and not (overwrite or resume):
        raise OutputExists(f"{work} holds an unfinished distillation: pass --resume to continue it or --overwrite to start over")
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("stage1", "stage2"):
        (work / sub).mkdir(parents=True)
    torch.save(tokens, work / "tokens.pt")
    write_json_atomic(run_file, settings)
    return False


def _write_metrics(work: Path, dest: Path) -> None:
    """metrics.jsonl without the steps a resumed run repeated (the last record of a step wins), in order."""
    latest = {}
    if (work / METRICS_FILE).is_file():
        for line in (work / METRICS_FILE).read_text().splitlines():
            rec = json.loads(line)
            latest[(rec["stage"], -1 if rec["layer"] is None else rec["layer"], rec["step"])] = rec
    dest.write_text("".join(json.dumps(latest[key]) + "\n" for key in sorted(latest)))


def _publish(student, tokenizer, plan: dict, work: Path, out: Path) -> Path:
    """Write the result in the work folder, then swap it into `out` with renames."""
    from .models import parse_dtype

    saved_as = (plan.get("save_dtype") or {}).get("dtype")  # the compressed model's dtype, kept
    staged = save_compressed(student, tokenizer, plan, work / "final", overwrite=True,
                             save_dtype=parse_dtype(saved_as) if saved_as else None)
    _write_metrics(work, staged / METRICS_FILE)
    trash = None
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
    os.replace(staged, out)
    for folder in (trash, work):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return out


def distill(
    compressed_dir: str | Path,
    out: str | Path,
    teacher: str | Path | None = None,
    data: str = "wikipedia",
    tokens: int | torch.Tensor = 262_144,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    **options,
) -> dict:
    """Distil the compressed model in `compressed_dir` from its teacher and write it to `out`.

    `teacher`: model folder/.gguf/hub id; default the original named in the plan.
    `tokens`: training tokens per layer drawn from `data` (calib split), or a
    ready [n, seqlen] tensor of ids used as is. `options` are `DistillOptions`
    fields. `resume` continues OUT.partial/ from its last checkpoints;
    `stop_after` stops (as if killed) after that many optimizer steps in this
    process, for tests and time-boxed runs. Returns the distillation record.
    """
    o = DistillOptions(data=data, **options)
    _check_options(o)
    started = time.perf_counter()
    compressed_dir = Path(compressed_dir).expanduser().resolve()
    out = prepare_output(out, overwrite, sources=[compressed_dir])  # before any work
    work = out.with_name(out.name + ".partial")
    plan = _load_plan(compressed_dir)
    teacher_source = _teacher_source(plan, teacher)
    check_not_source(out, [teacher_source])

    external = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun: one call per rank
    if external and not dist.is_initialized():
        dist.init_process_group(_backend(o.device))
    rank, world = (dist.get_rank(), dist.get_world_size()) if external else (0, o.workers)
    if o.fsdp and world < 2:
        raise DistillError("--fsdp shards stage 2 over several processes: use it with --workers 2 or more (or torchrun)")

    t_loaded = load_model(teacher_source, dtype=o.dtype, device=_rank_device(o.device, rank, world))
    s_loaded = load_model(str(compressed_dir), dtype=o.dtype, device=_rank_device(o.device, rank, world))
    teacher_model, student = t_loaded.model.requires_grad_(False), s_loaded.model.requires_grad_(False)
    _check_compatible(teacher_model, student, plan)
    ids = _training_tokens(s_loaded.tokenizer, tokens, o, student.config.vocab_size)
    o.seqlen = int(ids.shape[1])
    stage1_layers = [k for k, rec in enumerate(plan["layers"]) if o.layers == "all" or (o.layers == "merged" and _is_merged(rec))]
    if not stage1_layers and o.global_steps == 0:
        raise DistillError("nothing to train: the plan has no merged layers; use --layers all or --global-steps")
    if o.global_steps and not any(o.train == "all" or _is_merged(rec) for rec in plan["layers"]):
        raise DistillError("stage 2 has nothing to train: the plan has no merged layers; use --train all")

    settings = {k: v for k, v in dataclasses.asdict(o).items() if k not in _RUN_CONTROL}
    settings |= {"teacher": teacher_source, "student": str(compressed_dir), "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    settings["stage2_workers"] = world if o.global_steps else None  # each worker adds a batch per step
    resumed = _prepare_work(work, settings, ids, resume, overwrite) if rank == 0 else None
    job = _Job(str(compressed_dir), teacher_source, str(work), plan["layers"], stage1_layers, o, max(1, torch.get_num_threads() // world), stop_after)
    adapter = adapter_for(student.config)
    if stage1_layers and rank == 0:
        boundaries = {b for k in stage1_layers for b in (_span(plan["layers"][k])[0], _span(plan["layers"][k])[1] + 1)}
        _build_cache(teacher_model, adapter, ids, boundaries, o, work / "cache")
    if external:
        dist.barrier()
    teacher_info, models = t_loaded.source, (teacher_model, student)
    if world > 1 and not external:
        del teacher_model, t_loaded, models  # the workers load their own copies
        models = None
    if stage1_layers:
        _run_stage("stage1", job, world, external, models)
    if o.global_steps:
        _run_stage("stage2", job, world, external, models)
    if rank != 0:
        return {}

    if o.fsdp and external and o.global_steps:  # stage 2 sharded this process's student in place: a fresh copy
        del student, models
        student = load_model(str(compressed_dir), dtype=o.dtype, device=_rank_device(o.device, rank, world)).model.requires_grad_(False)
    _apply_trained(student, job)
    stage1 = {k: json.loads(_layer_file(job, k, ".json").read_text()) for k in stage1_layers}
    stage2 = json.loads((work / "stage2" / "summary.json").read_text()) if o.global_steps else None
    record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": teacher_info,
        "student": str(compressed_dir),
        "data": {
            "source": {"name": "tokens", "kind": "pre-tokenized"} if isinstance(tokens, torch.Tensor) else data_mod.describe_source(o.data, "calib"),
            "nsamples": int(ids.shape[0]),
            "seqlen": int(ids.shape[1]),
            "tokens": int(ids.numel()),
            "sha256": settings["tokens_sha256"],
        },
        "options": {k: v for k, v in dataclasses.asdict(o).items() if k != "progress"},
        "stage1": {"tokens_per_layer": int(ids.numel()) * o.epochs, "loss": o.loss, "layers": stage1} if stage1_layers else None,
        "stage2": {**stage2, "tokens": o.global_steps * o.grad_accum * world * o.batch_size * int(ids.shape[1])} if stage2 else None,
        "workers": world,
        "resumed": bool(resumed),
        "seconds": round(time.perf_counter() - started, 2),  # this call only, when resumed
        "versions": versions(),
    }
    if "distillation" in plan:
        record["previous"] = plan["distillation"]
    plan = {**plan, "distillation": record}
    student.eval()
    _publish(student, s_loaded.tokenizer, plan, work, out)
    return {"out": str(out), **record}
