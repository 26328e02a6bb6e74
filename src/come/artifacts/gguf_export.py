"""`come export-gguf`: a compressed (or any supported) checkpoint folder as a GGUF file for llama.cpp / ollama.

Written with the `gguf` package (its writer, tensor-name map and quantisers): the
model's hyper-parameters as `<arch>.*` keys, the tokenizer and chat template
copied from the source GGUF when the model came from one (the built-in models
do), otherwise built from `tokenizer.json` (byte-level BPE), then every tensor
under its GGUF name. llama.cpp ropes Llama in the interleaved order of the
original checkpoints, so Llama's q/k rows are permuted as its own converter does
(and as transformers undoes when it reads a GGUF); it ropes Qwen2/Qwen3 in HF's
rotate-half order, so theirs are written as they are. Norms, biases and other
1-D tensors stay float32; matrices take the requested type. Gemma 3 is written as
llama.cpp's `gemma3` reads it: its zero-centred norms as 1 + w (as llama.cpp's
converter does), the rope bases of full and sliding layers, the sliding window, and
the per-layer sliding/full pattern as a bool array, so that a merged model whose
pattern no longer repeats every 6th layer keeps its own. What llama.cpp would run
differently from transformers (sliding windows outside Gemma 3, rope scaling, Qwen3
attention biases, Gemma 3 query scales or softcaps it does not apply) is refused
rather than written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import ComeError

# HF model type -> (GGUF architecture, q/k rows permuted for llama.cpp's rotary layout).
# llama.cpp's qwen2/qwen3 use the rotate-half (NEOX) rope of the HF weights: no permutation.
# llama.cpp's gemma3 ropes in NEOX order too (llama_model_rope_type), so Gemma 3 is not permuted either.
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False), "gemma3_text": ("gemma3", False)}
# GGUF architectures whose llama.cpp graph has per-layer sliding-window attention.
SLIDING_ARCHITECTURES = ("gemma3",)
# RMSNorm gain stored as gain - offset by transformers (Gemma's zero-centred norms); llama.cpp multiplies by the gain.
NORM_OFFSET = {"gemma3_text": 1.0}
# The layer count of Gemma 3 27B: llama.cpp's gemma3 then scales queries by 1/sqrt(hidden / heads), not 1/sqrt(head_dim).
GEMMA3_27B_LAYERS = 62
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


def _rope_sets(config) -> dict[str, dict]:
    """The rope parameters per attention kind: Gemma 3 keeps one set per layer type, other families one ("")."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return dict(rope)
    return {"": rope}


def rope_theta(config, kind: str = "full_attention", default: float = 10000.0) -> float:
    """The rope base of the layers of `kind` (the single one of families without per-kind rope)."""
    sets = _rope_sets(config)
    theta = (sets.get(kind) or sets.get("") or {}).get("rope_theta") or getattr(config, "rope_theta", None)
    return float(theta or default)


def gemma3_attention_scale_dim(config) -> int:
    """The d of llama.cpp's gemma3 query scale 1/sqrt(d): the head size, or hidden / heads for a 62-layer (27B) model."""
    if config.num_hidden_layers == GEMMA3_27B_LAYERS:
        return config.hidden_size // config.num_attention_heads
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_gemma3(config) -> None:
    """What llama.cpp's gemma3 (src/models/gemma3.cpp) computes differently from transformers' Gemma 3."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    if len(layer_types) != config.num_hidden_layers:
        raise GGUFExportError(f"gemma3 config lists {len(layer_types)} layer_types for {config.num_hidden_layers} layers")
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise GGUFExportError(f"gemma3 layer types {', '.join(unknown)} cannot be exported: "
                              "llama.cpp's gemma3 has only sliding and full attention layers")
    if "sliding_attention" in layer_types and not (getattr(config, "sliding_window", None) or 0) > 0:
        raise GGUFExportError("gemma3 has sliding-attention layers but no sliding_window")
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise GGUFExportError(f"gemma3 with hidden_activation {config.hidden_activation!r} cannot be exported: "
                              "llama.cpp's gemma3 uses the tanh GELU (gelu_pytorch_tanh)")
    if getattr(config, "attn_logit_softcapping", None):
        raise GGUFExportError("gemma3 with attn_logit_softcapping cannot be exported: llama.cpp's gemma3 does not apply it")
    if getattr(config, "use_bidirectional_attention", False):
        raise GGUFExportError("gemma3 with bidirectional attention cannot be exported: llama.cpp's gemma3 is causal")
    if getattr(config, "attention_bias", False):
        raise GGUFExportError("gemma3 with attention biases cannot be exported: llama.cpp's gemma3 has no output bias")
    # transformers scales queries by query_pre_attn_scalar ** -0.5; llama.cpp by 1/sqrt(d), d fixed by the layer count.
    dim = gemma3_attention_scale_dim(config)
    if getattr(config, "query_pre_attn_scalar", dim) != dim:
        rule = (f"hidden_size / heads = {dim}, its rule for {GEMMA3_27B_LAYERS}-layer models"
                if config.num_hidden_layers == GEMMA3_27B_LAYERS else f"head_dim = {dim}")
        raise GGUFExportError(f"gemma3 with query_pre_attn_scalar {config.query_pre_attn_scalar} cannot be exported: "
                              f"llama.cpp's gemma3 scales queries by 1/sqrt({rule})")


def check_exportable(config) -> None:
    """Refuse what the GGUF architecture cannot express: llama.cpp would run it differently from transformers."""
    if config.model_type not in ARCHITECTURES:
        raise _unsupported(config.model_type)
    arch = ARCHITECTURES[config.model_type][0]
    if arch not in SLIDING_ARCHITECTURES and (
            getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or [])):
        raise GGUFExportError(f"{config.model_type} with sliding-window attention cannot be exported: "
                              f"llama.cpp's {arch} architecture has no sliding window")
    for rope in _rope_sets(config).values():
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise GGUFExportError(f"rope scaling {rope_type!r} is not written to GGUF yet; only default rope is exported")
    if config.model_type == "qwen3" and getattr(config, "attention_bias", False):
        # llama.cpp's qwen3 graph adds no q/k/v biases: they would be dropped.
        raise GGUFExportError("qwen3 with attention biases cannot be exported: llama.cpp's qwen3 has none")
    if arch == "gemma3":
        _check_gemma3(config)


def _write_gemma3_keys(writer, config) -> bool:
    """Gemma 3's keys as llama.cpp's gemma3 loader reads them; whether the pattern differs from its default.

    The loader (llama_model_gemma3::load_arch_hparams, llama.cpp@0c1e57098) turns sliding windows on
    only when `attention.sliding_window` > 0; then `load_swa_pattern` takes the per-layer bool array
    `attention.sliding_window_pattern` (true = sliding) if the file has one, else its default period
    of 6 (every 6th layer full); sliding layers rope with `rope.freq_base_swa` (default 10000), full
    ones with `rope.freq_base`. A model with no sliding layer gets no window: every layer is full.
    """
    writer.add_rope_freq_base_swa(rope_theta(config, "sliding_attention"))
    sliding = [kind == "sliding_attention" for kind in config.layer_types]
    if any(sliding):
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(sliding)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    default = [i % 6 < 5 for i in range(len(sliding))]
    return any(sliding) and sliding != default


def _source_gguf(folder: Path) -> Path | None:
    """The .gguf the model came from: named by the plan of a compressed folder, or by the marker of a
    cached conversion (a dense model loaded from a .gguf)."""
    from ..engine.models import gguf_source_of

    plan_file = folder / "come_plan.json"
    if not plan_file.is_file():
        return gguf_source_of(folder)
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


def _has_component(node, kind: str) -> bool:
    """Whether a tokenizer.json pre-tokenizer / decoder (possibly a Sequence) has a part of type `kind`."""
    stack = [node or {}]
    while stack:
        node = stack.pop()
        if node.get("type") == kind:
            return True
        stack.extend(node.get("pretokenizers") or node.get("decoders") or [])
    return False


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
    if not _has_component(spec.get("pre_tokenizer"), "ByteLevel") and not _has_component(spec.get("decoder"), "ByteLevel"):
        # e.g. Gemma's SentencePiece-style BPE (byte fallback, "▁" spaces): llama.cpp's "gpt2" would split it wrongly
        raise GGUFExportError("only byte-level BPE tokenizers are converted (this BPE tokenizer is not byte-level) "
                              "and the model did not come from a GGUF to copy one from")
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

    from ..engine.models import load_model
    from ..outputs import atomic_file, check_output_file

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
        writer.add_rope_freq_base(rope_theta(config, "full_attention"))  # Gemma 3: its full-attention layers'
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(FILE_TYPES[qtype])
        own_pattern = arch == "gemma3" and _write_gemma3_keys(writer, config)
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
            if name.endswith("norm.weight") and config.model_type in NORM_OFFSET:
                t = t + NORM_OFFSET[config.model_type]  # llama.cpp multiplies by the stored gain as is
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
    if own_pattern:
        print("come: note: this Gemma 3 model's sliding/full layer pattern is not every 6th layer full; it is written "
              "as gemma3.attention.sliding_window_pattern, which llama.cpp builds from before that key was read for "
              "gemma3 ignore (they would run some layers with the wrong attention)", file=sys.stderr)
    return out
