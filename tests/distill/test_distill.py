"""Distillation of a compressed tiny model from its teacher: stage 1, workers, resume, stage 2, errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from come.distill import DistillError, NonFiniteLoss, _kl, distill, span_errors
from come.distill.options import DistillInterrupted
from come.engine.models import LoadedModel
from come.engine.pipeline import compress
from come.errors import OutputExists
from come.evaluation.data import DataError
from come.testing import tiny_model, tiny_tokens
from tests.helpers import assert_error_line, char_tokenizer

TRAIN = tiny_tokens(nsamples=16, seqlen=32, seed=1)
HELD_OUT = tiny_tokens(nsamples=8, seqlen=32, seed=2)
# 16 sequences in chunks of 4, 6 epochs: 24 steps per layer.
SETTINGS = {"tokens": TRAIN, "heldout": HELD_OUT, "layers": "merged", "global_steps": 0, "lr": 2e-3, "epochs": 6, "batch_size": 4, "warmup": 0.1, "seed": 3, "progress": False}


def save_teacher(path, **overrides):
    tiny_model("llama", **overrides).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher_dir = save_teacher(root / "teacher")
    loaded = LoadedModel(tiny_model("llama"), char_tokenizer(), {"name": "tiny", "kind": "local", "path": str(teacher_dir)})
    compress(loaded, target_layers=3, method="come", allow_remerge=False, tokens=tiny_tokens(), out=root / "compressed",
             progress=False)  # disjoint pairs: every layer is merged
    return root, teacher_dir, root / "compressed"


@pytest.fixture(scope="module")
def single_run(setup):
    root, teacher_dir, compressed = setup
    summary = distill(compressed, root / "single", teacher=teacher_dir, **SETTINGS)
    return root / "single", summary


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]


def test_stage1_lowers_training_loss_and_held_out_span_error(setup, single_run):
    _root, teacher_dir, compressed = setup
    out, summary = single_run
    assert sorted(summary["stage1"]["layers"]) == [0, 1, 2]  # 6 -> 3 by merging pairs: every layer is merged
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for k in range(3):
        losses = [r["loss"] for r in lines if r["stage"] == 1 and r["layer"] == k]
        assert len(losses) == 24 and sum(losses[-4:]) < 0.7 * sum(losses[:4])
        assert summary["stage1"]["layers"][k]["final_loss"] < summary["stage1"]["layers"][k]["initial_loss"]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    plan = json.loads((compressed / "come_plan.json").read_text())
    before = span_errors(teacher, AutoModelForCausalLM.from_pretrained(compressed), plan["layers"], HELD_OUT)
    after = span_errors(teacher, AutoModelForCausalLM.from_pretrained(out), plan["layers"], HELD_OUT)
    assert all(after[k] < 0.8 * before[k] for k in before), (before, after)


def test_default_method_output_distills(setup, tmp_path):
    """come-search mixes merges and refitted deletions: every layer standing for a span is trained."""
    _root, teacher_dir, _ = setup
    loaded = LoadedModel(tiny_model("llama"), char_tokenizer(), {"name": "tiny", "kind": "local", "path": str(teacher_dir)})
    compress(loaded, target_layers=4, tokens=tiny_tokens(), out=tmp_path / "search", progress=False)
    plan = json.loads((tmp_path / "search" / "come_plan.json").read_text())
    assert plan["method"] == "come-search"
    spans = [k for k, layer in enumerate(plan["layers"]) if len(layer["covers"]) > 1]
    summary = distill(tmp_path / "search", tmp_path / "out", teacher=teacher_dir, **{**SETTINGS, "epochs": 1})
    assert sorted(summary["stage1"]["layers"]) == spans
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 4


def test_output_reloads_with_plan_and_distillation_record(setup, single_run):
    root, teacher_dir, compressed = setup
    out, _summary = single_run
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.isfinite(model(HELD_OUT[:2]).logits).all()
    plan = json.loads((out / "come_plan.json").read_text())
    original = json.loads((compressed / "come_plan.json").read_text())
    assert plan["layers"] == original["layers"]
    record = plan["distillation"]
    assert record["teacher"]["path"] == str(teacher_dir)
    assert record["data"]["tokens"] == TRAIN.numel() and record["stage1"]["tokens_per_layer"] == 6 * TRAIN.numel()
    assert record["options"]["lr"] == 2e-3 and record["stage2"] is None and record["seconds"] > 0
    assert {"initial_loss", "final_loss", "steps"} <= record["stage1"]["layers"]["0"].keys()
    assert not (root / "single.partial").exists()  # the work folder goes once the result is in place


def test_two_gloo_workers_give_identical_weights(setup, single_run):
    root, teacher_dir, compressed = setup
    distill(compressed, root / "two", teacher=teacher_dir, workers=2, **SETTINGS)
    assert_same_weights(single_run[0], root / "two")
    assert json.loads((root / "two" / "come_plan.json").read_text())["distillation"]["workers"] == 2


def test_resume_after_kill_gives_identical_weights(setup, single_run):
    root, teacher_dir, compressed = setup
    out = root / "resumed"
    # Killed in layer 1 at its step 8 (24 + 8 steps); its last checkpoint is step 5.
    with pytest.raises(DistillInterrupted, match="continue with --resume"):
        distill(compressed, out, teacher=teacher_dir, save_every=5, stop_after=32, **SETTINGS)
    work = root / "resumed.partial"
    assert (work / "stage1" / "layer_000.safetensors").is_file() and (work / "stage1" / "layer_001.ckpt.pt").is_file()
    with pytest.raises(OutputExists, match="holds an unfinished distillation: pass --resume"):  # a fresh start refuses to wipe it
        distill(compressed, out, teacher=teacher_dir, **SETTINGS)
    with pytest.raises(DistillError, match="it was started with lr = 0.002, now 0.001"):  # resuming with other settings is refused
        distill(compressed, out, teacher=teacher_dir, resume=True, **{**SETTINGS, "lr": 1e-3})
    summary = distill(compressed, out, teacher=teacher_dir, resume=True, **SETTINGS)
    assert summary["resumed"]
    assert_same_weights(single_run[0], out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["layer"], r["step"]) for r in records if r["stage"] != "eval"]
    assert steps == [(k, s) for k in range(3) for s in range(1, 25)]  # repeated steps logged once
    assert [r["point"] for r in records if r["stage"] == "eval"] == ["input", "stage1"]  # each check once, not redone


def _kd(teacher, student, tokens):
    with torch.no_grad():
        return _kl(student(tokens).logits, teacher(tokens).logits, 1.0).item()


def test_stage2_lowers_kd_loss_with_gradient_checkpointing(setup):
    root, teacher_dir, compressed = setup
    out = root / "global"
    summary = distill(
        compressed, out, teacher=teacher_dir, tokens=TRAIN, heldout=HELD_OUT, layers="none", global_steps=8, global_lr=3e-3, lora=0,
        batch_size=4, gradient_checkpointing=True, hidden_weight=0.5, progress=False,
    )
    assert summary["stage1"] is None and summary["stage2"]["steps"] == 8
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    before = _kd(teacher, AutoModelForCausalLM.from_pretrained(compressed), TRAIN)
    after = _kd(teacher, AutoModelForCausalLM.from_pretrained(out), TRAIN)
    assert after < 0.9 * before, (before, after)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == 2] == list(range(1, 9))
    assert [(r["point"], r["step"]) for r in records if r["stage"] == "eval"] == [("input", 0), ("stage2", 8)]


def test_stage2_with_ddp_workers(setup):
    root, teacher_dir, compressed = setup
    summary = distill(compressed, root / "ddp", teacher=teacher_dir, tokens=TRAIN, heldout=HELD_OUT, layers="none", batch_size=4, global_steps=2, workers=2, progress=False)
    assert summary["stage2"]["steps"] == 2 and summary["stage2"]["tokens"] == 2 * 2 * 4 * 32
    assert AutoModelForCausalLM.from_pretrained(root / "ddp").config.num_hidden_layers == 3


def _stage2_curve(path):
    return [r["kd"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if r["stage"] == 2]


def test_stage2_fsdp_matches_ddp(setup, tmp_path):
    """FSDP2 (sharded student) and DDP (replicated) average the same gradients: the same run up to float order."""
    _root, teacher_dir, compressed = setup
    run = {"teacher": teacher_dir, "tokens": TRAIN, "heldout": HELD_OUT, "layers": "none", "batch_size": 2, "grad_accum": 2, "global_steps": 3, "global_lr": 3e-3, "workers": 2, "train": "merged", "lora": 0, "progress": False}
    ddp = distill(compressed, tmp_path / "ddp", **run)
    fsdp = distill(compressed, tmp_path / "fsdp", fsdp=True, **run)
    assert fsdp["options"]["fsdp"] and fsdp["stage2"]["steps"] == 3 and fsdp["stage2"]["tokens"] == ddp["stage2"]["tokens"]
    assert _stage2_curve(tmp_path / "fsdp") == pytest.approx(_stage2_curve(tmp_path / "ddp"), rel=1e-4, abs=1e-6)
    wd, wf, w0 = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp"), weights(compressed)
    assert wd.keys() == wf.keys()
    moved = [k for k in wd if not torch.equal(wd[k], w0[k])]
    assert moved and all(k.startswith("model.layers.") for k in moved)  # --train merged: the layers, not embeddings/head
    for k in wd:
        scale = w0[k].abs().max().item()
        assert (wd[k] - wf[k]).abs().max().item() <= 1e-4 * max(scale, 1.0), k
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")
    with torch.no_grad():
        assert torch.isfinite(model(HELD_OUT[:2]).logits).all()


def test_stage2_fsdp_resume_and_single_worker_error(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    run = {"teacher": teacher_dir, "tokens": TRAIN, "heldout": HELD_OUT, "layers": "none", "batch_size": 2, "global_steps": 4, "global_lr": 3e-3, "workers": 2, "fsdp": True, "train": "all", "lora": 0}
    run["progress"] = False
    with pytest.raises(DistillError, match="--workers 2 or more"):  # nothing to shard over: an error, not a silent DDP/plain run
        distill(compressed, tmp_path / "one", **{**run, "workers": 1})
    distill(compressed, tmp_path / "whole", **run)
    with pytest.raises(DistillInterrupted, match="continue with --resume"):  # killed after step 3; the last checkpoint (full state dict + optimizer) is step 2
        distill(compressed, tmp_path / "resumed", save_every=2, stop_after=3, **run)
    assert (tmp_path / "resumed.partial" / "stage2" / "checkpoint.pt").is_file()
    with pytest.raises(DistillError, match="it was started with fsdp = True, now False"):  # the checkpoint format differs: switching to DDP is refused
        distill(compressed, tmp_path / "resumed", resume=True, **{**run, "fsdp": False})
    distill(compressed, tmp_path / "resumed", resume=True, **run)
    assert _stage2_curve(tmp_path / "resumed") == pytest.approx(_stage2_curve(tmp_path / "whole"), rel=1e-5)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a), [k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-6)]


def test_vocab_mismatch_is_a_clear_error(setup, tmp_path):
    _root, _teacher_dir, compressed = setup
    other = save_teacher(tmp_path / "other", vocab_size=160)
    with pytest.raises(DistillError, match="vocabulary size: 160 vs 128"):
        distill(compressed, tmp_path / "out", teacher=other, tokens=TRAIN, heldout=HELD_OUT, progress=False)
    deeper = save_teacher(tmp_path / "deeper", num_hidden_layers=8)
    with pytest.raises(DistillError, match="6-layer model but the teacher has 8"):
        distill(compressed, tmp_path / "out", teacher=deeper, tokens=TRAIN, heldout=HELD_OUT, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_too_little_data_is_a_clear_error(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    text = tmp_path / "small.txt"
    text.write_text("A short text.\n\nJust two paragraphs, far fewer than the tokens asked for.")
    with pytest.raises(DataError, match=r"--tokens 10000 plus --heldout-tokens 4096: .*has only 72 tokens"):
        distill(compressed, tmp_path / "out", teacher=teacher_dir, data=str(text), tokens=10_000, seqlen=32, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    with pytest.raises(NonFiniteLoss, match="last good checkpoint is .*layer_000.ckpt.pt") as info:
        distill(compressed, tmp_path / "out", teacher=teacher_dir, **{**SETTINGS, "lr": 1e30, "save_every": 1, "max_grad_norm": 0})
    assert (tmp_path / "out.partial" / "stage1" / "layer_000.ckpt.pt").is_file() and "\n" not in str(info.value)


def test_cli_distill_from_a_text_file(setup, tmp_path):
    from typer.testing import CliRunner

    from come.cli import app

    _root, _teacher_dir, compressed = setup
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(20)))
    args = ["distill", str(compressed), "--out", str(tmp_path / "out"), "--data", str(text), "--tokens", "256", "--seqlen", "32", "--heldout-tokens", "64", "--batch-size", "4", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "come_plan.json").read_text())["distillation"]["data"]["source"]["kind"] == "file"
    again = CliRunner().invoke(app, args)  # the teacher came from the plan; now the output exists
    assert_error_line(again, "exists; pass --overwrite to replace it")
    assert len(again.output.strip().splitlines()) == 1


@pytest.mark.parametrize("loss", ["cosine", "kl"])
def test_other_stage1_losses_decrease(setup, tmp_path, loss):
    _root, teacher_dir, compressed = setup
    summary = distill(compressed, tmp_path / "out", teacher=teacher_dir, loss=loss, cache_dtype="bfloat16", **SETTINGS)
    for layer in summary["stage1"]["layers"].values():
        assert layer["final_loss"] < 0.8 * layer["initial_loss"]


def test_shortgpt_survivors_of_removed_spans_are_trained(setup, tmp_path):
    _root, teacher_dir, _compressed = setup
    loaded = LoadedModel(tiny_model("llama"), char_tokenizer(), {"name": "tiny", "kind": "local", "path": str(teacher_dir)})
    plan = compress(loaded, target_layers=4, method="shortgpt", tokens=tiny_tokens(), out=tmp_path / "short", progress=False).plan
    spans = {k: layer["covers"] for k, layer in enumerate(plan["layers"]) if len(layer["covers"]) > 1}
    assert spans and not any(layer["merged"] for layer in plan["layers"])
    summary = distill(tmp_path / "short", tmp_path / "out", **{**SETTINGS, "epochs": 1})  # teacher from the plan
    assert {k: v["covers"] for k, v in summary["stage1"]["layers"].items()} == spans


# -- held-out selection: never worse ------------------------------------------------
def _heldout_kl(teacher_dir, model_dir):
    from come.evaluation.fidelity import fidelity

    return fidelity(AutoModelForCausalLM.from_pretrained(teacher_dir), AutoModelForCausalLM.from_pretrained(model_dir), HELD_OUT)["kl"]


def test_output_is_the_best_checked_candidate(setup, single_run):
    _root, teacher_dir, compressed = setup
    out, summary = single_run
    sel = summary["selection"]
    assert set(sel["candidates"]) == {"input", "stage1"} and sel["heldout"]["tokens"] == HELD_OUT.numel()
    assert sel["chosen"] == min(sel["candidates"], key=lambda c: sel["candidates"][c]["kl"]) == "stage1" and sel["improved"]
    assert _heldout_kl(teacher_dir, out) == pytest.approx(sel["kl_after"], rel=1e-4)
    assert _heldout_kl(teacher_dir, compressed) == pytest.approx(sel["kl_before"], rel=1e-4)
    assert sel["kl_after"] < sel["kl_before"]


def test_training_that_hurts_returns_the_input_unchanged(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    # A huge step size wrecks the merged layers at once: no check beats the input.
    summary = distill(compressed, tmp_path / "out", teacher=teacher_dir, tokens=TRAIN, heldout=HELD_OUT, layers="none",
                      global_steps=3, global_lr=10.0, batch_size=4, max_grad_norm=0, eval_every=1, progress=False)
    sel = summary["selection"]
    assert sel["chosen"] == "input" and not sel["improved"] and summary["stage2"]["best"] is None
    assert all(c["kl"] > sel["kl_before"] for c in [sel["candidates"]["input"]]) is False  # the input is its own best
    assert_same_weights(compressed, tmp_path / "out")
    evals = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [(r["point"], r["step"]) for r in evals] == [("input", 0), ("stage2", 1), ("stage2", 2), ("stage2", 3)]
    assert all(r["kl"] > evals[0]["kl"] for r in evals[1:])


def test_cli_says_when_the_input_is_kept(setup, tmp_path):
    from typer.testing import CliRunner

    from come.cli import app

    _root, _teacher_dir, compressed = setup
    text = tmp_path / "text.txt"
    words = torch.randint(0, 26, (40, 12, 5), generator=torch.Generator().manual_seed(0))  # no two windows alike
    text.write_text("\n\n".join(" ".join("".join(chr(97 + c) for c in word) for word in para.tolist()) for para in words))
    args = ["distill", str(compressed), "--out", str(tmp_path / "out"), "--data", str(text), "--tokens", "256", "--seqlen", "32",
            "--heldout-tokens", "64", "--batch-size", "4", "--layers", "none", "--global-steps", "2", "--global-lr", "10",
            "--max-grad-norm", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "the output is the input model, unchanged" in result.output


def test_held_out_errors_come_before_any_work(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    with pytest.raises(DistillError, match="less than one window of 32 tokens: too small"):
        distill(compressed, tmp_path / "out", teacher=teacher_dir, tokens=TRAIN, heldout_tokens=31, progress=False)
    with pytest.raises(DistillError, match="overlaps the training text"):
        distill(compressed, tmp_path / "out", teacher=teacher_dir, tokens=TRAIN, heldout=TRAIN[3:5], progress=False)
    with pytest.raises(DistillError, match="leaves none to train on"):
        distill(compressed, tmp_path / "out", teacher=teacher_dir, tokens=TRAIN, heldout_tokens=16 * 32, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_held_out_rows_split_off_a_tokens_tensor_are_never_trained_on(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    summary = distill(compressed, tmp_path / "out", teacher=teacher_dir, tokens=TRAIN, heldout_tokens=4 * 32, layers="none",
                      global_steps=1, batch_size=4, progress=False)
    assert summary["data"]["nsamples"] == 12 and summary["selection"]["heldout"]["windows"] == 4


# -- LoRA ---------------------------------------------------------------------------
@pytest.mark.parametrize("family, vectors", [("llama", False), ("qwen2", True)])
def test_lora_merge_equals_the_adapter_applied_model(family, vectors):
    from peft import LoraConfig, get_peft_model

    from come.distill.stage2 import lora_merged_weights

    torch.manual_seed(0)
    model = tiny_model(family)
    plain = tiny_model(family)
    plain.load_state_dict(model.state_dict())
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))  # B != 0
    # --lora-vectors: norm gains and (qwen2's attention) biases trained in full beside the adapters
    trained = [n for n, p in model.named_parameters() if p.dim() == 1] if vectors else []
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in trained:
            params[n].add_(0.1 * torch.randn_like(params[n]))
    assert not vectors or any(".base_layer.bias" in n for n in trained)  # a wrapped map's bias is renamed back
    x = tiny_tokens(nsamples=2, seqlen=16, seed=5)
    with torch.no_grad():
        adapted = model(x).logits
        merged = lora_merged_weights(model, trained)
        assert len(merged) == len(targets) + len(trained) and set(merged) <= set(plain.state_dict())
        plain_before = plain(x).logits
        plain.load_state_dict(merged, strict=False)
        after = plain(x).logits
    assert not torch.allclose(plain_before, adapted, atol=1e-3)  # the adapters do change the output
    torch.testing.assert_close(after, adapted, rtol=1e-5, atol=1e-5)


def test_lora_distillation_writes_a_plain_checkpoint_and_resumes_identically(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    run = {"teacher": teacher_dir, "tokens": TRAIN, "heldout": HELD_OUT, "layers": "none", "global_steps": 6, "global_lr": 1e-2,
           "batch_size": 4, "lora": 4, "eval_every": 2, "progress": False}
    whole = distill(compressed, tmp_path / "whole", **run)
    assert whole["selection"]["chosen"] == "stage2" and whole["selection"]["kl_after"] < whole["selection"]["kl_before"]
    w, w0 = weights(tmp_path / "whole"), weights(compressed)
    assert w.keys() == w0.keys() and not any("lora" in k for k in w)  # a standard checkpoint, adapters merged
    moved = [k for k in w if not torch.equal(w[k], w0[k])]
    assert moved and all(k.startswith("model.layers.") and k.endswith("proj.weight") for k in moved)
    assert _heldout_kl(teacher_dir, tmp_path / "whole") == pytest.approx(whole["selection"]["kl_after"], rel=1e-4)
    with pytest.raises(DistillInterrupted, match="continue with --resume"):  # killed at step 5; last checkpoint step 3, best so far step 4
        distill(compressed, tmp_path / "resumed", save_every=3, stop_after=5, **run)
    resumed = distill(compressed, tmp_path / "resumed", resume=True, **run)
    assert resumed["selection"]["candidates"] == whole["selection"]["candidates"]
    assert_same_weights(tmp_path / "whole", tmp_path / "resumed")


def test_lora_vectors_train_norm_gains_beside_the_adapters(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    run = {"teacher": teacher_dir, "tokens": TRAIN, "heldout": HELD_OUT, "layers": "none", "global_steps": 4, "global_lr": 1e-2,
           "batch_size": 4, "lora": 4, "progress": False}
    out = distill(compressed, tmp_path / "out", lora_vectors=True, **run)
    assert out["selection"]["chosen"] == "stage2"
    w, w0 = weights(tmp_path / "out"), weights(compressed)
    moved = {k for k in w if not torch.equal(w[k], w0[k])}
    assert "model.norm.weight" in moved and any(k.endswith("layernorm.weight") for k in moved)
    assert all(k.endswith(("proj.weight", "norm.weight")) for k in moved)
    assert _heldout_kl(teacher_dir, tmp_path / "out") == pytest.approx(out["selection"]["kl_after"], rel=1e-4)
    with pytest.raises(DistillError, match="--lora-vectors .* needs --lora"):
        distill(compressed, tmp_path / "bad", lora_vectors=True, **{**run, "lora": 0})
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_lora_plus_moves_the_b_matrices_at_its_multiple_of_the_rate(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    from come.distill.common import _optimizer
    from come.distill.options import DistillOptions
    from come.distill.stage2 import parameter_groups

    torch.manual_seed(0)
    model = tiny_model("llama")
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))  # B != 0
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    names, params = [n for n, _ in named], [p for _, p in named]
    before = [p.detach().clone() for p in params]
    o = DistillOptions(lora=4, lora_plus=4.0, global_lr=1e-3, warmup=0.0, max_grad_norm=0.0)
    opt, _ = _optimizer(parameter_groups(names, params, o), o.global_lr, o, total_steps=10)
    model(tiny_tokens(nsamples=2, seqlen=16, seed=5)).logits.pow(2).mean().backward()
    opt.step()
    # Adam's first step moves every parameter with a gradient by its rate (times the sign of the gradient).
    moved = {n: (p.detach() - b).abs().max().item() for n, p, b in zip(names, params, before, strict=True)}
    assert all(v == pytest.approx(4e-3, rel=1e-3) for n, v in moved.items() if "lora_B" in n)
    assert all(v == pytest.approx(1e-3, rel=1e-3) for n, v in moved.items() if "lora_A" in n)
    assert parameter_groups(names, params, DistillOptions(lora=4)) is params  # the default: one group
    _root, teacher_dir, compressed = setup
    with pytest.raises(DistillError, match="--lora-plus .* needs --lora"):
        distill(compressed, tmp_path / "bad", teacher=teacher_dir, tokens=TRAIN, heldout=HELD_OUT, lora=0, lora_plus=4.0,
                progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_bf16_autocast_runs_the_forward_passes_in_bfloat16_and_keeps_float32_weights(setup, tmp_path, monkeypatch):
    from come.engine import precision

    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    cpu = torch.device("cpu")
    with precision.autocast_context(cpu, "on")():
        assert layer(x).dtype == torch.bfloat16
    with precision.autocast_context(cpu, "off")():
        assert layer(x).dtype == torch.float32
    for native in (True, False):  # auto: on exactly where the device computes bfloat16 natively
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        with precision.autocast_context(cpu, "auto")():
            assert layer(x).dtype == (torch.bfloat16 if native else torch.float32)
    _root, teacher_dir, compressed = setup
    run = {"teacher": teacher_dir, "tokens": TRAIN, "heldout": HELD_OUT, "layers": "none", "global_steps": 4, "global_lr": 1e-2,
           "batch_size": 4, "lora": 4, "progress": False}
    on = distill(compressed, tmp_path / "on", autocast="on", **run)
    off = distill(compressed, tmp_path / "off", autocast="off", **run)
    assert on["selection"]["chosen"] == "stage2" and on["selection"]["kl_after"] < on["selection"]["kl_before"]
    assert on["selection"]["kl_after"] != off["selection"]["kl_after"]  # the steps did run in another precision
    assert all(t.dtype == torch.float32 for t in weights(tmp_path / "on").values())
    # the held-out check is float32 either way: the chosen model's KL, measured again, is the one recorded
    assert _heldout_kl(teacher_dir, tmp_path / "on") == pytest.approx(on["selection"]["kl_after"], rel=1e-4)
    with pytest.raises(DistillError, match="--autocast must be one of off, on, auto"):
        distill(compressed, tmp_path / "bad", autocast="fp8", **run)


def test_lora_rank_not_below_the_layer_width_is_refused_before_work(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    # The tiny model's narrowest adapted map is k/v: 2 heads x 16 = 32 wide.
    with pytest.raises(DistillError, match="--lora 32 is not below the layer width it adapts .key/value width 32"):
        distill(compressed, tmp_path / "out", teacher=teacher_dir, tokens=TRAIN, global_steps=1, lora=32, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


class _Ticks:
    """A clock that advances one second per reading."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def test_time_budget_sets_the_steps_from_timed_steps_and_equals_that_many_global_steps(setup, tmp_path, monkeypatch):
    from come.distill import stage2

    _root, teacher_dir, compressed = setup
    run = {"teacher": teacher_dir, "tokens": TRAIN, "heldout": HELD_OUT, "layers": "none", "global_lr": 1e-2,
           "batch_size": 4, "lora": 4, "eval_every": 3, "progress": False}
    # The clock's readings: the start, then each trial step's start and end (5, 1, 3 and 2 s), then the end.
    readings = iter([0.0, 0.0, 5.0, 5.0, 6.0, 6.0, 9.0, 9.0, 11.0, 11.0])
    monkeypatch.setattr(stage2, "_clock", lambda: next(readings))
    timed = distill(compressed, tmp_path / "timed", time_budget=0.5, **run)
    budget = timed["stage2"]["time_budget"]
    check_s = budget["check_seconds"]
    assert budget["step_seconds"] == 2.0 and 0 < check_s < 1  # the median of the last three; the check really timed
    # 30 s, less the 11 s the count took and the last check, at 2 s a step plus a check every 3 steps
    assert budget["steps"] == int((30 - 11 - check_s) // (2 + check_s / 3)) == timed["stage2"]["steps"]
    assert timed["options"]["global_steps"] == budget["steps"] and timed["options"]["time_budget"] == 0.5
    assert budget["passes"] == budget["steps"] * 4 / 16  # 16 windows, 4 a step: the budget outlasts them
    records = [json.loads(line) for line in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records if r["stage"] == "time_budget"] == [budget["steps"]]
    assert [r["step"] for r in records if r["stage"] == 2] == list(range(1, budget["steps"] + 1))
    card = (tmp_path / "timed" / "README.md").read_text()
    assert f"Stage 2 ran {budget['steps']} steps, what `--time-budget 0.5`" in card and f"`--global-steps {budget['steps']}`" in card
    # The timed steps (AdamW at rate 0) leave the weights alone, and the schedule spans the count: the same run.
    fixed = distill(compressed, tmp_path / "fixed", global_steps=budget["steps"], **run)
    assert fixed["selection"]["candidates"] == timed["selection"]["candidates"]
    assert_same_weights(tmp_path / "timed", tmp_path / "fixed")


def test_time_budget_resumes_with_the_recorded_count(setup, tmp_path, monkeypatch):
    from come.distill import stage2

    _root, teacher_dir, compressed = setup
    run = {"teacher": teacher_dir, "tokens": TRAIN, "heldout": HELD_OUT, "layers": "none", "global_lr": 1e-2,
           "batch_size": 4, "lora": 4, "eval_every": 2, "time_budget": 0.3, "progress": False}
    monkeypatch.setattr(stage2, "_clock", _Ticks())
    whole = distill(compressed, tmp_path / "whole", **run)
    with pytest.raises(DistillInterrupted):
        distill(compressed, tmp_path / "resumed", save_every=2, stop_after=3, **run)
    monkeypatch.setattr(stage2, "_clock", lambda: 0.0)  # a clock that would price the steps at nothing: not read again
    resumed = distill(compressed, tmp_path / "resumed", resume=True, **run)
    assert resumed["stage2"]["time_budget"]["steps"] == whole["stage2"]["time_budget"]["steps"] > 3
    assert resumed["selection"]["candidates"] == whole["selection"]["candidates"]
    assert_same_weights(tmp_path / "whole", tmp_path / "resumed")


def test_time_budget_errors_come_before_any_work(setup, tmp_path):
    _root, teacher_dir, compressed = setup
    with pytest.raises(DistillError, match="give it or --global-steps, not both"):
        distill(compressed, tmp_path / "out", teacher=teacher_dir, tokens=TRAIN, time_budget=1, global_steps=4, progress=False)
    for bad in (0, -1.5, "soon"):
        with pytest.raises(DistillError, match="--time-budget must be a positive number of minutes"):
            distill(compressed, tmp_path / "out", teacher=teacher_dir, tokens=TRAIN, time_budget=bad, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@torch.no_grad()
def test_a_teacher_with_non_finite_states_is_refused_and_leaves_no_cache(tmp_path):
    from come.core.adapters import adapter_for
    from come.distill.cache import _build_cache
    from come.distill.options import DistillOptions
    from come.errors import NonFiniteActivations

    teacher = tiny_model("llama")
    adapter_for(teacher.config).layers(teacher)[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivations, match="boundary 3"):
        _build_cache(teacher, adapter_for(teacher.config), tiny_tokens(), {1, 3}, DistillOptions(progress=False),
                     tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
