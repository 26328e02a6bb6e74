"""The driver: check the models and the plan, prepare the work folder, run the stages, publish OUT atomically."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import data as data_mod
from ..adapters import adapter_for
from ..errors import OutputExists
from ..export import PLAN_FILE, save_compressed, versions
from ..models import load_model
from ..outputs import check_not_source, prepare_output, write_json_atomic
from .cache import _build_cache
from .common import _apply_trained, _is_merged, _Job, _layer_file, _rank_device, _span
from .launch import _backend, _run_stage
from .options import (
    _RUN_CONTROL,
    METRICS_FILE,
    DistillError,
    DistillOptions,
    _check_options,
)


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
    from ..models import parse_dtype

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
