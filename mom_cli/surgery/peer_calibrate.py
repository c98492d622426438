"""Calibrating a converted PEER layer: train its retrieval (query network, query BatchNorm and
sub-keys) to find, for each token, the neurons of the dense FFN that matter; the experts stay frozen.

`calibrate(layer, x, y, steps=...)` is what `mom convert-peer --calibrate` calls, one layer at a
time, with x the FFN module's inputs after its pre-norm and y the dense FFN's outputs.

Why a retrieval loss and not the output error. A converted layer's gate is `none` (weight 1,
straight-through): the output error's gradient reaches only the scores of the experts that were
retrieved, and says nothing about the ones that were missed, which is where the error comes from.
Instead, as MoEfication and Deja Vu train their neuron predictors, calibration scores every expert
densely (during calibration only, in batches) and trains a binary "should be retrieved" classifier
per token whose positives are the oracle's choice: the m = h*k experts with the largest
contributions c_i(x) = |a_i(x)| ||v_i||, the size of each neuron's term in the output.

    owner(i)     the head that retrieves expert i (neuron init deals rows to heads, so each expert
                 has one; measured once on the first batch, `expert_owners`)
    theta_j(x)   head j's k-th score among its own experts, with its gradient (so the loss is a
                 true function of the parameters; detached, calibration barely moved on SmolLM2)
    logit_i(x)   = beta * (s_owner(i),i(x) - theta_owner(i)(x))    retrieved iff >= 0
    label_i(x)   = 1 iff c_i(x) is among the token's m largest
    weight_i(x)  = |c_i(x) - c*(x)| / its mean over the token's experts: an error costs what it
                   loses in contribution mass, c* the oracle's m-th contribution; every token alike
    loss         = weighted binary cross-entropy, beta a learned inverse temperature

The loss needs no expert forward pass: the owners' scores (tokens x N, from 2 sqrt(N) half-scores
per head) and the contributions (two matmuls with the frozen tables). The output error is reported before
and after, as the relative error ||f(x) - y||^2 / ||y||^2 averaged over tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mom_cli.modeling.peer import PeerLayer, half_scores

RETRIEVAL_PREFIXES = ("query.", "query_bn.")
RETRIEVAL_NAMES = ("sub_keys",)
CHECK_TOKENS = 2048  # tokens of x the output error is measured on (a fixed sample: the forward is the cost)


@dataclass
class CalibrationResult:
    steps: int
    loss_before: float  # relative output error, mean over tokens of ||f(x) - y||^2 / ||y||^2, on a sample of x
    loss_after: float  # the same, after
    retrieval_loss_first: float = float("nan")  # the training loss of the first and last steps
    retrieval_loss_last: float = float("nan")
    tokens: int = 0  # calibration tokens
    seconds: float = 0.0


def is_retrieval_param(name: str) -> bool:
    """The parameters calibration trains: the query network, its BatchNorm and the sub-keys."""
    return name.startswith(RETRIEVAL_PREFIXES) or name in RETRIEVAL_NAMES


# ----------------------------------------------------------------------------- measures


@torch.no_grad()
def relative_error(layer: PeerLayer, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over tokens of ||f(x_t) - y_t||^2 / ||y_t||^2, the layer in eval mode (BatchNorm
    running statistics). Per token, because a few tokens can carry FFN outputs hundreds of times
    larger than the rest (measured on SmolLM2 layer 11): a ratio of sums would be theirs alone."""
    was_training = layer.training
    layer.eval()
    total = 0.0
    for xc, yc in zip(x.split(chunk), y.split(chunk)):
        total += token_errors(layer(xc), yc).sum().item()
    layer.train(was_training)
    return total / max(x.shape[0], 1)


def token_errors(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||out_t - y_t||^2 / ||y_t||^2 for each token t: (tokens,)."""
    return (out - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp(min=1e-12)


@torch.no_grad()
def oracle_ffn(layer: PeerLayer, x: torch.Tensor, m: int, chunk: int = 1024) -> torch.Tensor:
    """The layer's experts, each token keeping exactly its m largest contributions |a_i(x)| ||v_i||
    at weight 1: the limit any retrieval of m experts can reach. Dense over all N experts, in
    chunks of tokens; with m covering every expert that holds a neuron, it is the dense FFN."""
    shape = x.shape
    x = x.reshape(-1, layer.d_model)
    norms = layer.w_out.norm(dim=1)
    outs = []
    for xc in x.split(chunk):
        a = layer.activations(xc)
        keep = (a.abs() * norms).topk(min(m, layer.n_experts), dim=1).indices
        out = torch.zeros_like(a).scatter_(1, keep, a.gather(1, keep)) @ layer.w_out
        outs.append(out if layer.b_out is None else out + layer.b_out)
    return torch.cat(outs).view(shape)


# ----------------------------------------------------------------------------- the retrieval loss


def _half_scores_both(layer: PeerLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries (tokens, h, d_key) and each half's scores against its sqrt(N) sub-keys."""
    q = layer.queries(x)
    half = layer.key_dim // 2
    k1, k2 = layer._sub_keys()
    return q, half_scores(q[..., :half], k1), half_scores(q[..., half:], k2)


def dense_scores(layer: PeerLayer, x: torch.Tensor) -> torch.Tensor:
    """q_j(x).k_i for every head j and every expert i = row * sqrt(N) + col: (tokens, h, N)."""
    _, s1, s2 = _half_scores_both(layer, x)
    return (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)


@torch.no_grad()
def expert_owners(layer: PeerLayer, x: torch.Tensor) -> torch.Tensor:
    """(N,) the head that retrieves each expert: the head whose score is furthest above its own
    k-th score, most often over the tokens of x. With neuron init every expert has one owner
    (the heads own disjoint bands of rows); for other layers it is the head that prefers it most."""
    scores = dense_scores(layer, x)
    kth = scores.topk(layer.topk, dim=-1).values[..., -1:]
    return (scores - kth).argmax(dim=1).mode(dim=0).values


def _owner_table(owner: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, M) the experts each head owns, padded (mask False) to the largest band M."""
    counts = torch.bincount(owner, minlength=heads)
    order = owner.argsort(stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(int(counts.max()), device=owner.device)
    mask = slot.unsqueeze(0) < counts.unsqueeze(1)
    table = order[(start.unsqueeze(1) + slot).clamp(max=owner.numel() - 1)]
    return table, mask


def retrieval_loss(
    layer: PeerLayer,
    x: torch.Tensor,
    contrib: torch.Tensor,
    owner: torch.Tensor,
    log_beta: torch.Tensor,
    table: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Contribution-weighted binary cross-entropy of "retrieved" against the oracle (module docstring).

    Only the owner head's scores are formed ((tokens, N), not (tokens, h, N)), and each head's
    boundary is the k-th of its own experts' scores. The boundary keeps its gradient, so the loss
    is a true function of the parameters: with it detached, every score of a head could rise
    together for nothing, and calibration barely moved (measured on SmolLM2).
    """
    _, s1, s2 = _half_scores_both(layer, x)
    expert = torch.arange(layer.n_experts, device=x.device)
    row, col = expert // layer.n_sub, expert % layer.n_sub
    own_scores = s1[:, owner, row] + s2[:, owner, col]  # (tokens, N): each expert's owner's score
    band, mask = table if table is not None else _owner_table(owner, layer.heads)
    k = min(layer.topk, band.shape[1])
    theta = own_scores[:, band].masked_fill(~mask, -torch.inf).topk(k, dim=-1).values[..., -1]  # (tokens, h)
    # a head owning fewer than k experts retrieves all of them: a boundary below them all
    theta = torch.where(torch.isfinite(theta), theta, own_scores.detach().min() - 1)
    logit = own_scores - theta[:, owner]  # >= 0 iff the owner retrieves it
    return oracle_bce(logit * log_beta.exp(), contrib, min(layer.heads * layer.topk, contrib.shape[1]))


def oracle_bce(logit: torch.Tensor, contrib: torch.Tensor, m: int) -> torch.Tensor:
    """Binary cross-entropy of logit (tokens, N; >= 0 means "retrieved") against each token's m
    largest contributions, each expert weighted by how far its contribution is from the m-th."""
    with torch.no_grad():
        boundary = contrib.topk(m, dim=1).values[:, -1:]  # the oracle's m-th contribution
        label = (contrib >= boundary).to(contrib.dtype)
        weight = (contrib - boundary).abs()
        weight = weight / weight.mean(dim=1, keepdim=True).clamp(min=1e-12)  # every token counts alike
    bce = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    return (bce * weight).mean()


def _init_log_beta(layer: PeerLayer, x: torch.Tensor) -> torch.Tensor:
    """Inverse temperature so that the typical gap between a head's 1st and k-th score is ~4."""
    with torch.no_grad():
        top = dense_scores(layer, x).topk(layer.topk, dim=-1).values
        gap = (top[..., 0] - top[..., -1]).mean().clamp(min=1e-6)
    return (4.0 / gap).log().to(torch.float32)


@torch.no_grad()
def restat_query_bn(layer: PeerLayer, x: torch.Tensor, chunk: int = 8192) -> None:
    """Set the BatchNorm's running statistics to those of query(x) over x, changing its affine so
    that the eval-mode function stays the same: train mode (batch statistics) then agrees with it."""
    bn = layer.query_bn
    if bn is None:
        return
    q = torch.cat([layer.query(xc) for xc in x.split(chunk)])
    mean, var = q.mean(0), q.var(0, unbiased=False)
    old_std, new_std = (bn.running_var + bn.eps).sqrt(), (var + bn.eps).sqrt()
    bn.bias.add_(bn.weight * (mean - bn.running_mean) / old_std)
    bn.weight.mul_(new_std / old_std)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)


# ----------------------------------------------------------------------------- calibration


def calibrate(
    layer: PeerLayer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float | None = None,
    batch_tokens: int = 1024,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> CalibrationResult:
    """Train the layer's retrieval in place to find each token's largest-contribution experts.

    x: (T, d) inputs of the layer, y: (T, d) the dense FFN's outputs on them, on the layer's
    device. Only the query network, the query BatchNorm (run on its running statistics, so that
    training and inference compute the same function) and the sub-keys change; requires_grad and
    train/eval mode are restored after. Adam, learning rate `lr` (default 1e-2) decayed on a
    cosine; batches drawn without replacement under `seed`, so a run is deterministic on CPU
    (on GPU, index backwards accumulate in any order). The output error is measured on a fixed
    sample of x (CHECK_TOKENS, drawn under `seed`) before, eight times along the way and after;
    the best state is kept, so calibration never leaves the layer worse on that sample than it
    found it. on_step(step, loss) is called after every step. Returns the relative output errors
    before and after on that sample.
    """
    t0 = time.perf_counter()
    x = x.reshape(-1, layer.d_model)
    y = y.reshape(-1, layer.d_model)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randperm(x.shape[0], generator=gen)[:CHECK_TOKENS].to(x.device)
    xp, yp = x[probe], y[probe]
    before = relative_error(layer, xp, yp)
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    was_training = layer.training
    batch = min(batch_tokens, x.shape[0])
    norms = layer.w_out.detach().norm(dim=1)
    first = last = float("nan")
    try:
        layer.eval()  # BatchNorm on running statistics: the function that inference will compute
        for n, p in layer.named_parameters():
            p.requires_grad_(is_retrieval_param(n))
        params = {n: p for n, p in layer.named_parameters() if is_retrieval_param(n)}
        best_err, best = before, _snapshot(layer)
        log_beta = _init_log_beta(layer, x[:batch]).requires_grad_(True)
        owner = expert_owners(layer, x[:batch])
        table = _owner_table(owner, layer.heads)
        opt = torch.optim.Adam([*params.values(), log_beta], lr=lr or 1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
        check = max(1, steps // 8)
        order = torch.empty(0, dtype=torch.long)
        for step in range(steps):
            if order.numel() < batch:  # a fresh permutation per epoch
                order = torch.cat([order, torch.randperm(x.shape[0], generator=gen)])
            idx, order = order[:batch].to(x.device), order[batch:]
            xb = x[idx]
            with torch.no_grad():
                contrib = layer.activations(xb).abs() * norms
            loss = retrieval_loss(layer, xb, contrib, owner, log_beta, table)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = loss.item()
            first = last if step == 0 else first
            if on_step is not None:
                on_step(step, last)
            if (step + 1) % check == 0 or step + 1 == steps:
                err = relative_error(layer, xp, yp)
                if err < best_err:
                    best_err, best = err, _snapshot(layer)
        layer.load_state_dict(best, strict=False)
        restat_query_bn(layer, x)
    finally:
        for n, p in layer.named_parameters():
            p.requires_grad_(flags[n])
            if is_retrieval_param(n):
                p.grad = None  # calibration's, not the caller's
        layer.train(was_training)
    after = relative_error(layer, xp, yp)
    return CalibrationResult(steps, before, after, first, last, x.shape[0], time.perf_counter() - t0)


def _snapshot(layer: PeerLayer) -> dict[str, torch.Tensor]:
    """Copies of the retrieval's state (parameters and BatchNorm buffers)."""
    return {n: t.detach().clone() for n, t in layer.state_dict().items() if is_retrieval_param(n)}
