"""The driver: check the models and the plan, prepare the work folder, run the stages, publish OUT atomically."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..artifacts.plan import PLAN_FILE, versions
from ..artifacts.publish import save_compressed
from ..core.adapters import adapter_for
from ..engine.models import load_model
from ..errors import OutputExists
from ..evaluation import data as data_mod
from ..outputs import check_not_source, prepare_output, publish_folder, write_json_atomic
from .cache import _build_cache
from .common import _apply_trained, _is_merged, _Job, _layer_file, _rank_device, _seed, _span
from .launch import _backend, _run_stage
from .options import (
    _RUN_CONTROL,
    DEFAULT_TOKENS,
    METRICS_FILE,
    DistillError,
    DistillOptions,
    _check_options,
)
from .select import check, read_selection, write_selection


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


def _check_ids(ids: torch.Tensor, what: str, vocab_size: int | None = None) -> None:
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype != torch.long:
        raise data_mod.DataError(f"{what} must be a [n, seqlen] tensor of token ids (int64, seqlen >= 2)")
    if vocab_size is not None and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise data_mod.DataError(f"{what} hold ids outside the vocabulary (0..{vocab_size - 1})")


def _heldout_rows(o: DistillOptions, seqlen: int) -> int:
    """Held-out windows for the fidelity check; fewer than one is a budget too small to judge training by."""
    n = o.heldout_tokens // seqlen
    if n < 1:
        raise DistillError(f"--heldout-tokens {o.heldout_tokens} is less than one window of {seqlen} tokens: too small to judge "
                           "the training on; give at least one window (more make the check less noisy)")
    return n


def _split_off(ids: torch.Tensor, n_held: int, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows): `n_held` rows chosen by a seeded permutation, both in their original order."""
    if ids.shape[0] <= n_held:
        raise DistillError(f"{what} has {ids.shape[0]} sequences: holding out {n_held} for the fidelity check leaves none "
                           "to train on; give more training tokens or fewer --heldout-tokens")
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(_seed(seed, "heldout")))
    return ids[order[n_held:].sort().values].clone(), ids[order[:n_held].sort().values].clone()


def _draw(tokenizer, source: str, nsamples: int, o: DistillOptions, what: str) -> torch.Tensor:
    try:
        return data_mod.calibration_tokens(tokenizer, source, nsamples, o.seqlen, seed=o.seed, split="calib")
    except data_mod.DataError as exc:
        if "has only" in str(exc):  # the too-small case: say what was asked in distill's terms
            raise data_mod.DataError(f"not enough text for {what}: {exc}") from None
        raise


def _training_tokens(tokenizer, tokens, heldout, o: DistillOptions, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows), never sharing a window.

    Drawn from the text: one seeded draw of both from --data's calib split (or the held-out ones from
    --heldout-data). A ready tensor of ids: the held-out rows are split off it unless given."""
    if isinstance(tokens, torch.Tensor):
        _check_ids(tokens, "tokens", vocab_size)
        train, held = tokens.cpu(), None
        if heldout is None:
            train, held = _split_off(train, _heldout_rows(o, train.shape[1]), o.seed, "the tokens tensor")
    else:
        if not isinstance(tokens, int) or tokens < 1:
            raise data_mod.DataError(f"--tokens must be a positive integer, got {tokens!r}")
        nsamples, n_held = math.ceil(tokens / o.seqlen), _heldout_rows(o, o.seqlen)
        if heldout is None and o.heldout_data in (None, o.data):
            both = _draw(tokenizer, o.data, nsamples + n_held, o, f"--tokens {tokens} plus --heldout-tokens {o.heldout_tokens}")
            train, held = _split_off(both, n_held, o.seed, "the drawn text")
        else:
            train = _draw(tokenizer, o.data, nsamples, o, f"--tokens {tokens}")
            held = None if heldout is not None else _draw(tokenizer, o.heldout_data, n_held, o, f"--heldout-tokens {o.heldout_tokens}")
    if heldout is not None:
        _check_ids(heldout, "heldout", vocab_size)
        held = heldout.cpu()
    separate = heldout is not None or (not isinstance(tokens, torch.Tensor) and o.heldout_data not in (None, o.data))
    seen = {row.numpy().tobytes() for row in train} if separate and held.shape[1] == train.shape[1] else set()
    if any(row.numpy().tobytes() in seen for row in held):  # split-off windows are disjoint by construction
        raise DistillError("the held-out text overlaps the training text (a held-out window is also a training window): "
                           "the check would reward memorising it; use other held-out text")
    return train, held


def _prepare_work(work: Path, settings: dict, tokens: torch.Tensor, heldout: torch.Tensor, resume: bool, overwrite: bool) -> bool:
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
    torch.save(heldout, work / "heldout.pt")
    write_json_atomic(run_file, settings)
    return False


def _write_metrics(work: Path, dest: Path) -> None:
    """metrics.jsonl without the steps a resumed run repeated (the last record of a step wins), in order."""
    latest = {}
    if (work / METRICS_FILE).is_file():
        for line in (work / METRICS_FILE).read_text().splitlines():
            rec = json.loads(line)
            layer = rec.get("point") if rec["stage"] == "eval" else rec["layer"]
            latest[(rec["stage"], -1 if layer is None else layer, rec["step"])] = rec
    # Training records by (stage, layer, step), a --time-budget's count before stage 2's; the held-out checks
    # after them, in the order they were made.
    training = sorted(k for k in latest if k[0] in (1, 2))
    budget = [k for k in latest if k[0] == "time_budget"]
    stage1 = [k for k in training if k[0] == 1]
    checks = [k for k in latest if k[0] == "eval"]
    order = stage1 + budget + training[len(stage1):] + checks
    dest.write_text("".join(json.dumps(latest[key]) + "\n" for key in order))


def _publish(student, tokenizer, plan: dict, work: Path, out: Path) -> Path:
    """Write the result in the work folder, then swap it into `out` with renames."""
    from ..engine.models import parse_dtype

    saved_as = (plan.get("save_dtype") or {}).get("dtype")  # the compressed model's dtype, kept
    staged = save_compressed(student, tokenizer, plan, work / "final", overwrite=True,
                             save_dtype=parse_dtype(saved_as) if saved_as else None)
    _write_metrics(work, staged / METRICS_FILE)
    publish_folder(staged, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _check_lora_rank(o: DistillOptions, compressed_dir: Path) -> None:
    """A LoRA rank must be below the narrowest side of every linear map it adapts; checked from the config alone."""
    if not o.lora:
        return
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(compressed_dir)
    except (OSError, ValueError):
        return  # not a HF folder (e.g. a plan next to a GGUF): the layer sizes are checked once loaded
    cfg = getattr(cfg, "text_config", cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    widths = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "key/value width": head_dim * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)}
    name, width = min(widths.items(), key=lambda kv: kv[1])
    if o.lora >= width:
        raise DistillError(f"--lora {o.lora} is not below the layer width it adapts ({name} {width}): a rank that large is "
                           "full-rank training with extra cost; use a smaller rank or train the weights without --lora")


def _choose(selection: dict) -> str:
    """The candidate with the lowest held-out KL; ties go to the one with less training (input < stage1 < stage2)."""
    order = [c for c in ("input", "stage1", "stage2") if c in selection["candidates"]]
    return min(order, key=lambda c: (selection["candidates"][c]["kl"], order.index(c)))


def distill(
    compressed_dir: str | Path,
    out: str | Path,
    teacher: str | Path | None = None,
    data: str = "wikipedia",
    tokens: int | torch.Tensor = DEFAULT_TOKENS,
    *,
    heldout: torch.Tensor | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    **options,
) -> dict:
    """Distil the compressed model in `compressed_dir` from its teacher and write it to `out`.

    `teacher`: model folder/.gguf/hub id; default the original named in the plan.
    `tokens`: training tokens per layer drawn from `data` (calib split), or a
    ready [n, seqlen] tensor of ids (its held-out rows are split off unless
    `heldout`, a [m, seqlen] tensor, is given). `options` are `DistillOptions`
    fields. The output is the candidate with the lowest held-out KL to the
    teacher among the input, the stage-1 result and the stage-2 checks: never a
    model worse than the input on that measure. `resume` continues OUT.partial/
    from its last checkpoints; `stop_after` stops (as if killed) after that many
    optimizer steps in this process, for tests and time-boxed runs. Returns the
    distillation record.
    """
    o = DistillOptions(data=data, **options)
    _check_options(o)
    if not isinstance(tokens, torch.Tensor):
        _heldout_rows(o, o.seqlen)  # a held-out budget too small to judge by is refused before any work
    elif heldout is None and tokens.dim() == 2:
        _heldout_rows(o, tokens.shape[1])
    started = time.perf_counter()
    compressed_dir = Path(compressed_dir).expanduser().resolve()
    _check_lora_rank(o, compressed_dir)
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

    device = _rank_device(o.device, rank, world)
    t_loaded = load_model(teacher_source, dtype=o.dtype, device=device)
    s_loaded = load_model(str(compressed_dir), dtype=o.dtype, device=device)
    teacher_model, student = t_loaded.model.requires_grad_(False), s_loaded.model.requires_grad_(False)
    _check_compatible(teacher_model, student, plan)
    ids, held = _training_tokens(s_loaded.tokenizer, tokens, heldout, o, student.config.vocab_size)
    o.seqlen = int(ids.shape[1])
    if o.global_steps is None:  # one pass over the training windows
        o.global_steps = math.ceil(ids.shape[0] / (o.batch_size * o.grad_accum * world))
    stage1_layers = [k for k, rec in enumerate(plan["layers"]) if o.layers == "all" or (o.layers == "merged" and _is_merged(rec))]
    if not stage1_layers and o.global_steps == 0:
        raise DistillError("nothing to train: the plan has no merged layers; use --layers all or --global-steps")
    if o.global_steps and o.train != "all" and not any(_is_merged(rec) for rec in plan["layers"]):
        raise DistillError("stage 2 has nothing to train: the plan has no merged layers; use --train all")

    settings = {k: v for k, v in dataclasses.asdict(o).items() if k not in _RUN_CONTROL}
    settings |= {"teacher": teacher_source, "student": str(compressed_dir), "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                 "heldout_sha256": hashlib.sha256(held.numpy().tobytes()).hexdigest()}
    settings["stage2_workers"] = world if o.global_steps else None  # each worker adds a batch per step
    resumed = _prepare_work(work, settings, ids, held, resume, overwrite) if rank == 0 else None
    job = _Job(str(compressed_dir), teacher_source, str(work), plan["layers"], stage1_layers, o, max(1, torch.get_num_threads() // world), stop_after)
    adapter = adapter_for(student.config)
    selection = read_selection(work) if rank == 0 else {}
    if rank == 0 and "input" not in selection["candidates"]:
        checked = time.perf_counter()
        selection["candidates"]["input"] = check(job, teacher_model, student, "input")
        selection["check_seconds"] = round(time.perf_counter() - checked, 4)  # prices the checks of --time-budget
        write_selection(work, selection)
    if stage1_layers and rank == 0:
        boundaries = {b for k in stage1_layers for b in (_span(plan["layers"][k])[0], _span(plan["layers"][k])[1] + 1)}
        _build_cache(teacher_model, adapter, ids, boundaries, o, work / "cache")
    if external:
        dist.barrier()
    teacher_info, models = t_loaded.source, (teacher_model, student)
    if world > 1 and not external:
        models = None  # the workers load their own copies
    if stage1_layers:
        layers = adapter.layers(student)
        before = {k: {n: t.clone() for n, t in layers[k].state_dict().items()} for k in stage1_layers} if rank == 0 else {}
        _run_stage("stage1", job, world, external, models)
        if rank == 0 and "stage1" not in selection["candidates"]:
            _apply_trained(student, job, stage2=False)
            selection["candidates"]["stage1"] = check(job, teacher_model, student, "stage1")
            write_selection(work, selection)
        if rank == 0 and _choose(selection) != "stage1":  # stage 2 starts from the better of the two
            for k, state in before.items():
                layers[k].load_state_dict(state)
        del before
    if o.global_steps:
        if rank == 0:
            selection["stage2_start"] = _choose(selection)
            write_selection(work, selection)
        if external:
            dist.barrier()
        _run_stage("stage2", job, world, external, models)
    if rank != 0:
        return {}

    stage2 = json.loads((work / "stage2" / "summary.json").read_text()) if o.global_steps else None
    if stage2 and o.time_budget is not None:
        o.global_steps = stage2["time_budget"]["steps"]  # what the budget bought: --global-steps N repeats the run
    if stage2 and stage2.get("best"):
        selection["candidates"]["stage2"] = stage2["best"]
    chosen = _choose(selection)
    selection["chosen"] = chosen
    write_selection(work, selection)
    # A fresh copy of the input, then what the chosen candidate trained (stage 2 may have changed or sharded this one).
    del student, models
    student = load_model(str(compressed_dir), dtype=o.dtype, device=device).model.requires_grad_(False)
    use_stage1 = chosen == "stage1" or (chosen == "stage2" and selection.get("stage2_start") == "stage1")
    _apply_trained(student, job, stage1=use_stage1, stage2=chosen == "stage2")
    stage1 = {k: json.loads(_layer_file(job, k, ".json").read_text()) for k in stage1_layers}
    first, best = selection["candidates"]["input"], selection["candidates"][chosen]
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
        "selection": {
            "measure": "mean per-token KL(teacher || student) in nats on held-out windows never trained on",
            "heldout": {"windows": int(held.shape[0]), "seqlen": int(held.shape[1]), "tokens": int(held.numel()),
                        "source": ("pre-tokenized" if heldout is not None or isinstance(tokens, torch.Tensor)
                                   else data_mod.describe_source(o.heldout_data or o.data, "calib")),
                        "sha256": settings["heldout_sha256"]},
            "candidates": selection["candidates"],
            "stage2_start": selection.get("stage2_start"),
            "chosen": chosen,
            "improved": chosen != "input",
            "kl_before": first["kl"],
            "kl_after": best["kl"],
        },
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
