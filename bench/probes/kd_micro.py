"""Two micro-benchmarks behind the KD-step profile in cost_probes.md (probe).

    OMP_NUM_THREADS=1 python bench/probes/kd_micro.py

1. One causal attention of stage 2's shape (2 x 9 heads x 512 x 64, 3 KV heads expanded), forward and
   backward, by the flash kernel (SDPA's default on CPU), SDPA's math kernel and an eager composition.
2. What autocast's per-call weight casts cost per KD step: every linear map of the teacher (30 layers) and
   the student (19 layers) of SmolLM2-135M, plus the LM head of each, cast from float32 to bfloat16 once.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def per_call_ms(fn, repeats: int = 5) -> float:
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1000


def attention_ms(dtype: torch.dtype) -> dict[str, float]:
    q, k, v = (torch.randn(2, 9, 512, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 9, 512, 64, dtype=dtype)
    mask = torch.full((512, 512), float("-inf")).triu(1).to(dtype)

    def flash():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    def eager():
        p = torch.softmax(((q @ k.transpose(-1, -2)) * 0.125 + mask).float(), -1).to(dtype)
        (p @ v).backward(grad)

    return {name: per_call_ms(fn) for name, fn in (("flash", flash), ("math", math), ("eager", eager))}


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        times = ", ".join(f"{name} {ms:.1f}" for name, ms in attention_ms(dtype).items())
        print(f"{dtype}: attention fwd+bwd ms: {times}")
    layer = [torch.randn(1536, 576) for _ in range(3)] + [torch.randn(576, 576) for _ in range(2)] + \
        [torch.randn(192, 576) for _ in range(2)]
    head = torch.randn(49152, 576)

    def casts(layers: int) -> None:
        for _ in range(layers):
            for w in layer:
                w.to(torch.bfloat16)
        head.to(torch.bfloat16)

    casts(1)
    start = time.process_time()
    casts(30)
    casts(19)
    print(f"weight casts per KD step (teacher 30 layers + head, student 19 + head): {time.process_time() - start:.3f} CPU-s")


if __name__ == "__main__":
    main()
