"""Stage 2: end-to-end logit distillation plus hidden-state alignment (DDP or FSDP2 over workers)."""

from __future__ import annotations

import contextlib
import json
import time

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..core.adapters import adapter_for
from ..core.scoring import layer_output
from ..engine.precision import autocast_context
from ..outputs import write_json_atomic
from .common import (
    _apply_trained,
    _epoch_order,
    _is_merged,
    _Job,
    _kl,
    _load_models,
    _load_named,
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
from .select import check, read_selection


# -- stage 2 -----------------------------------------------------------------------
def _stage2_layers(job: _Job) -> list[int]:
    """Decoder layers stage 2 trains: merged ones, those and their neighbours, or all."""
    n = len(job.plan_layers)
    merged = {k for k, rec in enumerate(job.plan_layers) if _is_merged(rec)}
    if job.options.train == "all":
        return list(range(n))
    if job.options.train == "neighbours":
        merged |= {j for k in merged for j in (k - 1, k + 1) if 0 <= j < n}
    return sorted(merged)


def _stage2_parameters(student: nn.Module, job: _Job) -> list[tuple[str, nn.Parameter]]:
    if job.options.train == "all" and not job.options.lora:
        return list(student.named_parameters())
    adapter = adapter_for(student.config)
    chosen = tuple(f"{adapter.layers_path}.{k}." for k in _stage2_layers(job))
    if job.options.lora:
        adapters = _add_lora(student, chosen, job)
        if not job.options.lora_vectors:
            return adapters
        # LoRA's own matrices are 2-D: the 1-D parameters are the norm gains and the wrapped maps' biases
        vectors = [(n, p) for n, p in student.named_parameters() if p.dim() == 1 and n.startswith(chosen + (f"{adapter.final_norm_path}.",))]
        return adapters + vectors
    return [(n, p) for n, p in student.named_parameters() if n.startswith(chosen)]


def _add_lora(student: nn.Module, prefixes: tuple[str, ...], job: _Job) -> list[tuple[str, nn.Parameter]]:
    """Rank-r LoRA adapters (PEFT) on every linear map of the chosen layers, in place; returns the adapter parameters."""
    from peft import LoraConfig, get_peft_model

    o = job.options
    targets = [n for n, m in student.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefixes)]
    torch.manual_seed(_seed(o.seed, "lora"))  # the adapters' initialisation
    config = LoraConfig(r=o.lora, lora_alpha=o.lora_alpha or 2 * o.lora, lora_dropout=0.0, target_modules=targets)
    get_peft_model(student, config)  # injects the adapters into `student` itself
    return [(n, p) for n, p in student.named_parameters() if "lora_" in n]


def parameter_groups(names: list[str], params: list[nn.Parameter], o) -> list:
    """What stage 2's optimizer trains: the parameters, or with --lora-plus two groups, the adapters' B matrices
    (zero at the start) at `lora_plus` times the rate of the rest."""
    if not (o.lora and o.lora_plus != 1):
        return params
    fast = [p for n, p in zip(names, params, strict=True) if "lora_B" in n]
    rest = [p for n, p in zip(names, params, strict=True) if "lora_B" not in n]
    return [{"params": rest}, {"params": fast, "lr": o.global_lr * o.lora_plus}]


@torch.no_grad()
def lora_merged_weights(model: nn.Module, trained: list[str] = ()) -> dict[str, torch.Tensor]:
    """{name of an adapted weight in the plain model: base weight + its LoRA delta}: what merging writes; plus the
    parameters named in `trained` (trained in full beside the adapters), under their names in the plain model."""
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            merged[f"{name}.weight"] = (base.weight + delta).detach().cpu().contiguous()
    params = dict(model.named_parameters())
    for name in trained:
        if "lora_" not in name:  # a wrapped layer's own bias sits under `base_layer` in the adapted model
            merged[name.replace(".base_layer.", ".")] = params[name].detach().cpu().clone()
    return merged


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
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

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


BUDGET_FILE = "time_budget.json"
_clock = time.perf_counter  # the budget's clock (tests substitute their own)


def _time_budget(job: _Job, rank: int, world: int, params, rows: int, micro_batch, selection: dict) -> dict:
    """The record of --time-budget; its "steps": stage 2's optimizer steps, as many as fit in the budget with their
    held-out checks.

    Four whole trial steps run first: every micro-batch's forward and backward, clipping, and an AdamW step at
    learning rate 0, which leaves the weights as they are. The median of the last three (the first carries one-off
    costs) prices a step; the input model's held-out check prices a check. The count is written to the work
    folder, so a resumed run keeps it, and `--global-steps` with it repeats the run."""
    o = job.options
    path = job.dir / "stage2" / BUDGET_FILE
    if path.is_file():
        return json.loads(path.read_text())
    started = _clock()
    trial = torch.optim.AdamW(params, lr=0.0, weight_decay=o.weight_decay)
    seconds = []
    for step in range(4):
        t0 = _clock()
        trial.zero_grad(set_to_none=True)
        for a in range(o.grad_accum):
            micro_batch(step, a)
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        trial.step()
        seconds.append(_clock() - t0)
    trial.zero_grad(set_to_none=True)
    del trial
    step_s = torch.tensor([sorted(seconds[1:])[1]], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # every rank the same count, set by the slowest
    step_s = float(step_s)
    check_s = float(selection.get("check_seconds") or 0.0)
    left = o.time_budget * 60 - (_clock() - started) - check_s  # the last check comes after the last step
    per_step = step_s + (check_s / o.eval_every if o.eval_every else 0.0)
    steps = max(1, int(left // per_step))
    record = {"minutes": o.time_budget, "steps": steps, "step_seconds": round(step_s, 4),
              "check_seconds": round(check_s, 4), "passes": round(steps * o.grad_accum * world * o.batch_size / rows, 3)}
    if rank == 0:
        write_json_atomic(path, record)
        _log(job.dir, {"stage": "time_budget", "layer": None, "step": 0, **record})  # not a training step
    return record


def _stage2(rank: int, world: int, job: _Job, models=None) -> None:
    final, checkpoint = job.dir / "stage2" / "final.pt", job.dir / "stage2" / "checkpoint.pt"
    best_file, summary = job.dir / "stage2" / "best.pt", job.dir / "stage2" / "summary.json"
    if summary.is_file():  # written last: stage 2 is done
        return
    o = job.options
    selection = read_selection(job.dir)
    start = selection.get("stage2_start", "input")
    teacher, student = models or _load_models(job, rank, world)
    _apply_trained(student, job, stage1=start == "stage1", stage2=False)
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

    pairs = [(k, _span(rec)[1]) for k, rec in enumerate(job.plan_layers)]
    s_out, t_out = {}, {}

    def keep(store, key):  # assignment, so a checkpointing replay just overwrites
        return lambda m, a, out: store.__setitem__(key, layer_output(out))

    hooks = [adapter.layers(student)[k].register_forward_hook(keep(s_out, k)) for k, _ in pairs]
    hooks += [adapter.layers(teacher)[j].register_forward_hook(keep(t_out, j)) for j in {j for _, j in pairs}]
    precision = autocast_context(device, o.autocast)

    def micro_batch(step: int, a: int) -> torch.Tensor:
        """Forward and backward of micro-batch `a` of optimizer step `step`: [loss, kd, hidden], averaged over ranks."""
        first_row = ((step * o.grad_accum + a) * world + rank) * o.batch_size
        ids = tokens[_stage2_rows(tokens.shape[0], o.seed, first_row, o.batch_size)].to(device)
        with torch.no_grad(), precision():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        sync = world == 1 or a == o.grad_accum - 1
        if fsdp:
            net.set_requires_gradient_sync(sync)  # FSDP2's no_sync: reduce-scatter on the last micro-batch
        with contextlib.nullcontext() if sync or fsdp else net.no_sync():
            with precision():
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
        return now

    bar, budget = None, None
    try:
        if o.time_budget is not None:
            budget = _time_budget(job, rank, world, params, tokens.shape[0], micro_batch, selection)
            o.global_steps = budget["steps"]
        opt, sched = _optimizer(parameter_groups(names, params, o), o.global_lr, o, o.global_steps)
        progress = {"step": 0, "losses": [], "best": {"step": 0, **selection["candidates"][start]}}
        if saved is not None:
            if fsdp:  # the full, name-keyed state every rank loaded: each keeps its shard
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_optimizer_state_dict,
                )

                set_optimizer_state_dict(net, opt, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            progress = saved["progress"]
            del saved

        bar = tqdm(total=o.global_steps, initial=progress["step"], desc="stage 2", disable=not o.progress or rank > 0, leave=False)
        while progress["step"] < o.global_steps:
            step = progress["step"]
            torch.manual_seed(_seed(o.seed, "stage2", step, rank))
            opt.zero_grad(set_to_none=True)
            parts = torch.zeros(3, device=device)  # loss, kd, hidden: averaged over micro-batches and ranks
            for a in range(o.grad_accum):
                parts += micro_batch(step, a) / o.grad_accum
            lr = _step(params, opt, sched, o)
            loss, kd, hidden = parts.tolist()
            progress["step"] += 1
            progress["losses"].append(kd)
            bar.update()
            bar.set_postfix(kd=f"{kd:.4g}", hidden=f"{hidden:.3g}")
            if rank == 0:
                _log(job.dir, {"stage": 2, "layer": None, "step": progress["step"], "loss": loss, "kd": kd, "hidden": hidden, "lr": lr})
            if (o.eval_every and progress["step"] % o.eval_every == 0) or progress["step"] == o.global_steps:
                # Every rank runs the check (an FSDP forward needs all of them) and so reaches the same verdict.
                result = check(job, teacher, student, "stage2", progress["step"], log=rank == 0)  # restores train()
                if result["kl"] < progress["best"]["kl"]:
                    progress["best"] = result
                    kept = lora_merged_weights(student, names) if o.lora else _full_state(student, opt, names, fsdp, optimizer=False)[0]
                    if rank == 0:
                        _save_atomic(kept, best_file)
            if progress["step"] % o.save_every == 0 and progress["step"] < o.global_steps and (rank == 0 or fsdp):
                trainable, opt_state = _full_state(student, opt, names, fsdp)  # FSDP: gathered by every rank
                if rank == 0:
                    state = {"optimizer": opt_state, "scheduler": sched.state_dict()}
                    _save_atomic({"trainable": trainable, **state, "progress": progress}, checkpoint)
            job.count_step()
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()
    if o.gradient_checkpointing:
        _set_checkpointing(student, False)
    student.eval().requires_grad_(False)
    if rank == 0:
        best = progress["best"] if progress["best"]["step"] > 0 else None  # None: no check beat the start
        if best is not None:
            best_file.replace(final)
        write_json_atomic(summary, {**_summarize(progress["losses"]), "start": start, "best": best,
                                    **({"time_budget": budget} if budget else {})})
        checkpoint.unlink(missing_ok=True)


