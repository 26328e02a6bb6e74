"""Perplexity of a causal LM over a token stream, in independent non-overlapping windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Positions per float32 log-softmax chunk: bounds the upcast copy of the logits
# (e.g. 1024 x 152k vocab x 4 bytes ~ 0.6 GB) whatever the batch size and sequence length.
_CHUNK_POSITIONS = 1024


@torch.no_grad()
def perplexity(
    model, tokens: torch.LongTensor, seqlen: int = 512, batch_size: int = 4, progress: bool = True
) -> dict:
    """Mean next-token NLL and perplexity of ``model`` on the 1-D ``tokens``.

    The stream is cut into windows of ``seqlen``; a final partial window is evaluated too unless
    it has fewer than 2 tokens (nothing to predict).  Each window starts from an empty context,
    so the first token of every window is never predicted.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if seqlen < 2 or batch_size < 1:
        raise ValueError(f"need seqlen >= 2 and batch_size >= 1, got {seqlen} and {batch_size}")
    n_full, rest = divmod(tokens.numel(), seqlen)
    windows = tokens[: n_full * seqlen].view(n_full, seqlen)
    batches = list(windows.split(batch_size))
    if rest >= 2:
        batches.append(tokens[n_full * seqlen :].unsqueeze(0))  # its own batch: different length
    n_windows = n_full + (rest >= 2)
    if not n_windows:
        raise ValueError(f"{tokens.numel()} tokens give no window to evaluate (need at least 2)")

    device = model.get_input_embeddings().weight.device  # the first device under a device_map
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress) as bar:
            for batch in batches:
                batch = batch.to(device)
                logits = model(batch, use_cache=False).logits
                total_nll += _sum_nll(logits[:, :-1], batch[:, 1:].to(logits.device))
                total_tokens += batch[:, 1:].numel()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)

    nll = total_nll / total_tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": total_tokens, "seqlen": seqlen, "windows": n_windows}


def _sum_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL, computed in float32 a slice of positions at a time (logits may be half precision)."""
    total = 0.0
    rows_per_chunk = max(1, _CHUNK_POSITIONS // logits.shape[0])
    for start in range(0, logits.shape[1], rows_per_chunk):
        chunk = logits[:, start : start + rows_per_chunk].float()
        total += F.cross_entropy(
            chunk.flatten(0, 1), targets[:, start : start + rows_per_chunk].flatten(), reduction="sum"
        ).item()  # Python float (double) across chunks so long streams don't lose precision
    return total
