"""The teacher's hidden states at the span boundaries, computed once into a disk cache and streamed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapters import adapter_for
from ..core.scoring import all_finite, capture_boundaries, capture_layer_inputs, layer_output
from ..engine.models import DTYPES
from ..errors import NonFiniteActivations
from ..outputs import atomic_folder, write_json_atomic
from .common import _span
from .options import DistillOptions


# -- teacher boundaries ---------------------------------------------------------
def _cache_file(cache: Path, boundary: int, chunk: int) -> Path:
    return cache / f"b{boundary:03d}_c{chunk:05d}.safetensors"


def _build_cache(teacher, adapter, tokens: torch.Tensor, boundaries: set[int], o: DistillOptions, cache: Path) -> None:
    """Teacher states at `boundaries` for every chunk of `batch_size` sequences, written once."""
    from safetensors.torch import save_file

    if (cache / "manifest.json").is_file():
        return  # complete: the manifest is written last
    device, dtype = next(teacher.parameters()).device, DTYPES[o.cache_dtype]
    starts = range(0, tokens.shape[0], o.batch_size)
    with atomic_folder(cache, overwrite=True) as tmp:
        for c, b0 in enumerate(tqdm(starts, desc="teacher cache", unit="chunk", disable=not o.progress, leave=False)):
            states, _ = capture_boundaries(teacher, adapter, tokens[b0 : b0 + o.batch_size].to(device), boundaries)
            for b, h in states.items():
                if not all_finite(h):
                    raise NonFiniteActivations(f"the teacher has non-finite hidden states (NaN/Inf) at layer boundary {b}; try --dtype float32")
                save_file({"h": h.to(dtype).cpu().contiguous()}, _cache_file(tmp, b, c))
        write_json_atomic(tmp / "manifest.json", {"boundaries": sorted(boundaries), "chunks": len(starts), "dtype": o.cache_dtype})


def _read_chunk(cache: Path, boundary: int, chunk: int) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(_cache_file(cache, boundary, chunk))["h"]


@torch.no_grad()
def span_errors(teacher: nn.Module, student: nn.Module, plan_layers: list[dict], tokens: torch.Tensor, batch_size: int = 8) -> dict[int, float]:
    """Teacher-forced normalised MSE of every student layer against the teacher span it stands for,
    on `tokens` ([n, seqlen] ids): the stage-1 objective, e.g. on held-out text."""
    adapter = adapter_for(teacher.config)
    device = next(teacher.parameters()).device
    kwargs = capture_layer_inputs(teacher, adapter, tokens[:1].to(device), all_layers=True)[1]
    boundaries = {b for rec in plan_layers for b in (_span(rec)[0], _span(rec)[1] + 1)}
    sums: dict[int, list[float]] = {k: [0.0, 0.0] for k in range(len(plan_layers))}
    for b0 in range(0, tokens.shape[0], batch_size):
        h, _ = capture_boundaries(teacher, adapter, tokens[b0 : b0 + batch_size].to(device), boundaries)
        for k, rec in enumerate(plan_layers):
            first, last = _span(rec)
            y = layer_output(adapter.layers(student)[k](h[first], **kwargs[first])).float()
            target = h[last + 1].float()
            sums[k][0] += (y - target).pow(2).sum().item()
            sums[k][1] += target.pow(2).sum().item()
    return {k: err / norm for k, (err, norm) in sums.items()}


