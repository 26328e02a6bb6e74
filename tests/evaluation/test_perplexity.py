from __future__ import annotations

import math

import pytest
import torch

from come.evaluation.perplexity import perplexity
from come.testing import tiny_model


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_model("llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8)


def stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(seed))


def test_single_window_matches_the_models_own_loss(tiny_llama):
    tokens = stream(64)
    result = perplexity(tiny_llama, tokens, seqlen=64, progress=False)
    with torch.no_grad():
        loss = tiny_llama(tokens[None], labels=tokens[None]).loss.item()
    assert result["windows"] == 1 and result["tokens"] == 63 and result["seqlen"] == 64
    assert result["nll"] == pytest.approx(loss, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_windows_are_independent_and_partial_window_counts(tiny_llama):
    tokens = stream(2 * 32 + 10)
    result = perplexity(tiny_llama, tokens, seqlen=32, progress=False)
    assert result["windows"] == 3 and result["tokens"] == 31 + 31 + 9

    # Token-weighted mean of each window's own loss, each without context from the previous one.
    total = 0.0
    with torch.no_grad():
        for window in (tokens[:32], tokens[32:64], tokens[64:]):
            total += tiny_llama(window[None], labels=window[None]).loss.item() * (len(window) - 1)
    assert result["nll"] == pytest.approx(total / result["tokens"], rel=1e-5)


def test_a_trailing_single_token_is_dropped(tiny_llama):
    result = perplexity(tiny_llama, stream(2 * 16 + 1), seqlen=16, progress=False)
    assert result["windows"] == 2 and result["tokens"] == 30


def test_batch_size_does_not_change_the_result(tiny_llama):
    tokens = stream(7 * 24 + 5, seed=1)
    results = [perplexity(tiny_llama, tokens, seqlen=24, batch_size=b, progress=False)["nll"] for b in (1, 3, 8)]
    assert max(results) - min(results) < 1e-5


def test_no_window_or_bad_shape_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="no window"):
        perplexity(tiny_llama, stream(1), seqlen=16, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(tiny_llama, stream(32).view(2, 16), seqlen=16, progress=False)
