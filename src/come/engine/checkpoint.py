"""Safetensors checkpoints read and written one tensor at a time: `Checkpoint` reads a local folder's
tensors on demand (one file, or shards with an index); `write_shards` streams tensors into size-limited
shards (and their index) without ever holding a whole file in memory."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from ..errors import ComeError, ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
ST_FLOATS = {"F64", "F32", "F16", "BF16"}


# -- reading ------------------------------------------------------------------
class Checkpoint:
    """The tensors of a local safetensors checkpoint (one file, or shards with an index), read on demand."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        if (self.folder / INDEX_FILE).is_file():
            weight_map = json.loads((self.folder / INDEX_FILE).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ModelLoadError(
                f"layer-wise mode reads safetensors weights: {self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, safetensors dtype)
        for file in files:
            try:
                with safe_open(self.folder / file, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        piece = f.get_slice(name)
                        self.file_of[name] = self.folder / file
                        self.info[name] = (tuple(piece.get_shape()), piece.get_dtype())
            except Exception as exc:  # noqa: BLE001 SafetensorError on damaged headers, OSError on missing shards
                raise ModelLoadError(f"cannot read the weights in {self.folder / file}: {str(exc).splitlines()[0]}") from None

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def spec(self, name: str, dtype: torch.dtype) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of `name` as read with floating tensors cast to `dtype`."""
        shape, st_dtype = self.info[name]
        return (dtype if st_dtype in ST_FLOATS else TORCH_DTYPES[st_dtype]), shape

    def read(self, names, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors `names` on `device`, floating ones cast to `dtype`; each file is opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return out


# -- writing ------------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """Bytes in "2GB", "500MB", "200KB", "1GiB" or a plain number (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not match:
        raise ComeError(f"cannot read the size {size!r}; write it like 2GB, 500MB or 200KB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".find(unit[:1]) + 1 if unit else 0
    return int(number * base**power)


def tensor_bytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors(path: Path, items: list[tuple], metadata: dict | None = None) -> None:
    """Write a safetensors file one tensor at a time, so the file is never in memory as a whole.

    `items` are (name, dtype, shape, reader); the header is built from the
    dtypes and shapes, then each reader is called once and its bytes written.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in items:
        nbytes = tensor_bytes(dtype, shape)
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, read in items:
            t = read()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ComeError(f"tensor {name}: expected {dtype} {tuple(shape)}, read {t.dtype} {tuple(t.shape)}")
            f.write(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def write_shards(folder: Path, items: list[tuple], max_shard_size: str | int) -> None:
    """Write `items` ((name, dtype, shape, reader), in order) as `folder`/model.safetensors, or as shards
    of at most `max_shard_size` with an index when they do not fit in one (as save_pretrained names them)."""
    limit = parse_size(max_shard_size)
    shards: list[list[tuple]] = [[]]
    size = total = 0
    for item in items:
        nbytes = tensor_bytes(item[1], item[2])
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
        total += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, shard, metadata={"format": "pt"})
        weight_map.update({item[0]: file for item in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
