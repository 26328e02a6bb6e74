"""Tiny random-weight models of every supported family, built from configs (no downloads).

Used by the tests and benchmarks; random weights exercise the same code paths
as real ones.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
MODEL_TYPES = {"gemma3": "gemma3_text"}


def tiny_config(family: str = "llama", **overrides):
    from transformers import AutoConfig

    base = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    if family in ("qwen2", "qwen3"):
        base.update(max_window_layers=4, use_sliding_window=False)
    if family == "gemma3":
        # Sliding and full attention interleaved (a short window, so it matters at test lengths).
        base.update(sliding_window=8, query_pre_attn_scalar=16, tie_word_embeddings=True)
        layers = overrides.get("num_hidden_layers", base["num_hidden_layers"])
        base["layer_types"] = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(layers)]
    base.update(overrides)
    return AutoConfig.for_model(MODEL_TYPES.get(family, family), **base)


def _randomize_norms(model, generator):
    # Unit RMSNorm gains would hide mistakes in folding them; make every gain distinct.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # gains in [0.5, 1.5); Gemma's norms hold gain - 1
                offset = 1.0 if model.config.model_type == "gemma3_text" else 0.0
                p.copy_(0.5 - offset + torch.rand(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="sdpa")
    _randomize_norms(model, torch.Generator().manual_seed(seed))
    return model.eval()


def tiny_tokens(vocab_size: int = 128, nsamples: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))
