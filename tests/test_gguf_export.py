"""GGUF export: round trip through transformers' GGUF reader, and (slow) through a real llama.cpp runtime."""


import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from come.cli import app
from come.gguf_export import permute_for_gguf
from tests.test_cli import tiny_dir  # noqa: F401  (fixture)

runner = CliRunner()
# Max |logit difference| against the HF folder, per type (tiny random model, logits of size ~1).
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "q8_0": 5e-2, "q4_0": 0.5}


def test_permutation_is_the_inverse_of_transformers_reverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 8)
    back = LlamaTensorProcessor(config={})._reverse_permute_weights(permute_for_gguf(w, 4).numpy(), 4, 4)
    assert torch.equal(torch.from_numpy(back), w)


@pytest.mark.parametrize("qtype", sorted(TOLERANCE))
def test_export_round_trips_through_transformers(tiny_dir, tmp_path, qtype):  # noqa: F811
    out = tmp_path / f"m-{qtype}.gguf"
    result = runner.invoke(app, ["export-gguf", str(tiny_dir), "--out", str(out), "--type", qtype])
    assert result.exit_code == 0, result.output
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == reference.config.num_hidden_layers
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < TOLERANCE[qtype], diff
    again = runner.invoke(app, ["export-gguf", str(tiny_dir), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_export_refuses_what_it_cannot_write(tmp_path):
    from come.testing import tiny_model

    tiny_model("qwen3").save_pretrained(tmp_path / "q")
    result = runner.invoke(app, ["export-gguf", str(tmp_path / "q"), "--out", str(tmp_path / "q.gguf")])
    assert result.exit_code == 2 and "supports" in result.output
    result = runner.invoke(app, ["export-gguf", str(tmp_path / "q"), "--out", str(tmp_path / "x.gguf"), "--type", "q3"])
    assert result.exit_code == 2 and "unknown GGUF type" in result.output
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*gguf*"))


@pytest.mark.slow
def test_llama_cpp_generates_the_same_greedy_tokens(tmp_path):
    """The compressed default model at f16 in a real llama.cpp runtime (llama-cpp-python)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)")
    import come
    from come.models import load_model

    come.compress(None, target_layers=24, method="shortgpt", nsamples=2, seqlen=64, out=tmp_path / "c", progress=False,
                  save_dtype="float32")
    runner.invoke(app, ["export-gguf", str(tmp_path / "c"), "--out", str(tmp_path / "c.gguf"), "--type", "f16"])
    loaded = load_model(str(tmp_path / "c"))
    prompt = "The capital of France is"
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = loaded.model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "c.gguf"), n_ctx=128, verbose=False, seed=0)
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    assert tokens == ids[0].tolist()
    got = []
    for token in llm.generate(tokens, temp=0.0, top_k=1):
        got.append(token)
        if len(got) == 8 or token == llm.token_eos():  # transformers stops at the end of sequence too
            break
    assert got == expected
