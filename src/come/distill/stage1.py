"""Stage 1: each student layer learns, teacher-forced, the span of original layers it stands for."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.adapters import adapter_for
from ..core.scoring import capture_layer_inputs, layer_output
from ..outputs import atomic_file, write_json_atomic
from .cache import _read_chunk
from .common import (
    _epoch_order,
    _Job,
    _kl,
    _layer_file,
    _load_models,
    _log,
    _nmse,
    _non_finite,
    _optimizer,
    _save_atomic,
    _seed,
    _span,
    _step,
    _summarize,
)


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
    kwargs = capture_layer_inputs(teacher, adapter, tokens[:1].to(device), all_layers=True)[1]
    head = None
    if job.options.loss == "kl":
        norm, lm_head = teacher.get_submodule(adapter.final_norm_path), teacher.get_submodule(adapter.lm_head_path)
        head = lambda h: lm_head(norm(h))
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
            y = layer_output(layer(x, **kwargs))
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
    with atomic_file(weights, what="checkpoint") as tmp:  # the weights file marks the layer done
        save_file({n: t.detach().cpu().contiguous() for n, t in layer.state_dict().items()}, tmp)
    checkpoint.unlink(missing_ok=True)


