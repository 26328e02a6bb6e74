"""Where the calibration activations live: RAM, or one raw file per layer boundary.

A boundary is a [nsamples, seqlen, hidden] tensor. On disk it is read and
written by whole rows (calibration sequences) at their byte offset, never
mapped whole, so a batch costs only its own memory and the process's resident
size stays honest.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch

from ..errors import ComeError

STORAGES = ("auto", "ram", "disk")
# Activations (and merged layers) go to disk when they would take more than this share of free memory.
RAM_SHARE = 0.5


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_storage(requested: str, nbytes: int) -> str:
    """'ram' or 'disk' for `nbytes` of working data; 'auto' picks disk above RAM_SHARE of MemAvailable."""
    if requested not in STORAGES:
        raise ComeError(f"unknown activation storage {requested!r}; choose one of {', '.join(STORAGES)}")
    if requested != "auto":
        return requested
    return "disk" if nbytes > RAM_SHARE * available_memory() else "ram"


class DiskBoundary:
    """A [n, ...] tensor kept in a raw file, indexed by rows like a tensor: b[i:j], b[i:j, -1:], b[i:j] = x."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), dtype
        self.row_numel = 1
        for dim in self.shape[1:]:
            self.row_numel *= dim
        self.row_bytes = self.row_numel * torch.empty((), dtype=dtype).element_size()
        with open(self.path, "wb") as f:
            f.truncate(self.shape[0] * self.row_bytes)
        weakref.finalize(self, _unlink, self.path)  # the file goes with the object (e.g. invalidate_from)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, index) -> tuple[int, int]:
        if isinstance(index, int):
            index = index % self.shape[0]
            return index, index + 1
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise IndexError("DiskBoundary supports contiguous row ranges only")
        return start, max(start, stop)

    def __getitem__(self, index) -> torch.Tensor:
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        start, stop = self._rows(rows)
        out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        if out.numel():
            with open(self.path, "rb") as f:
                f.seek(start * self.row_bytes)
                f.readinto(out.view(-1).view(torch.uint8).numpy())
        if isinstance(rows, int):
            return out[0][rest] if rest else out[0]
        return out[(slice(None), *rest)] if rest else out

    def __setitem__(self, rows, value: torch.Tensor) -> None:
        start, stop = self._rows(rows)
        value = value.detach().to("cpu", self.dtype).contiguous()
        if value.numel() != (stop - start) * self.row_numel:
            raise ValueError(f"writing {tuple(value.shape)} into rows {start}:{stop} of {self.shape}")
        with open(self.path, "r+b") as f:
            f.seek(start * self.row_bytes)
            f.write(value.view(-1).view(torch.uint8).numpy().tobytes())

    def clone(self) -> torch.Tensor:
        return self[:]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class BoundaryStore:
    """Makes new boundaries in RAM (plain tensors) or as `DiskBoundary` files in `folder`."""

    def __init__(self, kind: str, folder: str | Path | None = None):
        if kind not in ("ram", "disk"):
            raise ValueError(kind)
        if kind == "disk" and folder is None:
            raise ValueError("disk storage needs a folder")
        self.kind, self.folder, self._count = kind, Path(folder) if folder else None, 0

    def new(self, shape: tuple[int, ...], dtype: torch.dtype):
        if self.kind == "ram":
            return torch.empty(shape, dtype=dtype)
        self._count += 1
        return DiskBoundary(self.folder / f"boundary-{self._count:05d}.bin", shape, dtype)
