"""Layer-wise mode: same results as in memory, sharded streamed export, disk cache, bounded layers in memory."""

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from come.core.activations import DiskBoundary, choose_storage
from come.engine.layerwise import LazyLayers, parse_size, write_safetensors
from come.engine.models import LoadedModel
from come.engine.pipeline import compress
from come.errors import ComeError, ModelLoadError
from come.testing import FAMILIES, tiny_model, tiny_tokens
from tests.helpers import assert_error_line, compress_cli, copy_folder

TOKENS = tiny_tokens(nsamples=6, seqlen=24)


def _folder(tmp_path, family="llama", name="src", **overrides):
    path = tmp_path / name
    tiny_model(family, seed=1, **overrides).save_pretrained(path, max_shard_size="200KB")  # several shards
    return path


def _in_memory(folder, **options):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    return compress(LoadedModel(model, None, {"name": str(folder)}), tokens=TOKENS, progress=False, batch_size=4, **options)


def _layerwise(folder, **options):
    return compress(str(folder), layerwise=True, tokens=TOKENS, progress=False, batch_size=4, **options)


def _assert_same_result(reference, folder_out, plan):
    assert plan["layers"] == reference.plan["layers"] and plan["steps"] == reference.plan["steps"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder_out).eval()
    a, b = reloaded.state_dict(), reference.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    ids = tiny_tokens(nsamples=2, seqlen=12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference.model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,tied", [(f, f == "qwen3") for f in FAMILIES])  # one family with tied embeddings
def test_layerwise_matches_in_memory_and_exports_shards(family, tied, tmp_path):
    src = _folder(tmp_path, family, tie_word_embeddings=tied)
    assert (src / "model.safetensors.index.json").is_file()
    reference = _in_memory(src, target_layers=4)
    out = tmp_path / "out"
    result = _layerwise(src, target_layers=4, out=out, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    _assert_same_result(reference, out, result.plan)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert all(p.is_meta for p in result.model.parameters())  # the model itself was never loaded
    assert result.plan["execution"]["layerwise"] and result.plan["final_parameters"] == reference.plan["final_parameters"]


def test_bfloat16_weights_cast_on_load(tmp_path):
    src = _folder(tmp_path, "qwen3")  # stored in float32
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    reference = compress(LoadedModel(model, None, {}), target_layers=4, tokens=TOKENS, progress=False, batch_size=4)
    result = _layerwise(src, target_layers=4, dtype="bfloat16", out=tmp_path / "out", save_dtype="bfloat16")
    assert result.plan["steps"] == reference.plan["steps"] and result.plan["execution"]["dtype"] == "bfloat16"
    a, b = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), reference.model.state_dict()
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in b)
    # By default the weights are saved in the source's dtype (float32 here): the same values, upcast.
    _layerwise(src, target_layers=4, dtype="bfloat16", out=tmp_path / "default")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "default").state_dict()
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k].float()) for k in b)


def test_shortgpt_layerwise_single_file_output(tmp_path):
    src = _folder(tmp_path, "qwen2")
    reference = _in_memory(src, target_layers=4, method="shortgpt")
    result = _layerwise(src, target_layers=4, method="shortgpt", out=tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()  # fits the default shard size: one file, no index
    _assert_same_result(reference, tmp_path / "out", result.plan)


@pytest.mark.parametrize("method,options", [
    ("come-search", {"search_samples": 4}),
    ("come-search", {"search_samples": 4, "autocast": "on", "search_autocast": "on"}),  # bfloat16 passes as well
    ("replaceme", {}),
    ("replaceme", {"replaceme_objective": "cosine", "replaceme_epochs": 2}),
    ("shortgpt", {"refit": True}),
    ("come", {"refit": True}),
    ("drop", {"drop_layers": (1, 4), "refit": True}),
])
def test_new_methods_and_refit_layerwise_match_in_memory(method, options, tmp_path):
    src = _folder(tmp_path, "qwen2")
    reference = _in_memory(src, target_layers=4, method=method, **options)
    result = _layerwise(src, target_layers=4, method=method, out=tmp_path / "out", **options)
    _assert_same_result(reference, tmp_path / "out", result.plan)
    if options.get("refit") or method == "come-search":
        assert any("refit" in layer for layer in result.plan["layers"])


def test_disk_cache_equals_ram_and_is_cleaned_up(tmp_path):
    src = _folder(tmp_path, "llama")
    ram = _layerwise(src, target_layers=4, out=tmp_path / "ram", activation_storage="ram")
    cache = tmp_path / "cache"
    disk = _layerwise(src, target_layers=4, out=tmp_path / "disk", activation_storage="disk", cache_dir=str(cache))
    assert ram.plan["execution"]["activations"] == "ram" and disk.plan["execution"]["activations"] == "disk"
    assert disk.plan["layers"] == ram.plan["layers"] and disk.plan["steps"] == ram.plan["steps"]
    for name in ("model.safetensors",):
        with safe_open(tmp_path / "ram" / name, "pt") as a, safe_open(tmp_path / "disk" / name, "pt") as b:
            assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
    assert list(cache.iterdir()) == []  # boundaries and merged layers are removed with the work folder
    # The in-memory mode can keep its activations on disk too, with the same result.
    in_memory_disk = _in_memory(src, target_layers=4, activation_storage="disk", cache_dir=str(cache))
    assert in_memory_disk.plan["steps"] == ram.plan["steps"]


def test_bfloat16_activations_run_and_stay_close(tmp_path):
    src = _folder(tmp_path, "llama")
    full = _layerwise(src, target_layers=4)
    half = _layerwise(src, target_layers=4, activation_dtype="bfloat16", activation_storage="disk")
    assert half.plan["final_layers"] == 4
    first_full, first_half = full.plan["steps"][0], half.plan["steps"][0]
    torch.testing.assert_close(torch.tensor(first_half["sbi"]), torch.tensor(first_full["sbi"]), rtol=0.05, atol=0.01)
    torch.testing.assert_close(torch.tensor(first_half["bi"]), torch.tensor(first_full["bi"]), rtol=0.05, atol=0.01)


def test_at_most_two_layers_materialised(tmp_path, monkeypatch):
    src = tmp_path / "big"
    tiny_model("llama", seed=2, num_hidden_layers=12, hidden_size=256, intermediate_size=512,
               num_attention_heads=8, num_key_value_heads=4, head_dim=32).save_pretrained(src)
    layer_type = type(tiny_model("llama").model.layers[0])
    live, peak, loads = weakref.WeakSet(), [0], [0]
    materialise = LazyLayers._materialise

    def counting(shell, state):
        module = materialise(shell, state)
        if isinstance(module, layer_type):
            gc.collect()  # count only layers something still holds
            live.add(module)
            loads[0] += 1
            peak[0] = max(peak[0], len(live))
        return module

    monkeypatch.setattr(LazyLayers, "_materialise", staticmethod(counting))
    result = _layerwise(src, target_layers=8, method="come")
    assert result.plan["final_layers"] == 8
    assert peak[0] <= 2, peak[0]
    execution = result.plan["execution"]
    assert execution["peak_layers_loaded"] <= 2 and execution["layer_loads"] == loads[0]
    # Boundary caching: a layer is read about once per time it is run, not once per batch or score.
    assert loads[0] <= execution["layers_run"] + 2 * len(result.plan["steps"])


def test_layerwise_refusals(tmp_path):
    src = _folder(tmp_path, "llama")
    for method in ("sleb", "come-p", "laco", "taylor+"):
        with pytest.raises(ComeError, match="cannot run with --layerwise"):
            _layerwise(src, target_layers=4, method=method)
    with pytest.raises(ComeError, match="folder"):
        compress(LoadedModel(tiny_model("llama"), None, {}), layerwise=True, target_layers=4, tokens=TOKENS)
    (tmp_path / "bin").mkdir()
    tiny_model("llama").save_pretrained(tmp_path / "bin", safe_serialization=True)
    (tmp_path / "bin" / "model.safetensors").rename(tmp_path / "bin" / "weights.other")
    with pytest.raises(ModelLoadError, match="safetensors"):
        _layerwise(tmp_path / "bin", target_layers=4)
    for method in ("come", "shortgpt", "reverse", "magnitude+"):
        assert _layerwise(src, target_layers=4, method=method, merge_size=3).plan["final_layers"] == 4


def test_streamed_safetensors_and_sizes(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.randn(2, 2, 2)}
    items = [(k, v.dtype, tuple(v.shape), (lambda v=v: v)) for k, v in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", items, metadata={"format": "pt"})
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    assert (tmp_path / "x.safetensors").stat().st_size == (tmp_path / "ref.safetensors").stat().st_size
    assert parse_size("2GB") == 2 * 10**9 and parse_size("200KB") == 200_000 and parse_size("1GiB") == 2**30
    assert parse_size(123) == 123
    with pytest.raises(ComeError):
        parse_size("lots")


def test_disk_boundary_indexing(tmp_path):
    x = torch.randn(5, 3, 4)
    b = DiskBoundary(tmp_path / "b.bin", x.shape, torch.float32)
    b[0:2], b[2:5] = x[0:2], x[2:5]
    assert torch.equal(b[:], x) and torch.equal(b[1:3, -1:], x[1:3, -1:]) and torch.equal(b[-1], x[-1])
    del b
    gc.collect()
    assert list(tmp_path.iterdir()) == []
    assert choose_storage("auto", 1) == "ram" and choose_storage("auto", 1 << 60) == "disk"
    assert choose_storage("ram", 1 << 60) == "ram"


def test_cli_layerwise_matches_in_memory(tmp_path, smollm2_tokenizer):
    from come.cli import app

    src = tmp_path / "model"
    tiny_model("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(src, max_shard_size="1MB")
    smollm2_tokenizer.save_pretrained(src)
    runner = CliRunner()
    common = [str(src), "--target-layers", "4", "--nsamples", "4", "--seqlen", "32", "-q"]
    assert runner.invoke(app, ["compress", *common, "--out", str(tmp_path / "mem")]).exit_code == 0
    result = runner.invoke(
        app,
        ["compress", *common, "--out", str(tmp_path / "lw"), "--layerwise", "--max-shard-size", "1MB",
         "--activation-storage", "disk", "--cache-dir", str(tmp_path / "cache")],
    )
    assert result.exit_code == 0, result.output
    plans = [json.loads((tmp_path / d / "come_plan.json").read_text()) for d in ("mem", "lw")]
    assert plans[0]["layers"] == plans[1]["layers"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "lw").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert (tmp_path / "lw" / "tokenizer.json").is_file() or (tmp_path / "lw" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("tied", [False, True])
def test_lazy_loss_through_reads_norm_and_head(tmp_path, tied):
    """The what-if loss (final norm + LM head materialised on demand, a tied head from the embeddings)."""
    from come.core.adapters import adapter_for
    from come.core.scoring import BoundaryCache
    from come.engine.layerwise import load_layerwise

    src = _folder(tmp_path, "llama", tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    adapter = adapter_for(model.config)
    reference = BoundaryCache(model, adapter, TOKENS, progress=False)
    loaded, checkpoint = load_layerwise(str(src))
    lazy = LazyLayers(loaded.model, adapter, checkpoint)
    cache = BoundaryCache(loaded.model, adapter, TOKENS, progress=False, layers=lazy)
    tail = [(lazy[k], cache.layer_kwargs[k]) for k in (4, 5)]  # two layers held: fine for a check
    expected = reference.loss_through(4, reference.current_stack(4))
    assert cache.loss_through(4, tail) == pytest.approx(expected, rel=1e-6)
    assert all(p.is_meta for p in loaded.model.parameters())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "more layers", "fewer layers"])
def test_layerwise_refuses_damaged_or_mismatched_checkpoints(tiny_dir, tmp_path, damage):
    bad = copy_folder(tiny_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    if damage in ("truncated", "garbage"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64)
    else:
        config = json.loads((bad / "config.json").read_text())
        config["num_hidden_layers"] = 8 if damage == "more layers" else 4
        (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = compress_cli(bad, "--target-layers", "3", "--layerwise", "--out", out)
    assert_error_line(result, {"truncated": "cannot read the weights", "garbage": "cannot read the weights",
                               "more layers": "lacks model.layers.6", "fewer layers": "unexpected weights"}[damage])
    assert not out.exists()
