"""Real SmolLM2-135M runs (slow: deselected by the README's test command, run with -m slow)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow


def test_default_model_compresses_reloads_and_generates(tmp_path):
    import come

    result = come.compress(None, target_layers=27, nsamples=2, seqlen=64, out=tmp_path / "out", progress=False)
    assert result.plan["final_layers"] == 27
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    # The files hold the source's dtype (the plan says which): the reloaded model is the compressed one
    # with its weights rounded to it.
    saved_dtype = next(model.parameters()).dtype
    assert str(saved_dtype).removeprefix("torch.") == result.plan["save_dtype"]["dtype"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        for p in result.model.parameters():
            p.copy_(p.to(saved_dtype).float())
        torch.testing.assert_close(reloaded(**ids).logits, result.model(**ids).logits, rtol=1e-4, atol=1e-4)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).strip()
