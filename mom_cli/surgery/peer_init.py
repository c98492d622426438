"""Turning a dense FFN into a PEER layer ("neuron init"), and measures of how well retrieval works.

Conversion-time code for `mom_cli.modeling.peer.PeerLayer`; it is not copied into exported
checkpoints (the runtime layer needs none of it). Read top to bottom:

1. `contributions`      a neuron's contribution |a_i(x)| ||v_i|| (a_i: peer.expert_activations)
2. `peer_from_dense`    a dense FFN becomes a PEER layer: its neurons become the experts and the
   `peer_from_ffn`      keys are fitted to the neurons' input vectors (k-means on a grid of cells)
3. analysis helpers     oracle contribution mass, expert usage and its unevenness (paper Table 2)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN

from mom_cli.modeling.peer import PeerLayer, expert_activations

# ----------------------------------------------------------------------------- 1. contributions


@torch.no_grad()
def contributions(layer: PeerLayer, x: torch.Tensor) -> torch.Tensor:
    """|a_i(x)| * ||v_i|| for every token and every expert: (tokens, N)."""
    return layer.activations(x).abs() * layer.w_out.norm(dim=1)


def peer_from_ffn(fc_in: nn.Module, fc_out: nn.Module, gate_proj: nn.Module | None = None, **kwargs: Any) -> PeerLayer:
    """From the Linear (or transformers Conv1D) modules of a dense FFN; kwargs as `peer_from_dense`.

    fc_in is GPT-2's c_fc or Llama's up_proj, fc_out c_proj / down_proj, gate_proj Llama's gate_proj.
    """

    def rows(m: nn.Module, fan_in_side: bool) -> torch.Tensor:
        # nn.Linear stores (out, in); Conv1D (in, out). We want one row per neuron.
        w = m.weight.detach()
        conv1d = type(m).__name__ == "Conv1D"
        return w if conv1d != fan_in_side else w.t()

    def bias(m: nn.Module | None) -> torch.Tensor | None:
        return None if m is None or getattr(m, "bias", None) is None else m.bias.detach()

    return peer_from_dense(
        rows(fc_in, True),
        bias(fc_in),
        None if gate_proj is None else rows(gate_proj, True),
        rows(fc_out, False),
        bias(fc_out),
        b_gate=bias(gate_proj),
        **kwargs,
    )


# ----------------------------------------------------------------------------- 2. neuron init


def _kmeans(y: torch.Tensor, n_centroids: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (deterministic under gen)."""
    n = y.shape[0]
    cent = y[torch.randint(n, (1,), generator=gen)]
    d2 = (y - cent).pow(2).sum(1)
    for _ in range(1, n_centroids):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        nxt = y[torch.multinomial(p, 1, generator=gen)]
        cent = torch.cat([cent, nxt])
        d2 = torch.minimum(d2, (y - nxt).pow(2).sum(1))
    for _ in range(iters):
        lab = torch.cdist(y, cent).argmin(1)
        cent = _refit(y, lab, cent)
    return cent


def _refit(y: torch.Tensor, lab: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Centroid = mean of its members; an empty centroid keeps its place."""
    s = torch.zeros_like(cent).index_add_(0, lab, y)
    c = torch.bincount(lab, minlength=cent.shape[0]).unsqueeze(1)
    return torch.where(c > 0, s / c.clamp(min=1), cent)


def _assign_cells(d1: torch.Tensor, d2: torch.Tensor, block: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """A distinct grid cell (row, col) per neuron, cost d1[i, row] + d2[i, col], greedy by auction.

    Each round, every unplaced neuron proposes its cheapest free cell; each contested cell goes to
    the proposer with the lowest cost (ties: lowest index); losers retry next round. Every round
    places at least one neuron, so it ends; it is not the optimal assignment (Hungarian would be
    O(n^3) on up to ~10^4 neurons x 10^4 cells) but it keeps each neuron near its own centroids.
    """
    n, n_rows = d1.shape
    n_cols = d2.shape[1]
    free = torch.ones(n_rows * n_cols, dtype=torch.bool)
    cell = torch.full((n,), -1, dtype=torch.long)
    todo = torch.arange(n)
    step = max(1, block // (n_rows * n_cols))
    while todo.numel():
        best_c, best_v = [], []
        for s in range(0, todo.numel(), step):
            u = todo[s : s + step]
            cost = (d1[u].unsqueeze(2) + d2[u].unsqueeze(1)).flatten(1).masked_fill(~free, math.inf)
            v, c = cost.min(1)
            best_c.append(c), best_v.append(v)
        c, v = torch.cat(best_c), torch.cat(best_v)
        rank = torch.empty_like(c)
        rank[torch.argsort(v, stable=True)] = torch.arange(c.numel())
        first = torch.full((n_rows * n_cols,), c.numel(), dtype=torch.long).scatter_reduce(0, c, rank, "amin")
        win = first[c] == rank
        cell[todo[win]] = c[win]
        free[c[win]] = False
        todo = todo[~win]
    return cell // n_cols, cell % n_cols


def grid_size(n: int, n_sub: int, heads: int, slack: float) -> tuple[int, int]:
    """Rows x cols of the used sub-grid, about slack*n cells. Spare cells ease placement but are
    retrieved as often as filled ones (their keys are centroid sums too), so the default slack 1
    keeps the grid as small as the neurons allow (measured: slack 1.25 lost a quarter of the mass)."""
    rows = min(n_sub, max(heads, math.ceil(math.sqrt(n * slack))))
    cols = min(n_sub, math.ceil(n * slack / rows))
    if rows * cols < n:
        rows, cols = n_sub, n_sub
    return rows, cols


@torch.no_grad()
def peer_from_dense(
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    w_out: torch.Tensor,
    out_bias: torch.Tensor | None,
    n_experts: int,
    heads: int,
    topk: int,
    key_dim: int,
    *,
    b_gate: torch.Tensor | None = None,
    activation: str | None = None,
    gate: str = "none",
    query_bn: bool = True,
    shared_keys: bool = True,
    keep: Sequence[int] | torch.Tensor | None = None,
    init: str = "neurons",
    calib_x: torch.Tensor | None = None,
    chunk_size: int = 512,
    slack: float = 1.0,
    fit_iters: int = 6,
    seed: int = 0,
) -> PeerLayer:
    """A PEER layer from a dense FFN given one row per neuron: w_in/w_gate/w_out (d_ff, d).

    GPT-2: w_in = c_fc.weight.T, b_in = c_fc.bias, w_out = c_proj.weight, out_bias = c_proj.bias.
    Llama: w_in = up_proj.weight, w_gate = gate_proj.weight, w_out = down_proj.weight.T.

    init="neurons": every kept neuron becomes one expert with its exact weights, in the grid cell
    chosen below (so expert index != neuron index: `neuron_index` records the map); the other
    experts get zero w_out (they change nothing until trained) and random w_in so they can train.
    N < d_ff needs `keep` (the neurons to keep). With gate "none" and retrieval covering every
    expert (h=1, k=N) the layer equals the dense FFN.

    Keys and queries are fitted so that q(x).k_i approximates a linear score z_i.[x; 1] of neuron
    i's contribution |a_i(x)| ||v_i||, so that before training retrieval prefers large ones.
      1. The routing vector z_i. With calib_x (FFN inputs, tokens x d; recommended): the ridge
         least-squares predictor of the contribution from [x; 1] over those tokens. On SmolLM2-135M
         layer 10 (h*k = 50% of d_ff) it found 0.73 of the oracle's mass against 0.55 for a random
         choice, where the weights-only fallback found 0.56. Without data: s_i [r_i; c_i], with
         r_i, c_i the input vector and bias that decide whether the neuron fires (u_i, b_i for
         GPT-2, the gate's g_i for SwiGLU) and s_i its output scale (||v_i||, times ||u_i|| when
         gated). Whitening: with M = E[x~ x~^T] (x~ = [x; 1], from calib_x, else identity) and
         M = L L^T, z'_i = L^T z~_i, so that the plain PCA of z' minimises the expected score error.
      2. The top principal directions split, alternately, into the two query halves; the query
         network is that projection L^-1 (the same for every head). With calib_x and query_bn,
         the BatchNorm is set to an identity on calib_x (`calibrate_query_bn`); without calib_x it
         is an identity only in eval mode (running statistics 0 and 1).
      3. Product quantisation on a rows x cols grid: k-means codebooks on each half, then rounds of
         "place every neuron in its own cell" (greedy auction, `_assign_cells`) and "refit each row
         and column centroid to the neurons placed in it".
      4. Reserved key coordinates route the heads: half 1 carries a one-hot of the row's head
         group (rows are dealt to the h heads in equal bands), half 2 a "column in use" flag, and
         the matching query coordinates are constants (query bias, or BatchNorm bias with zero
         weight). A head thus only retrieves from its own rows and unused rows/columns score a
         margin below, so heads never retrieve the same expert and empty cells of a large grid
         (N >> d_ff) are not retrieved; the offsets cancel for every candidate a head can win.
    gate defaults to "none": with softmax each head's weights sum to 1, which rescales the
    neurons, so the layer would no longer approximate the FFN it came from.
    init="random" gives a paper-style fresh layer (the FFN weights are not used).
    """
    gated = w_gate is not None
    d_ff, d = w_in.shape
    layer = PeerLayer(
        d,
        n_experts,
        heads,
        topk,
        key_dim,
        gated=gated,
        activation=activation,
        gate=gate,
        query_bn=query_bn,
        shared_keys=shared_keys,
        in_bias=b_in is not None or b_gate is not None,
        out_bias=out_bias is not None,
        chunk_size=chunk_size,
    )
    if init == "random":
        return layer
    if init != "neurons":
        raise ValueError(f"init must be 'neurons' or 'random', got {init!r}")
    if keep is None:
        if n_experts < d_ff:
            raise ValueError(f"n_experts={n_experts} < d_ff={d_ff}: pass `keep` (the neurons to keep)")
        keep_t = torch.arange(d_ff)
    else:
        keep_t = torch.as_tensor(keep, dtype=torch.long).cpu()
        if keep_t.unique().numel() != keep_t.numel() or keep_t.numel() > n_experts or keep_t.numel() == 0:
            raise ValueError(f"keep must be 1..{n_experts} distinct neuron indices, got {keep_t.numel()}")
        if keep_t.min() < 0 or keep_t.max() >= d_ff:
            raise ValueError(f"keep indices must lie in 0..{d_ff - 1}")
    n, half, n_sub = keep_t.numel(), key_dim // 2, layer.n_sub
    if half <= heads:
        raise ValueError(f"neuron init needs key_dim/2 > heads (reserved routing coordinates), got {key_dim}")
    if n_sub < heads:
        raise ValueError(f"neuron init needs sqrt(N) >= heads, got sqrt(N)={n_sub}, heads={heads}")
    n_rows, n_cols = grid_size(n, n_sub, heads, slack)
    if heads > 1 and (n_rows // heads) * n_cols < topk:  # else a head reaches into another's rows
        raise ValueError(
            f"neuron init: each head owns {n_rows // heads}x{n_cols} cells, fewer than "
            f"topk={topk}; use fewer heads or a smaller topk"
        )

    f32 = dict(dtype=torch.float32, device="cpu")  # fitted and built on CPU in float32; move it after
    u = w_in[keep_t.to(w_in.device)].to(**f32)
    bu = None if b_in is None else b_in[keep_t.to(b_in.device)].to(**f32)
    g = None if w_gate is None else w_gate[keep_t.to(w_gate.device)].to(**f32)
    bg = None if b_gate is None else b_gate[keep_t.to(b_gate.device)].to(**f32)
    v = w_out[keep_t.to(w_out.device)].to(**f32)
    xs = None if calib_x is None else calib_x.reshape(-1, d).to(**f32)

    # 1. the routing vector z~_i (d+1 dims), and whitening by the second moment of x~ = [x; 1]
    if xs is None:  # from the weights alone: z~_i = s_i [r_i; c_i]
        r, c = (g, bg) if gated else (u, bu)
        c = torch.zeros(n) if c is None else c
        scale = v.norm(dim=1) * (u.norm(dim=1) if gated else 1.0)  # the up projection scales a gated neuron
        z = torch.cat([r, c.unsqueeze(1)], 1) * scale.unsqueeze(1)
        m2 = torch.eye(d + 1)
    else:  # the best linear predictor of each neuron's contribution |a_i(x)| ||v_i|| on the data (ridge)
        xt = torch.cat([xs, torch.ones(xs.shape[0], 1)], 1)
        m2 = xt.t() @ xt / xt.shape[0]
        m2 += 1e-4 * m2.diagonal().mean() * torch.eye(d + 1)
        contrib = expert_activations(xs, u, bu, g, bg, ACT2FN[layer.activation]).abs() * v.norm(dim=1)
        z = torch.linalg.solve(m2, xt.t() @ contrib / xt.shape[0]).t()
    chol = torch.linalg.cholesky(m2)
    zw = z @ chol  # rows z'_i = L^T z~_i
    # 2. principal directions, dealt alternately to the halves (balances their variance, as in OPQ)
    dc1, dc2 = half - heads, half - 1
    vt = torch.linalg.svd(zw, full_matrices=False).Vh  # (rank, d+1)
    basis = torch.zeros(dc1 + dc2, d + 1)
    slots1, slots2 = list(range(dc1)), list(range(dc1, dc1 + dc2))
    for pc in range(min(vt.shape[0], dc1 + dc2)):  # pc 0 -> half 1, pc 1 -> half 2, ...; a full half passes
        target = slots1 if (pc % 2 == 0 and slots1) or not slots2 else slots2
        basis[target.pop(0)] = vt[pc]
    proj_q = basis @ torch.linalg.inv(chol)  # query:  basis L^-1 x~
    y = zw @ basis.t()  # keys:   basis L^T z~ = basis z'
    y1, y2 = y[:, :dc1], y[:, dc1:]

    # 3. product quantisation on a rows x cols grid with one neuron per cell
    gen = torch.Generator().manual_seed(seed)
    c1 = _kmeans(y1, n_rows, 10, gen)
    c2 = _kmeans(y2, n_cols, 10, gen)
    for it in range(fit_iters):
        rows, cols = _assign_cells(torch.cdist(y1, c1).pow(2), torch.cdist(y2, c2).pow(2))
        if it < fit_iters - 1:
            c1, c2 = _refit(y1, rows, c1), _refit(y2, cols, c2)

    # 4. keys with reserved routing coordinates, query constants, experts in their cells
    # the margin must beat any difference of half-scores q.c between two rows (or columns):
    # 2 max|q| max|c| per half, on the calibration data; without data, 8 sigma for unit inputs
    if xs is None:
        margin = 8 * y.norm(dim=1).max().item() + 1.0
    else:
        qp = torch.cat([xs, torch.ones(xs.shape[0], 1)], 1) @ proj_q.t()
        margin = 1.0 + 2 * sum(
            qp[:, sl].norm(dim=1).max().item() * y[:, sl].norm(dim=1).max().item()
            for sl in (slice(0, dc1), slice(dc1, None))
        )
    gm = math.sqrt(margin)
    group = torch.arange(n_rows) * heads // n_rows  # rows dealt to heads in equal bands
    keys1 = torch.zeros(n_sub, half)
    keys2 = torch.zeros(n_sub, half)
    spare = torch.randint(n_rows, (n_sub,), generator=gen)  # unused rows/cols copy a used centroid
    keys1[:, :dc1], keys2[:, :dc2] = c1[spare], c2[spare % n_cols]
    keys1[:n_rows, :dc1], keys2[:n_cols, :dc2] = c1, c2
    keys1[torch.arange(n_rows), dc1 + group] = gm  # in-group rows: +margin for their head
    keys2[:, dc2] = -2 * gm  # unused columns: -2 margin; used ones: -margin (cancels the row's +margin)
    keys2[:n_cols, dc2] = -gm
    layer.sub_keys.copy_(
        torch.stack([keys1, keys2]) if shared_keys else torch.stack([keys1, keys2]).expand(heads, -1, -1, -1)
    )

    w_q = torch.zeros(heads, key_dim, d + 1)
    w_q[:, :dc1] = proj_q[:dc1]
    w_q[:, half : half + dc2] = proj_q[dc1:]
    const = torch.zeros(heads, key_dim)
    const[torch.arange(heads), dc1 + torch.arange(heads)] = gm
    const[:, half + dc2] = gm
    is_const = const != 0
    layer.query.weight.copy_(w_q[..., :d].reshape(-1, d))
    layer.query.bias.copy_(w_q[..., d].reshape(-1))
    if layer.query_bn is None:
        layer.query.bias.add_(const.reshape(-1))
    else:  # BatchNorm: pass-through on the projections, constants via zero weight + bias
        bn = layer.query_bn
        bn.weight.copy_((~is_const).float().reshape(-1))
        bn.bias.copy_(const.reshape(-1))
        if xs is not None:
            calibrate_query_bn(layer, xs)

    expert = rows * n_sub + cols
    w_std = u.std().item()
    layer.w_in.normal_(0.0, w_std, generator=gen)
    layer.w_out.zero_()
    layer.w_in[expert] = u  # exact: float32 holds every float16/bfloat16/float32 value
    layer.w_out[expert] = v
    if gated:
        layer.w_gate.normal_(0.0, g.std().item(), generator=gen)
        layer.w_gate[expert] = g
    for param, src in ((layer.b_in, bu), (layer.b_gate, bg)):
        if param is not None:
            param.zero_()
            if src is not None:
                param[expert] = src
    if out_bias is not None:
        layer.b_out.copy_(out_bias.to(**f32))
    layer.neuron_index.fill_(-1)
    layer.neuron_index[expert] = keep_t
    return layer


@torch.no_grad()
def calibrate_query_bn(layer: PeerLayer, x: torch.Tensor) -> None:
    """Make the query BatchNorm an identity on the distribution of x, in train and eval mode alike.

    Running statistics := the statistics of query(x); on coordinates with non-zero weight the
    affine becomes (sqrt(var + eps), mean), which undoes the normalisation. Zero-weight
    coordinates (the constants of neuron init) are left alone.
    """
    bn = layer.query_bn
    if bn is None:
        return
    q = layer.query(x.reshape(-1, layer.d_model).to(layer.query.weight.dtype))
    mean, var = q.mean(0), q.var(0, unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    live = bn.weight != 0
    bn.weight.copy_(torch.where(live, (var + bn.eps).sqrt(), bn.weight))
    bn.bias.copy_(torch.where(live, mean, bn.bias))


# ----------------------------------------------------------------------------- 3. analysis


def _unique_mask(idx: torch.Tensor) -> torch.Tensor:
    """(tokens, m) -> True at the first occurrence of each expert in a token's row."""
    s, order = idx.sort(dim=1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    return torch.zeros_like(first).scatter(1, order, first)


@torch.no_grad()
def oracle_mass_fraction(layer: PeerLayer, x: torch.Tensor, m: int | None = None, chunk: int = 256) -> float:
    """Contribution mass |a_i(x)| ||v_i|| of the experts retrieval found (each counted once), over
    the mass of the oracle's top-m experts (m = h*k by default), summed over tokens.

    1.0 means retrieval found exactly the oracle's choice; a random choice of m experts scores
    about m/N of the total mass over the oracle's. Dense over N experts: use small batches.
    """
    x = x.reshape(-1, layer.d_model)
    m = m or layer.heads * layer.topk
    found = best = 0.0
    for xc in x.split(chunk):
        contrib = contributions(layer, xc)
        _, idx = layer.retrieve(xc)
        idx = idx.flatten(1)
        found += (contrib.gather(1, idx) * _unique_mask(idx)).sum().item()
        best += contrib.topk(m, dim=1).values.sum().item()
    return found / best if best > 0 else float("nan")


def usage_stats(indices: torch.Tensor, n_experts: int, weights: torch.Tensor | None = None) -> dict[str, float]:
    """Expert usage (fraction of the N experts retrieved at least once) and unevenness: the KL
    divergence of the accumulated router weights (counts if weights is None) from uniform, as in
    the paper's Table 2 (0 = perfectly even; log N = everything on one expert)."""
    flat = indices.reshape(-1)
    w = torch.ones_like(flat, dtype=torch.float64) if weights is None else weights.reshape(-1).double()
    acc = torch.zeros(n_experts, dtype=torch.float64, device=flat.device).index_add_(0, flat, w)
    p = acc / acc.sum()
    nz = p > 0
    kl = (p[nz] * (p[nz] * n_experts).log()).sum().item()
    return {"usage": nz.double().mean().item(), "kl_uniform": kl}
