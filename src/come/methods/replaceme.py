"""ReplaceMe (Shopkhoev et al. 2025, arXiv 2505.02819): replace a block of layers by a linear map.

A contiguous block of n layers s..s+n-1 (n = the layers to remove) is chosen
by the smallest angular distance between the hidden states entering and
leaving it (last token, or all tokens with `--sbi-tokens all`, as CoMe's
window distance); blocks start at 1 or later, since the map lives in the
layer before the block. That layer's output is r + m (r: the residual after
attention, m: its FFN output); the block is replaced by a d x d map T on m,

    lstsq:  T = argmin ||m T - (h_{s+n} - r)||^2   (closed form, float64 normal equations)
    cosine: T minimising the mean cosine distance between m T and h_{s+n} - r,
            from the identity by Adam (lr 1e-4, batches of 1024 tokens, `replaceme_epochs`),
            the authors' defaults,

where h_{s+n} is the original model's hidden state leaving the block. T is
folded into that layer's down_proj (W <- T^T W), so the model gains no
parameter. `replaceme_blocks` > 1 removes the layers as that many blocks of
near-equal size, one after the other, each chosen and fitted on the model the
previous ones left (the paper's main setting is one block).
"""

from __future__ import annotations

import copy

import torch

from ..core.refit import RidgeStats, ridge_solve
from ..core.scoring import layer_output
from ..errors import ComeError

COSINE_LR, COSINE_BATCH = 1e-4, 1024


def block_sizes(total: int, blocks: int) -> list[int]:
    """`total` layers as `blocks` near-equal blocks, larger ones first."""
    blocks = max(1, min(int(blocks), total))
    base, extra = divmod(total, blocks)
    return [base + (1 if i < extra else 0) for i in range(blocks)]


@torch.no_grad()
def ffn_parts(cache, adapter, k: int, layer, kwargs):
    """Yield (batch rows, m, r) of `layer` run on boundary h_k: FFN output and everything else."""
    captured = {}
    handle = adapter.down_proj(layer).register_forward_hook(lambda mod, args, out: captured.__setitem__("m", out))
    try:
        for b0, b1 in cache.batches():
            with cache.layer_precision():
                out = layer(cache.boundary(k)[b0:b1].to(cache.device, cache.compute_dtype), **kwargs)
            out = layer_output(out)
            cache.count_passes(b1 - b0)
            yield (b0, b1), captured["m"], out - captured["m"]
    finally:
        handle.remove()


def fit_transform(ctx, owner: int, target_index: int) -> tuple[torch.Tensor, dict]:
    """T (d x d, float64) for the FFN output of layer `owner`, and its fit errors."""
    cache, adapter, opts = ctx.cache, ctx.adapter, ctx.options
    layer, kwargs = ctx.layers[owner], cache.layer_kwargs[owner]
    teacher = cache.teacher_boundary(target_index)
    d = ctx.config.hidden_size
    stats = RidgeStats.zeros(d, d, cache.device)
    keep = opts.replaceme_objective == "cosine"
    ms, ys = [], []
    for (b0, b1), m, r in ffn_parts(cache, adapter, owner, layer, kwargs):
        t = teacher[b0:b1].to(cache.device, torch.float64)
        y = t - r.double()
        stats.add(m, y, t)
        if keep:
            ms.append(m.reshape(-1, d).float().cpu())
            ys.append(y.reshape(-1, d).float().cpu())
    identity = torch.eye(d, dtype=torch.float64)
    # Plain least squares (ReplaceMe's alpha = 0); a tiny damping only guards a singular X^T X.
    transform = ridge_solve(stats, 1e-9).T  # ridge_solve returns W with y ~ x W^T, so T = W^T
    record = {"objective": opts.replaceme_objective,
              "error_before": stats.relative_error(identity.to(stats.xtx.device))}
    if keep:
        transform = cosine_fit(torch.cat(ms), torch.cat(ys), opts.replaceme_epochs, opts.seed)
    record["error_after"] = stats.relative_error(transform.T.to(stats.xtx.device))
    return transform.double().cpu(), record


def cosine_fit(m: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> torch.Tensor:
    """T minimising mean(1 - cos(m T, y)) from the identity with Adam, as the authors' cosine solver."""
    transform = torch.eye(m.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([transform], lr=COSINE_LR)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(int(epochs)):
            for rows in torch.randperm(m.shape[0], generator=generator).split(COSINE_BATCH):
                loss = 1 - torch.nn.functional.cosine_similarity(m[rows] @ transform, y[rows], dim=-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return transform.detach().double()


def fold(adapter, layer, transform: torch.Tensor):
    """A copy of `layer` computing m T instead of m: down_proj W (d x d_ffn) becomes T^T W (bias b: b T)."""
    new = copy.deepcopy(layer)
    down = adapter.down_proj(new)
    t = transform.to(down.weight.device, torch.float64)
    down.weight.data = (t.T @ down.weight.double()).to(down.weight.dtype)
    if down.bias is not None:
        down.bias.data = (down.bias.double() @ t).to(down.bias.dtype)
    return new


def run(ctx, target_layers: int) -> None:
    if ctx.adapter.output_norms:
        raise ComeError(f"replaceme folds its map into down_proj, but {ctx.adapter.family} normalises the FFN "
                        "output after it, so the map cannot be folded; use shortgpt --refit or come-search")
    cache = ctx.cache
    for n in block_sizes(ctx.num_layers - target_layers, ctx.options.replaceme_blocks):
        if ctx.num_layers - n < 1:
            raise ComeError("replaceme needs a layer before the block")
        distance = cache.window_distance(n, all_tokens=ctx.options.sbi_tokens == "all")
        start = min(range(1, len(distance)), key=lambda i: (distance[i].item(), i))
        owner = start - 1
        target_index = ctx.records[start + n - 1]["covers"][-1] + 1
        transform, record = fit_transform(ctx, owner, target_index)
        folded = fold(ctx.adapter, ctx.layers[owner], transform)
        ctx.steps.append({
            "step": len(ctx.steps),
            "layers_before": ctx.num_layers,
            "distance": [round(v, 6) for v in distance.tolist()],
            "block": [start, start + n - 1],
            "covers": [c for r in ctx.records[start : start + n] for c in r["covers"]],
            "fit": record,
        })
        ctx.layers.replace(owner, 1, folded)
        ctx.records[owner]["transform"] = {"rule": "replaceme", **record}
        ctx.refresh(owner)
        ctx.remove_layers(list(range(start, start + n)))  # with --refit, the owner is refitted on top of T
