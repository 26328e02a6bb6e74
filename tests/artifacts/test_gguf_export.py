"""GGUF export: round trip through transformers' GGUF reader, and (slow) through a real llama.cpp runtime."""


import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from come.artifacts.gguf_export import (
    QWEN2_SPLIT,
    GGUFExportError,
    check_exportable,
    permute_for_gguf,
    pre_tokenizer_name,
)
from come.cli import app
from come.testing import tiny_config, tiny_model
from tests.helpers import assert_error_line

runner = CliRunner()
# Max |logit difference| against the HF folder, per type (tiny random model, logits of size ~1).
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "q8_0": 5e-2, "q4_0": 0.5}


def test_permutation_is_the_inverse_of_transformers_reverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 8)
    back = LlamaTensorProcessor(config={})._reverse_permute_weights(permute_for_gguf(w, 4).numpy(), 4, 4)
    assert torch.equal(torch.from_numpy(back), w)


@pytest.mark.parametrize("qtype", sorted(TOLERANCE))
def test_export_round_trips_through_transformers(small_llama_dir, tmp_path, qtype):
    tiny_dir, out = small_llama_dir, tmp_path / f"m-{qtype}.gguf"
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
    assert_error_line(again, "exists; pass --overwrite to replace it")


def _saved(path, tokenizer, family, q_scale=1.0, **overrides):
    model = tiny_model(family, vocab_size=len(tokenizer), **overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(q_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory, small_tokenizer):
    return _saved(tmp_path_factory.mktemp("llama") / "model", small_tokenizer, "llama", num_hidden_layers=6)


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("qwen")
    # Odd layer counts, as a compressed model has. Qwen3 gets an explicit head_dim (4 x 128 != 64), as the
    # real ones do; 128 because transformers' GGUF reader ignores qwen3.attention.key_length and falls
    # back to Qwen3Config's default 128. tiny_model randomises the Qwen2 q/k/v biases; Qwen2's larger
    # queries make its attention far from uniform, so a wrong q/k row order shows in the logits
    # (Qwen3's q/k norms already do that).
    return {"qwen2": _saved(root / "qwen2", small_tokenizer, "qwen2", q_scale=16.0, num_hidden_layers=3),
            "qwen3": _saved(root / "qwen3", small_tokenizer, "qwen3", num_hidden_layers=5, head_dim=128)}


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_export_round_trips_through_transformers(qwen_dirs, tmp_path, family, qtype):
    from gguf import GGUFReader

    folder, out = qwen_dirs[family], tmp_path / f"{family}-{qtype}.gguf"
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(out), "--type", qtype, "-q"])
    assert result.exit_code == 0, result.output
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = reference.config
    reader = GGUFReader(out)
    field = lambda key: reader.fields[f"{family}.{key}"].contents()
    assert reader.fields["general.architecture"].contents() == family
    assert field("block_count") == config.num_hidden_layers
    assert field("attention.key_length") == field("attention.value_length") == field("rope.dimension_count") == config.head_dim
    assert field("attention.head_count") == 4 and field("attention.head_count_kv") == 2
    assert field("rope.freq_base") == config.rope_parameters["rope_theta"]
    # The SmolLM2 tokenizer adds no BOS in transformers; llama.cpp is told so rather than left to its default.
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert reader.fields["tokenizer.ggml.pre"].contents() == "default"
    tensors = {t.name for t in reader.tensors}
    extra = {"qwen2": {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"},
             "qwen3": {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}}
    assert extra[family] <= tensors and not (extra["qwen2" if family == "qwen3" else "qwen3"] & tensors)

    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    assert loaded.config.model_type == family and loaded.config.num_hidden_layers == config.num_hidden_layers
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < TOLERANCE[qtype], diff


# Gemma 3's every-6th-layer-full pattern, which llama.cpp's gemma3 assumes when a file gives none.
def period6(n):
    return ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(n)]


def _gemma3(path, tokenizer, **overrides):
    # head_dim 256 = query_pre_attn_scalar, as the real models have: transformers' GGUF reader does not read the
    # scalar back and takes its default 256 (llama.cpp derives the scale from head_dim). A window of 8 is short
    # enough for the sliding layers to differ from full ones at the test lengths.
    overrides = {"num_hidden_layers": 7, "head_dim": 256, "query_pre_attn_scalar": 256, **overrides}
    overrides.setdefault("layer_types", period6(overrides["num_hidden_layers"]))
    return _saved(path, tokenizer, "gemma3", **overrides)


@pytest.fixture(scope="module")
def gemma3_dirs(tmp_path_factory, small_tokenizer):
    """A tiny Gemma 3 with the original pattern, and one merged by come (6 -> 4 layers) whose pattern is its own."""
    import come
    from come.engine.models import LoadedModel

    root = tmp_path_factory.mktemp("gemma3")
    plain = _gemma3(root / "plain", small_tokenizer)
    source = tiny_model("gemma3", vocab_size=len(small_tokenizer), num_hidden_layers=6, head_dim=256,
                        query_pre_attn_scalar=256, layer_types=period6(6))
    tokens = torch.randint(0, len(small_tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    come.compress(LoadedModel(source, None, {"name": "tiny-gemma3"}), target_layers=4, method="come", tokens=tokens,
                  out=root / "merged", progress=False, batch_size=4)
    small_tokenizer.save_pretrained(root / "merged")
    return {"plain": plain, "merged": root / "merged"}


def _gemma3_fields(out):
    from gguf import GGUFReader

    reader = GGUFReader(out)
    fields = {key: reader.fields[key].contents() for key in reader.fields if key.startswith("gemma3.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gemma3_export_round_trips_through_transformers(gemma3_dirs, tmp_path, qtype):
    folder, out = gemma3_dirs["plain"], tmp_path / f"gemma3-{qtype}.gguf"
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(out), "--type", qtype, "-q"])
    assert result.exit_code == 0, result.output
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = reference.config
    fields, tensors = _gemma3_fields(out)
    assert fields["gemma3.block_count"] == 7 and fields["gemma3.attention.key_length"] == 256
    assert fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False, True]
    assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
    assert "gemma3.final_logit_softcapping" not in fields
    # Zero-centred norms are stored as the gain llama.cpp multiplies by; the embeddings are tied (no output.weight).
    assert "output.weight" not in tensors
    for hf, name in (("self_attn.q_norm", "attn_q_norm"), ("post_attention_layernorm", "post_attention_norm"),
                     ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm")):
        stored = torch.from_numpy(tensors[f"blk.1.{name}.weight"].data.copy())
        expected = reference.get_submodule(f"model.layers.1.{hf}").weight.detach() + 1
        torch.testing.assert_close(stored, expected)

    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    assert loaded.config.layer_types == config.layer_types and loaded.config.sliding_window == 8
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < TOLERANCE[qtype], diff


def test_merged_gemma3_is_written_with_its_own_layer_pattern(gemma3_dirs, tmp_path):
    """llama.cpp's gemma3 reads the per-layer pattern when the file has one; without it, every 6th layer is full."""
    folder, out = gemma3_dirs["merged"], tmp_path / "merged.gguf"
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    types = reference.config.layer_types
    assert types != period6(len(types))  # the merge moved the full layer: a period-6 reader would be wrong
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "not every 6th layer full" in result.output
    fields, _ = _gemma3_fields(out)
    assert fields["gemma3.attention.sliding_window_pattern"] == [kind == "sliding_attention" for kind in types]

    # transformers' GGUF reader does not read the pattern back either: with the model's own layer types the
    # weights give the folder's logits; with the default pattern (what a reader ignoring the key runs) they do not.
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        diffs = {}
        for name, layer_types in (("own", types), ("period-6", period6(len(types)))):
            loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32,
                                                          layer_types=layer_types).eval()
            diffs[name] = (loaded(ids).logits - expected).abs().max().item()
    assert diffs["own"] < TOLERANCE["f16"] < 10 * TOLERANCE["f16"] < diffs["period-6"], diffs


def test_only_byte_level_tokenizers_are_built_from_files(tmp_path, smollm2_tokenizer):
    import json

    folder = _saved(tmp_path / "m", smollm2_tokenizer, "llama")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    spec["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(tmp_path / "m.gguf")])
    _assert_refused(result, tmp_path, "not byte-level")


def test_a_dense_model_loaded_from_a_gguf_exports_with_that_files_tokenizer(tmp_path, small_tokenizer, monkeypatch):
    """A model converted from a .gguf is cached with a marker naming the file; exporting the cached folder
    copies that file's tokenizer fields, even when transformers rebuilt the tokenizer in a form the
    exporter does not convert (Gemma 3's)."""
    import json
    import shutil

    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from come.engine import models
    from come.engine.models import GGUF_SOURCE_FILE, cached_gguf, gguf_source_of

    monkeypatch.setenv("COME_CACHE", str(tmp_path / "cache"))
    source, saved = tmp_path / "src.gguf", _saved(tmp_path / "m", small_tokenizer, "llama")
    assert runner.invoke(app, ["export-gguf", str(saved), "--out", str(source), "-q"]).exit_code == 0
    # transformers' own GGUF reading (its tokenizer conversion takes most of a minute) is not under test here.
    monkeypatch.setattr(models, "_from_gguf", lambda path, dtype: (
        AutoModelForCausalLM.from_pretrained(saved, dtype=dtype), AutoTokenizer.from_pretrained(saved)))
    cached = cached_gguf(source)
    assert gguf_source_of(cached) == source.resolve()
    (cached / GGUF_SOURCE_FILE).unlink()  # a conversion cached before the marker existed gets it on next use
    assert cached_gguf(source) == cached and gguf_source_of(cached) == source.resolve()
    # The cached folder with a tokenizer.json the exporter cannot build fields from (not byte-level).
    folder = tmp_path / "dense"
    shutil.copytree(cached, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = spec["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                               "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "out" / "dense.gguf"
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output

    def tokenizer_fields(path):
        reader = GGUFReader(path)
        return {k: reader.fields[k].contents() for k in reader.fields if k.startswith("tokenizer.")}

    assert tokenizer_fields(out) == tokenizer_fields(source)
    # Without the marker the same folder is refused, as before.
    (folder / GGUF_SOURCE_FILE).unlink()
    refused = tmp_path / "refused"
    refused.mkdir()
    _assert_refused(runner.invoke(app, ["export-gguf", str(folder), "--out", str(refused / "x.gguf")]), refused,
                    "not byte-level")


def _assert_refused(result, tmp_path, pattern):
    assert_error_line(result, pattern)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*gguf*"))


def test_export_refuses_what_it_cannot_write(tmp_path, smollm2_tokenizer):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "phi3"}')
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(tmp_path / "p.gguf")])
    _assert_refused(result, tmp_path, "GGUF export supports llama, mistral, qwen2, qwen3, gemma3_text; phi3 is not supported yet")
    folder = _saved(tmp_path / "g", smollm2_tokenizer, "gemma3", attn_logit_softcapping=50.0)
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(tmp_path / "g.gguf")])
    _assert_refused(result, tmp_path, "attn_logit_softcapping")
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(tmp_path / "x.gguf"), "--type", "q3"])
    _assert_refused(result, tmp_path, "unknown GGUF type")
    # llama.cpp's qwen2 has no sliding window: such a file would attend too far.
    folder = _saved(tmp_path / "s", smollm2_tokenizer, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(tmp_path / "s.gguf")])
    _assert_refused(result, tmp_path, "sliding-window attention")


@pytest.mark.parametrize(("family", "overrides", "pattern"), [
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                   "original_max_position_embeddings": 64}}, "rope scaling 'yarn'"),
    ("qwen3", {"attention_bias": True}, "attention biases"),
    # llama.cpp's gemma3 scales queries by 1/sqrt(head_dim), whatever query_pre_attn_scalar says ...
    ("gemma3", {"query_pre_attn_scalar": 32}, r"query_pre_attn_scalar 32 .* 1/sqrt\(head_dim = 16\)"),
    # ... except at 62 layers (its 27B rule), where it uses hidden_size / heads (here 16, not head_dim 32).
    ("gemma3", {"num_hidden_layers": 62, "head_dim": 32, "query_pre_attn_scalar": 32}, "its rule for 62-layer models"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"hidden_activation": "gelu"}, "tanh GELU"),
    ("gemma3", {"use_bidirectional_attention": True}, "bidirectional"),
    ("gemma3", {"attention_bias": True}, "attention biases"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope scaling 'linear'"),
    # A layer kind llama.cpp's gemma3 has no way to say (it knows sliding and full layers only).
    ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention"] + ["full_attention"] * 4}, "chunked_attention"),
])
def test_configs_llama_cpp_would_run_differently_are_refused(family, overrides, pattern):
    check_exportable(tiny_config(family))
    if "num_hidden_layers" in overrides:  # the same head sizes pass at any other layer count
        check_exportable(tiny_config(family, **dict(overrides, num_hidden_layers=61)))
    with pytest.raises(GGUFExportError, match=pattern):
        check_exportable(tiny_config(family, **overrides))


def _llama_cpp(path, n_ctx=128):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, logits_all=True, verbose=False, seed=0)


def _llama_cpp_greedy(llm, tokens, n):
    """n greedy tokens after `tokens` (ids, no BOS added), without stopping at an end of sequence."""
    llm.reset()
    got = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        got.append(int(token))
        if len(got) == n:
            return got


@torch.no_grad()
def _transformers_greedy(model, ids, n):
    ids = torch.tensor([ids])
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -n:].tolist()


# llama.cpp computes f16 matrices with f16 activations: a looser bound on logits of size ~1 than transformers' reader.
LLAMA_CPP_TOLERANCE = 3e-2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "gemma3-merged"])
def test_llama_cpp_runs_tiny_models_as_transformers_does(family, qwen_dirs, gemma3_dirs, smollm2_tokenizer, tmp_path,
                                                        monkeypatch):
    """f16 files of tiny random models in a real llama.cpp runtime: the same logits and greedy tokens."""
    if family == "llama":
        folder = _saved(tmp_path / "llama", smollm2_tokenizer, "llama", q_scale=16.0, num_hidden_layers=3)
    else:
        folder = {**qwen_dirs, "gemma3": gemma3_dirs["plain"], "gemma3-merged": gemma3_dirs["merged"]}[family]
    out = tmp_path / "m.gguf"
    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(out), "--type", "f16", "-q"])
    assert result.exit_code == 0, result.output
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # 20 tokens: more than Gemma's sliding window of 8, so sliding and full layers attend differently.
    prompt = torch.randint(0, reference.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = _llama_cpp(out)
    llm.eval(prompt)
    import numpy as np

    got = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    assert (got - expected).abs().max().item() < LLAMA_CPP_TOLERANCE
    assert _llama_cpp_greedy(llm, prompt, 8) == _transformers_greedy(reference, prompt, 8)
    llm.close()
    if family == "gemma3-merged":  # the pattern key is what makes it right: without it llama.cpp runs period 6
        import gguf

        monkeypatch.setattr(gguf.GGUFWriter, "add_sliding_window_pattern", lambda writer, value: None)
        result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(tmp_path / "p6.gguf"), "-q"])
        assert result.exit_code == 0, result.output
        llm = _llama_cpp(tmp_path / "p6.gguf")
        llm.eval(prompt)
        wrong = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
        assert (wrong - expected).abs().max().item() > 3 * LLAMA_CPP_TOLERANCE
        llm.close()


# Max |logit difference| of a real model's f16 file in llama.cpp (logits of size ~30; f16 activations).
REAL_TOLERANCE = 0.1


def _llama_cpp_logits(llm, ids):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def _real_model_check(folder, out, prompt):
    """The f16 file of a compressed real model in llama.cpp: the same prompt tokens, logits and greedy tokens.

    Returns the model and prompt ids, and the transformers logits."""
    from come.engine.models import load_model

    result = runner.invoke(app, ["export-gguf", str(folder), "--out", str(out), "--type", "f16", "-q"])
    assert result.exit_code == 0, result.output
    loaded = load_model(str(folder))
    ids = loaded.tokenizer(prompt).input_ids  # with the BOS the tokenizer adds, if any
    llm = _llama_cpp(out)
    assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
    with torch.no_grad():
        expected = loaded.model(torch.tensor([ids])).logits[0]
    assert (_llama_cpp_logits(llm, ids) - expected).abs().max().item() < REAL_TOLERANCE
    assert _llama_cpp_greedy(llm, ids, 8) == _transformers_greedy(loaded.model, ids, 8)
    llm.close()
    return ids, expected


@pytest.mark.slow
def test_llama_cpp_generates_the_same_greedy_tokens(tmp_path):
    """The compressed default model (SmolLM2) at f16 in a real llama.cpp runtime (llama-cpp-python)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)")
    import come

    come.compress(None, target_layers=24, method="shortgpt", nsamples=2, seqlen=64, out=tmp_path / "c", progress=False,
                  save_dtype="float32")
    _real_model_check(tmp_path / "c", tmp_path / "c.gguf", "The capital of France is")


@pytest.mark.slow
def test_llama_cpp_runs_compressed_gemma3_as_transformers_does(tmp_path, monkeypatch):
    """Gemma-3-270M compressed by the default method at 0.1: its merged layer pattern, rope bases and norms in llama.cpp."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)")
    import json

    import come

    come.compress("gemma3-270m", ratio=0.1, nsamples=2, seqlen=64, out=tmp_path / "c", progress=False)
    ids, expected = _real_model_check(tmp_path / "c", tmp_path / "c.gguf", "The capital of France is")
    types = json.loads((tmp_path / "c" / "config.json").read_text())["layer_types"]
    if types != period6(len(types)):  # merged layers moved a full one: without the pattern key llama.cpp is wrong
        import gguf

        monkeypatch.setattr(gguf.GGUFWriter, "add_sliding_window_pattern", lambda writer, value: None)
        result = runner.invoke(app, ["export-gguf", str(tmp_path / "c"), "--out", str(tmp_path / "p6.gguf"), "-q"])
        assert result.exit_code == 0, result.output
        llm = _llama_cpp(tmp_path / "p6.gguf")
        assert (_llama_cpp_logits(llm, ids) - expected).abs().max().item() > 3 * REAL_TOLERANCE
        llm.close()


def test_qwen_pre_tokenizer_is_named_for_llama_cpp():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    qwen = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}, byte_level]}}
    assert pre_tokenizer_name(qwen) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": dict(byte_level, use_regex=True)}) == "default"


def test_export_gguf_onto_a_folder_is_refused_before_writing(tiny_dir, tmp_path):
    folder = tmp_path / "x.gguf"
    folder.mkdir()
    result = runner.invoke(app, ["export-gguf", str(tiny_dir), "--out", str(folder), "--overwrite"])
    assert_error_line(result, "is a folder")
    assert list(folder.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["x.gguf"]
