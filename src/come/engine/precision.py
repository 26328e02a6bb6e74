"""bfloat16 autocast where the device computes bfloat16 natively, shared by compression and distillation.

`auto` turns it on only there: elsewhere bfloat16 matrix products are emulated and slower than float32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively (a CUDA GPU that supports it; a CPU with AMX or AVX512-BF16),
    where bfloat16 autocast speeds work up; elsewhere it is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def uses_autocast(device: torch.device, mode: str) -> bool:
    """Whether `mode` (auto | on | off) means bfloat16 autocast on `device`."""
    return mode == "on" or (mode == "auto" and native_bf16(device))


def autocast_context(device: torch.device, mode: str):
    """A factory of the context that forward passes run in: bfloat16 autocast, or nothing."""
    if uses_autocast(device, mode):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
