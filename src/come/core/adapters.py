"""Declarative architecture adapters.

Everything the merge and scoring code needs to know about a model family lives
here as data: where the decoder layers are, which linear maps are split by
attention head (rows or columns), which by FFN neuron, which RMSNorm feeds
which maps, and which per-layer config fields must follow the layer list.
Adding a family whose decoder layer looks like Llama's is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ComeError


class UnsupportedArchitecture(ComeError, ValueError):
    pass


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    embed_path: str = "model.embed_tokens"
    layers_path: str = "model.layers"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    # Attention: maps whose output rows are grouped by query head / by KV head,
    # and the map whose input columns are grouped by query head.
    attn: str = "self_attn"
    query_rows: tuple[str, ...] = ("q_proj",)
    kv_rows: tuple[str, ...] = ("k_proj", "v_proj")
    query_cols: tuple[str, ...] = ("o_proj",)
    # Per-head norms shared by all heads (Qwen3 q_norm/k_norm): cannot be
    # concatenated, so merged by a ratio-weighted average.
    head_norms: tuple[str, ...] = ()
    # FFN: maps whose output rows are neurons, and the map reading them.
    mlp: str = "mlp"
    ffn_rows: tuple[str, ...] = ("gate_proj", "up_proj")
    ffn_cols: tuple[str, ...] = ("down_proj",)
    # RMSNorms and the maps (relative to the layer) whose input they produce.
    norm_feeds: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
        }
    )
    # RMSNorm gain = norm_offset + weight (Gemma's zero-centred norms: 1 + w).
    norm_offset: float = 0.0
    # Norms applied to a sublayer's output before the residual add (Gemma's post-norms), and the
    # map whose output each one normalises. The merged layer's sum of kept channels is no longer
    # the sum of normalised outputs; merging.py approximates it (see `merge_layers`).
    output_norms: dict[str, str] = field(default_factory=dict)
    # Layer types a merged layer takes in this order of preference (Gemma: a merged layer
    # attends fully if any source does); otherwise it takes its first source's.
    layer_type_priority: tuple[str, ...] = ()
    # Config fields: one entry per layer (follow the layer list) and layer
    # counts ("the first N layers are ...") that must be recomputed.
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    layer_count_fields: tuple[str, ...] = ()

    # -- navigation -------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def set_layers(self, model: nn.Module, layers: list[nn.Module]) -> None:
        parent, name = self.layers_path.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, nn.ModuleList(layers))

    def attn_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp)

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return self.attn_module(layer).get_submodule(self.query_cols[0])

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        return self.mlp_module(layer).get_submodule(self.ffn_cols[0])

    def ffn_output(self, layer: nn.Module) -> nn.Module:
        """The module whose output the FFN adds to the residual stream."""
        for norm, source in self.output_norms.items():
            if source == f"{self.mlp}.{self.ffn_cols[0]}":
                return layer.get_submodule(norm)
        return self.down_proj(layer)

    def merged_position(self, layer_types: list) -> int:
        """Which source of a merged window gives the merged layer its type (attention kind, position kwargs)."""
        for wanted in self.layer_type_priority:
            if wanted in layer_types:
                return layer_types.index(wanted)
        return 0

    # -- shapes -----------------------------------------------------------
    @staticmethod
    def head_dim(config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @staticmethod
    def kv_groups(config) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    @classmethod
    def queries_per_group(cls, config) -> int:
        return config.num_attention_heads // cls.kv_groups(config)


LLAMA = Adapter(family="llama", model_types=("llama",))
MISTRAL = Adapter(family="mistral", model_types=("mistral",))
QWEN2 = Adapter(family="qwen2", model_types=("qwen2",), layer_count_fields=("max_window_layers",))
QWEN3 = Adapter(
    family="qwen3",
    model_types=("qwen3",),
    head_norms=("q_norm", "k_norm"),
    layer_count_fields=("max_window_layers",),
)

GEMMA3 = Adapter(
    family="gemma3",
    model_types=("gemma3_text",),
    head_norms=("q_norm", "k_norm"),
    norm_feeds={
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    norm_offset=1.0,
    output_norms={"post_attention_layernorm": "self_attn.o_proj", "post_feedforward_layernorm": "mlp.down_proj"},
    layer_type_priority=("full_attention",),
)

ADAPTERS: tuple[Adapter, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r}; supported families: {', '.join(supported_model_types())}"
    )
