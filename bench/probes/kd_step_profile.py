"""Where a stage-2 KD step's CPU time goes, by torch operator (probe).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/probes/kd_step_profile.py MODEL [--steps 3] [--autocast on|off]

MODEL: a `come compress` output (its plan names the teacher). The step is stage 2's default: the default LoRA
adapters (rank 16) on every linear map, batch 2 x 512, logit KD (`distill/common.py: _kl`), AdamW. Prints the operators by
self CPU time over the profiled steps (one warm-up step first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from come.distill.common import _kl
from come.distill.options import DistillOptions
from come.distill.run import _teacher_source
from come.engine.allocator import keep_freed_memory
from come.engine.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--autocast", choices=["on", "off"], default="on")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--shapes", action="store_true", help="also group the operators by input shape")
    args = p.parse_args()
    keep_freed_memory()  # as the `come` command does
    plan = json.loads((args.model / "come_plan.json").read_text())
    teacher = load_model(_teacher_source(plan, None)).model.requires_grad_(False)  # as `come distill` finds it
    student = load_model(str(args.model)).model.requires_grad_(False)
    targets = [n for n, m in student.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    o = DistillOptions()  # the defaults' adapters and learning rate
    get_peft_model(student, LoraConfig(r=o.lora, lora_alpha=o.lora_alpha or 2 * o.lora, lora_dropout=0.0, target_modules=targets))
    params = [q for n, q in student.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=o.global_lr)
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.autocast == "on" else contextlib.nullcontext
    ids = torch.randint(0, teacher.config.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
    student.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad(), precision():
            t = teacher(input_ids=ids, use_cache=False).logits
        with precision():
            loss = _kl(student(input_ids=ids, use_cache=False).logits, t, 1.0)
        loss.backward()
        opt.step()

    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.shapes:  # the heaviest operator calls by input shape
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
