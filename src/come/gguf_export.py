"""`come export-gguf`: a compressed (or any supported) checkpoint folder as a GGUF file for llama.cpp / ollama.

Written with the `gguf` package (its writer, tensor-name map and quantisers): the
model's hyper-parameters as `<arch>.*` keys, the tokenizer and chat template
copied from the source GGUF when the model came from one (the built-in models
do), otherwise built from `tokenizer.json` (byte-level BPE), then every tensor
under its GGUF name. llama.cpp ropes Llama in the interleaved order of the
original checkpoints, so Llama's q/k rows are permuted as its own converter does
(and as transformers undoes when it reads a GGUF); it ropes Qwen2/Qwen3 in HF's
rotate-half order, so theirs are written as they are. Norms, biases and other
1-D tensors stay float32; matrices take the requested type. What llama.cpp would
run differently from transformers (sliding windows, rope scaling, Qwen3 attention
biases) is refused rather than written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import ComeError

# HF model type -> (GGUF architecture, q/k rows permuted for llama.cpp's rotary layout).
# llama.cpp's qwen2/qwen3 use the rotate-half (NEOX) rope of the HF weights: no permutation.
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False)}
TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# GGUF general.file_type (llama_ftype) of each whole-file type.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}


class GGUFExportError(ComeError):
    pass


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return getattr(GGMLQuantizationType, name.upper())


def permute_for_gguf(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary-half row order -> llama.cpp's interleaved order (the inverse of transformers' reverse)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unsupported(model_type: str) -> GGUFExportError:
    return GGUFExportError(f"GGUF export supports {', '.join(ARCHITECTURES)}; {model_type} is not supported yet")


def check_exportable(config) -> None:
    """Refuse what the GGUF architecture cannot express: llama.cpp would run it differently from transformers."""
    if config.model_type not in ARCHITECTURES:
        raise _unsupported(config.model_type)
    arch = ARCHITECTURES[config.model_type][0]
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise GGUFExportError(f"{config.model_type} with sliding-window attention cannot be exported: "
                              f"llama.cpp's {arch} architecture has no sliding window")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise GGUFExportError(f"rope scaling {rope_type!r} is not written to GGUF yet; only default rope is exported")
    if config.model_type == "qwen3" and getattr(config, "attention_bias", False):
        # llama.cpp's qwen3 graph adds no q/k/v biases: they would be dropped.
        raise GGUFExportError("qwen3 with attention biases cannot be exported: llama.cpp's qwen3 has none")


def _source_gguf(folder: Path) -> Path | None:
    plan_file = folder / "come_plan.json"
    if not plan_file.is_file():
        return None
    model = json.loads(plan_file.read_text()).get("model") or {}
    path = model.get("gguf") or (model.get("path") if model.get("kind") == "gguf" else None)
    return Path(path) if path and Path(path).is_file() else None


def _copy_tokenizer_fields(writer, source: Path) -> None:
    """tokenizer.* (and the chat template) of the source GGUF, field by field with their GGUF types."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif kind == GGUFValueType.STRING:
            writer.add_string(key, value)
        else:
            writer.add_key_value(key, value, kind)


# The pre-tokenizer split of Qwen2/Qwen3's tokenizer, which llama.cpp knows as "qwen2".
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json; "default" when it is not one it is known to match."""
    stack, patterns = [spec.get("pre_tokenizer") or {}], set()
    while stack:
        node = stack.pop()
        stack.extend(node.get("pretokenizers") or [])
        if node.get("type") == "Split":
            patterns.add((node.get("pattern") or {}).get("Regex"))
    return "qwen2" if QWEN2_SPLIT in patterns else "default"


def _tokenizer_from_files(writer, folder: Path, tokenizer=None) -> None:
    """A byte-level BPE tokenizer.json as GGUF tokenizer fields ("gpt2" model)."""
    from gguf import TokenType

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json and the model did not come from a GGUF to copy one from")
    spec = json.loads(file.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"only byte-level BPE tokenizers are converted (this one is {model.get('type')!r})")
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    size = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [TokenType.UNUSED] * size
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = TokenType.CONTROL if text in special else TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            add(vocab[token])
    if tokenizer is not None:  # llama.cpp's BOS/EOS defaults are per tokenizer type: say what HF does
        plain = tokenizer("a", add_special_tokens=False).input_ids
        full = tokenizer("a").input_ids
        writer.add_add_bos_token(tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] != plain[:1])
        writer.add_add_eos_token(tokenizer.eos_token_id is not None and full[-1:] == [tokenizer.eos_token_id] != plain[-1:])
    template = folder / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())
    elif config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def export_gguf(folder: str | Path, out: str | Path, qtype: str = "f16", overwrite: bool = False,
                progress: bool = True) -> Path:
    """Write the model in `folder` to the GGUF file `out` with matrices in `qtype`; returns its path."""
    import gguf

    from .models import load_model
    from .outputs import atomic_file, check_output_file

    if qtype not in TYPES:
        raise GGUFExportError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(TYPES)}")
    folder = Path(folder).expanduser().resolve()
    out = check_output_file(out, overwrite, sources=[folder])  # --overwrite replaces a file, never a folder
    config_file = folder / "config.json"
    try:  # an unsupported family is refused before its weights are read; a bad config is load_model's to report
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        model_type = None
    if isinstance(model_type, str) and model_type not in ARCHITECTURES:
        raise _unsupported(model_type)
    loaded = load_model(str(folder), dtype="float32")
    model, config = loaded.model, loaded.model.config
    check_exportable(config)
    arch, permute = ARCHITECTURES[config.model_type]
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    with atomic_file(out, overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(f"{loaded.source.get('name', folder.name)} ({n_layers} layers, come)")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        # Qwen3's head_dim need not be hidden_size / heads: llama.cpp reads it from key/value_length, and
        # its qwen2/qwen3 graphs require the rope dimension to equal it (whole heads are rotated).
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta")
                                        or getattr(config, "rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(FILE_TYPES[qtype])
        source = _source_gguf(folder)
        if source is not None:
            _copy_tokenizer_fields(writer, source)
        else:
            _tokenizer_from_files(writer, folder, loaded.tokenizer)

        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
        from tqdm.auto import tqdm

        for name, tensor in tqdm(state.items(), desc=f"GGUF {qtype}", unit="tensor", disable=not progress):
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise GGUFExportError(f"no GGUF name for tensor {name}")
            t = tensor.detach().float()
            if permute and name.endswith("self_attn.q_proj.weight"):
                t = permute_for_gguf(t, config.num_attention_heads)
            elif permute and name.endswith("self_attn.k_proj.weight"):
                t = permute_for_gguf(t, config.num_key_value_heads)
            data = t.numpy()
            if data.ndim < 2 or qtype == "f32":
                writer.add_tensor(gguf_name, data.astype(np.float32))
            elif qtype == "f16":
                writer.add_tensor(gguf_name, data.astype(np.float16))
            else:
                target = _qtype(qtype)
                writer.add_tensor(gguf_name, gguf.quants.quantize(data, target), raw_dtype=target)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
