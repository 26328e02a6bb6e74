# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""Old (whole-batch head) vs new (chunked) loss_through, bitwise, on SmolLM2 for several stacks."""
import math
import time

import torch

from come.core.adapters import adapter_for
from come.core.scoring import BoundaryCache
from come.engine.models import load_model
from come.evaluation.data import calibration_tokens


def old_loss(self, start, stack, samples=None):
    total, count = 0.0, 0
    kl = self.loss_kind == "kl"
    teacher = self.teacher_boundary(self.num_layers_original) if kl else None
    with self.layers.head() as (norm, head):
        for rows, x in self.run_through(start, stack, samples):
            logp = torch.log_softmax(head(norm(x))[:, :-1].float(), dim=-1)
            if kl:
                t = teacher[rows].to(self.device, self.compute_dtype)
                logq = torch.log_softmax(head(norm(t))[:, :-1].float(), dim=-1)
                total += float((logq.exp() * (logq - logp)).sum())
                count += logq.shape[0] * logq.shape[1]
            else:
                labels = self.tokens[rows, 1:].to(logp.device)
                total -= float(logp.gather(-1, labels.unsqueeze(-1)).sum())
                count += labels.numel()
    return total / count if math.isfinite(total) else math.inf

loaded = load_model(None)
tokens = calibration_tokens(loaded.tokenizer, "wikipedia", 32, 128, seed=0)
cache = BoundaryCache(loaded.model, adapter_for(loaded.model.config), tokens, progress=False)
for kind in ("ce", "kl"):
    cache.loss_kind = kind
    for start in (0, 10, 20, 29):
        for skip in (0, 1):  # skip: delete layer `start`
            stack = cache.current_stack(start + skip)
            t = time.process_time(); a = old_loss(cache, start, stack, samples=16); t1 = time.process_time() - t
            t = time.process_time(); b = cache.loss_through(start, stack, samples=16); t2 = time.process_time() - t
            print(kind, start, skip, repr(a), repr(b), a == b, f"old {t1:.2f}s new {t2:.2f}s", flush=True)
