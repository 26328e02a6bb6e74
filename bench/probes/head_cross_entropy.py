# Probe behind bench/results/cost_probes.md (run from the repository root with the venv active).
"""One sequence's candidate cross-entropy through a SmolLM2-sized LM head (128 x 576 -> 49,152): log_softmax and
gather (the code) against logsumexp minus the gathered logit, and the head's matmul alone; CPU seconds per
sequence. OMP_NUM_THREADS=1 python bench/probes/head_cross_entropy.py"""
import time

import torch

torch.manual_seed(0)
W = torch.randn(49152, 576) * 0.02
head = torch.nn.Linear(576, 49152, bias=False); head.weight.data = W
x = torch.randn(1, 128, 576)
labels = torch.randint(0, 49152, (1, 128))
def old():
    logp = torch.log_softmax(head(x)[:, :-1].float(), dim=-1)
    return -logp.gather(-1, labels[:, 1:].unsqueeze(-1))
def mm():
    return head(x)
def new():
    logits = head(x)[:, :-1]
    lse = torch.logsumexp(logits, -1, keepdim=True)
    return lse - logits.gather(-1, labels[:, 1:].unsqueeze(-1))
def new2():
    logits = head(x[:, :-1])
    lse = torch.logsumexp(logits, -1, keepdim=True)
    return lse - logits.gather(-1, labels[:, 1:].unsqueeze(-1))
for f in (old, mm, new, new2, old, mm, new, new2):
    with torch.no_grad():
        f(); t=time.process_time()
        for _ in range(40): r=f()
        print(f.__name__, (time.process_time()-t)/40)
with torch.no_grad():
    a, b = old(), new()
    print((a-b).abs().max().item(), (a==b).float().mean().item())
