"""KL to a reference and top-1 agreement: exact properties on tiny models."""

import pytest
import torch
import torch.nn.functional as F

from come.errors import ComeError
from come.evaluation.fidelity import check_same_vocabulary, fidelity, windows_of
from come.testing import tiny_model, tiny_tokens


def test_a_model_against_itself_has_zero_kl_and_full_agreement():
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    r = fidelity(model, model, tiny_tokens(nsamples=3, seqlen=16))
    assert r["kl"] == pytest.approx(0.0, abs=1e-6) and r["top1"] == 1.0 and r["tokens"] == 48


def test_kl_and_agreement_match_a_direct_computation():
    torch.manual_seed(0)
    ref, model = tiny_model("llama"), tiny_model("llama", seed=1)
    x = tiny_tokens(nsamples=5, seqlen=12, seed=3)
    r = fidelity(ref, model, x, batch_size=2)
    with torch.no_grad():
        lp, rp = F.log_softmax(model(x).logits.double(), -1), F.log_softmax(ref(x).logits.double(), -1)
    kl = (rp.exp() * (rp - lp)).sum(-1).mean().item()
    top1 = (lp.argmax(-1) == rp.argmax(-1)).double().mean().item()
    nll = F.nll_loss(lp[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item()
    assert r["kl"] == pytest.approx(kl, rel=1e-5) and r["top1"] == pytest.approx(top1) and r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["kl"] > 0


def test_windows_and_vocabulary_checks():
    assert windows_of(torch.arange(10), 4).shape == (2, 4)
    with pytest.raises(ComeError, match="no window"):
        windows_of(torch.arange(3), 4)
    with pytest.raises(ComeError, match="vocabulary of 128 tokens and the model 160"):
        check_same_vocabulary(tiny_model("llama"), tiny_model("llama", vocab_size=160))


def test_eval_with_a_reference_takes_perplexity_from_the_kl_pass(tiny_dir, monkeypatch):
    """Full windows only: the KL pass's NLL is the perplexity (no separate pass), and equals perplexity()'s."""
    import come.evaluation.perplexity
    from come.evaluation.evaluate import evaluate

    settings = {"ppl_sources": ["wikipedia"], "tasks": [], "max_tokens": 256, "seqlen": 64, "progress": False}
    plain = evaluate(str(tiny_dir), reference=None, **settings)["perplexity"]["wikipedia"]
    calls = []
    real = come.evaluation.perplexity.perplexity
    monkeypatch.setattr(come.evaluation.perplexity, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = evaluate(str(tiny_dir), reference=str(tiny_dir), **settings)
    assert calls == [] and both["fidelity"]["wikipedia"]["kl"] < 1e-6
    ppl = both["perplexity"]["wikipedia"]
    assert ppl["ppl"] == pytest.approx(plain["ppl"], rel=1e-5) and ppl["nll"] == pytest.approx(plain["nll"], rel=1e-5)
    assert {k: ppl[k] for k in ("tokens", "seqlen", "windows")} == {k: plain[k] for k in ("tokens", "seqlen", "windows")}
    # A partial last window is not in the KL windows: perplexity() then runs, as without a reference.
    evaluate(str(tiny_dir), reference=str(tiny_dir), **{**settings, "max_tokens": 300})
    assert calls == [1]


def test_fidelity_many_equals_fidelity_of_each_model():
    """Several models against one reference pass: each gets exactly what it gets alone."""
    from come.evaluation.fidelity import fidelity_many

    ref, a, b = (tiny_model("llama", seed=seed) for seed in range(3))
    x = tiny_tokens(nsamples=3, seqlen=16)
    many = fidelity_many(ref, {"a": a, "b": b}, x, batch_size=2)
    for name, model in (("a", a), ("b", b)):
        alone = fidelity(ref, model, x, batch_size=2)
        assert many[name] == pytest.approx(alone, rel=1e-6)
    assert many["a"]["kl"] != pytest.approx(many["b"]["kl"])
