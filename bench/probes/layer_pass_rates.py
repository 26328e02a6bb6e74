# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""CPU milliseconds per sequence of one SmolLM2-shaped decoder layer (random weights, 128 tokens a sequence) over
32 sequences in batches of 1-16, in float32 (`fp32`) or under bfloat16 autocast (`bf16`):
    OMP_NUM_THREADS=1 python bench/probes/layer_pass_rates.py fp32
    OMP_NUM_THREADS=1 python bench/probes/layer_pass_rates.py bf16
"""
import sys
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                  vocab_size=49152)
cfg._attn_implementation = "sdpa"
layer = LlamaDecoderLayer(cfg, 0).eval()
rotary = LlamaRotaryEmbedding(cfg)
autocast = sys.argv[1] == "bf16"


def ms_per_sequence(batch: int, total: int = 32, repeats: int = 3) -> float:
    x = torch.randn(total, 128, 576)
    positions = torch.arange(128)[None]
    embeddings = rotary(x[:1], positions)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for b in range(0, total, batch):  # warm-up
            layer(x[b:b + batch], position_embeddings=embeddings, position_ids=positions)
        start = time.process_time()
        for _ in range(repeats):
            for b in range(0, total, batch):
                layer(x[b:b + batch], position_embeddings=embeddings, position_ids=positions)
    return (time.process_time() - start) / repeats / total * 1000


for _ in range(2):
    print(sys.argv[1], " ".join(f"b{n} {ms_per_sequence(n):.2f}ms/seq" for n in (1, 2, 4, 8, 16)))
