"""Fidelity to a reference model: how closely a (compressed) model reproduces its original's next-token distribution.

Accuracy on small models sits near chance on several tasks and cannot rank them; the mean per-token
KL divergence KL(reference || model) on held-out text has no chance floor and moves with every change
of the model, and top-1 agreement says how often both would greedily pick the same token. One
implementation serves `come distill` (choosing the checkpoint it keeps) and `come eval --reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ComeError

# Positions per float32 log-softmax chunk: bounds the upcast copies of two vocab-wide logit tensors.
_CHUNK_POSITIONS = 512


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def windows_of(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """A 1-D token stream cut into full windows of `seqlen` ([n, seqlen]); a 2-D tensor is returned as is."""
    if tokens.dim() == 2:
        return tokens
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D or 2-D, got shape {tuple(tokens.shape)}")
    n = tokens.numel() // seqlen
    if n < 1:
        raise ComeError(f"{tokens.numel()} tokens give no window of {seqlen} to compare the models on")
    return tokens[: n * seqlen].view(n, seqlen)


def check_same_vocabulary(reference, model, reference_tokenizer=None, tokenizer=None) -> None:
    """Refuse a reference whose next-token distributions are not over the same tokens."""
    rv, mv = reference.config.vocab_size, model.config.vocab_size
    if rv != mv:
        raise ComeError(f"the reference has a vocabulary of {rv} tokens and the model {mv}: KL needs the same vocabulary")
    if reference_tokenizer is not None and tokenizer is not None:
        probe = "The quick brown fox jumps over the lazy dog. 1234 éà"
        if reference_tokenizer(probe)["input_ids"] != tokenizer(probe)["input_ids"] or len(reference_tokenizer) != len(tokenizer):
            raise ComeError("the reference model has another tokenizer than the model: KL needs the same tokenizer")


def fidelity(reference, model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "fidelity") -> dict:
    """Mean per-token KL(reference || model) in nats, top-1 agreement and the model's NLL on `windows` ([n, seqlen] ids).

    Every position of every window counts (each has a next-token distribution); the NLL counts the
    positions that have a next token, as perplexity does.
    """
    return fidelity_many(reference, {"model": model}, windows, batch_size, progress, desc)["model"]


@torch.no_grad()
def fidelity_many(reference, models: dict, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
                  desc: str = "fidelity") -> dict:
    """`fidelity` of each of `models` ({name: model}) to one reference, whose logits are computed once per batch
    and shared: for several compressed versions of one model, the reference's pass is paid once."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, seqlen >= 2] token ids, got shape {tuple(windows.shape)}")
    states = {name: m.training for name, m in models.items()}
    ref_state = reference.training
    reference.eval()
    for m in models.values():
        m.eval()
    sums = {name: {"kl": 0.0, "agree": 0, "positions": 0, "nll": 0.0, "predicted": 0} for name in models}
    try:
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            ref_logp = _log_probs(reference(batch.to(_device(reference)), use_cache=False).logits)
            for name, model in models.items():
                _accumulate(sums[name], ref_logp, model(batch.to(_device(model)), use_cache=False).logits, batch)
    finally:
        reference.train(ref_state)
        for name, m in models.items():
            m.train(states[name])
    return {name: {
        "kl": s["kl"] / s["positions"],
        "top1": s["agree"] / s["positions"],
        "nll": s["nll"] / max(1, s["predicted"]),
        "tokens": s["positions"],
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
    } for name, s in sums.items()}


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the vocabulary, formed in chunks of positions (one vocab-wide upcast at a time)."""
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    rows = max(1, _CHUNK_POSITIONS // logits.shape[0])
    for s in range(0, logits.shape[1], rows):
        out[:, s : s + rows] = F.log_softmax(logits[:, s : s + rows].float(), dim=-1)
    return out


def _accumulate(sums: dict, ref_logp: torch.Tensor, logits: torch.Tensor, batch: torch.Tensor) -> None:
    """Add one batch's KL(reference || model), top-1 agreement and NLL; `ref_logp`: the reference's `_log_probs`,
    computed once per batch for every model compared with it."""
    ref_logp = ref_logp.to(logits.device)
    targets = batch[:, 1:].to(logits.device)
    rows = max(1, _CHUNK_POSITIONS // batch.shape[0])
    for s in range(0, batch.shape[1], rows):
        lp = F.log_softmax(logits[:, s : s + rows].float(), dim=-1)
        rp = ref_logp[:, s : s + rows]
        sums["kl"] += float((rp.exp() * (rp - lp)).sum(-1).double().sum())
        sums["agree"] += int((lp.argmax(-1) == rp.argmax(-1)).sum())
        sums["positions"] += lp.shape[0] * lp.shape[1]
        t = targets[:, s : s + rows]
        if t.numel():
            sums["nll"] += float(-lp[:, : t.shape[1]].gather(-1, t.unsqueeze(-1)).double().sum())
            sums["predicted"] += t.numel()
