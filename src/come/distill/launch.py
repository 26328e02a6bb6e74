"""Running a stage in this process, in a torchrun rank, or in spawned workers (errors come back as one line)."""

from __future__ import annotations

import json
import shutil
import socket

import torch
import torch.distributed as dist

from ..engine.models import resolve_device
from ..errors import ComeError, ModelLoadError, NonFiniteActivations
from ..evaluation import data as data_mod
from ..outputs import write_json_atomic
from .common import _Job
from .options import DistillError, DistillInterrupted, NonFiniteLoss
from .stage1 import _stage1
from .stage2 import _stage2


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


