"""PEER: a pool of N single-neuron experts found per token by product-key retrieval (arXiv 2407.04153).

Self-contained (torch and `transformers.activations` only): this file is copied next to
`modeling_mom.py` into `trust_remote_code` exports. Read top to bottom:

1. `product_key_topk`   the top-k of N = sqrt(N)^2 product keys in O((sqrt(N) + k^2) d_key)
2. `_ExpertMix`         the experts: gathered dots in, fused weighted gather-sum out, in blocks,
   `_GatheredDot`       with hand-written backwards that keep memory O(tokens (d + h k))
3. `PeerLayer`          query network (+ BatchNorm), h heads over one pool, gate, experts
4. `peer_from_dense`    a dense FFN becomes a PEER layer: its neurons become the experts and the
                        keys are fitted to the neurons' input vectors ("neuron init")
5. analysis helpers     oracle contribution mass, expert usage and its unevenness (paper Table 2)

Symbols follow the paper: N experts, h heads, top-k per head, d_key the query/key width (two
halves of d_key/2), d the model width. An expert is one neuron of a dense FFN:
    GPT-2 style   e_i(x) = act(u_i.x + b_i) v_i                 (tables w_in, b_in, w_out)
    SwiGLU        e_i(x) = act(g_i.x) (u_i.x) v_i               (tables w_gate, w_in, w_out)
    f(x) = b_out + sum_heads sum_{i in TopK_head} s(q_head(x).k_i) e_i(x)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

GATES = ("softmax", "sigmoid", "none")


# ----------------------------------------------------------------------------- 1. product keys


def _half_scores(q: torch.Tensor, sub_keys: torch.Tensor) -> torch.Tensor:
    """(..., h, d_key/2) x (sqrt N, d_key/2) shared, or (h, sqrt N, d_key/2) per head -> (..., h, sqrt N)."""
    if sub_keys.dim() == 2:
        return q @ sub_keys.t()
    return torch.einsum("...hd,hnd->...hn", q, sub_keys)


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, sub_keys1: torch.Tensor, sub_keys2: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of q.K over the N = n^2 product keys K[i1*n + i2] = [sub_keys1[i1]; sub_keys2[i2]].

    q1, q2 are the two halves of the queries (..., h, d_key/2). Since q.K = q1.c_i1 + q2.c'_i2,
    every member of the top-k has i1 among the top-k of the first half and i2 among the top-k of
    the second, so the k^2 candidate sums hold the exact answer: cost O((n + k^2) d_key), not O(N)
    (and only about k ln k of the k^2 sums can win, see `_candidate_pairs`).
    Returns (scores, indices), both (..., h, k), scores in descending order.

    Autograd: the n half-scores per head are only ranked (no grad); the k chosen ones are computed
    again as gathered dots whose backward touches k sub-keys, not n (dense score gradients would
    cost as much as the forward matmul, twice).
    """
    n = sub_keys1.shape[-2]
    if not 1 <= k <= n * n:
        raise ValueError(f"top-k must be in 1..N={n * n}, got {k}")
    kk = min(k, n)  # candidates per half
    with torch.no_grad():
        i1 = _half_scores(q1, sub_keys1).topk(kk, dim=-1).indices
        i2 = _half_scores(q2, sub_keys2).topk(kk, dim=-1).indices
    v1, v2 = _selected_scores(q1, sub_keys1, i1), _selected_scores(q2, sub_keys2, i2)
    a, b = _candidate_pairs(kk, k, q1.device)
    scores, pos = (v1[..., a] + v2[..., b]).topk(k, dim=-1)
    indices = i1.gather(-1, a[pos]) * n + i2.gather(-1, b[pos])
    return scores, indices


@functools.lru_cache(maxsize=64)
def _candidate_pairs(kk: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (a, b) rank pairs of the two halves' sorted top lists that can reach the top-k.

    Pair (a, b) is beaten by the a'<=a, b'<=b pairs, (a+1)(b+1)-1 of them; so only pairs with
    (a+1)(b+1) <= k can be in the top-k: about k ln k candidates instead of k^2 (PKM's trick).
    """
    ar = torch.arange(kk)
    a, b = torch.meshgrid(ar, ar, indexing="ij")
    keep = (a + 1) * (b + 1) <= k
    return a[keep].to(device), b[keep].to(device)


def _selected_scores(q: torch.Tensor, sub_keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """q . sub_keys[idx] for the chosen sub-keys: (..., h, dh), (..., h, kk) -> (..., h, kk)."""
    dh, kk = q.shape[-1], idx.shape[-1]
    if sub_keys.dim() == 3:  # per-head tables: one flat table, head j's rows offset by j*n
        h, n = sub_keys.shape[:2]
        idx = idx + torch.arange(h, device=idx.device).unsqueeze(-1) * n
        sub_keys = sub_keys.reshape(h * n, dh)
    out = _GatheredDot.apply(sub_keys, idx.reshape(-1, kk), q.reshape(-1, dh), 1 << 30)
    return out.view(idx.shape)


# ----------------------------------------------------------------------------- 2. the experts


CPU_BLOCK_FLOATS = 1 << 19  # 2 MiB of gathered rows per block on CPU: stays in cache, no page faults


def _gathered_dot(table: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """out[t, j] = table[idx[t, j]] . x[t], materialising one (block, m, d) gather at a time.

    On CPU a block is a few tokens (CPU_BLOCK_FLOATS): a reused, cache-resident buffer is about 2x
    faster than fresh large gathers (page faults) and than `bmm` (a batched matrix-vector product).
    On GPU a block is `chunk` tokens, the bound on the one (chunk x m x d) tensor.
    """
    n_tok, m = idx.shape
    d = table.shape[1]
    block = chunk if table.is_cuda else max(1, min(chunk, CPU_BLOCK_FLOATS // (m * d)))
    out = table.new_empty(idx.shape)
    buf = table.new_empty(min(block, n_tok) * m, d)
    for s in range(0, n_tok, block):
        i = idx[s : s + block].reshape(-1)
        rows = torch.index_select(table, 0, i, out=buf[: i.numel()]).view(-1, m, d)
        rows.mul_(x[s : s + block].unsqueeze(1).to(rows.dtype))
        torch.sum(rows, dim=-1, out=out[s : s + block])
    return out


def _act_grad(act: nn.Module, pre: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * act'(pre), by autograd on the small (tokens, m) tensor (works for any ACT2FN entry)."""
    with torch.enable_grad():
        p = pre.detach().requires_grad_(True)
        return torch.autograd.grad(act(p), p, grad)[0]


def _rows_grad(idx: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, src: torch.Tensor,
               coef: torch.Tensor) -> torch.Tensor:
    """(N, d) table gradient G[n] = sum over (t, j) with idx[t, j] = n of coef[t, j] src[t].

    The transposed problem of the forward gather-sum: bags are experts, members are tokens. With
    the pairs sorted by expert, `embedding_bag` computes it without a (tokens x m x d) tensor.
    """
    m = idx.shape[1]
    return F.embedding_bag(order // m, src, offsets, per_sample_weights=coef.reshape(-1)[order], mode="sum")


def _sort_by_row(idx: torch.Tensor, n_rows: int, sparse: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The (t, j) pairs sorted by table row, and each row's start in that order (bag offsets).

    sparse=False: one bag per table row (empty for rows nobody retrieved), rows = None.
    sparse=True: one bag per retrieved row only, and `rows` lists those rows (sorted).
    """
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=n_rows)
    rows = None
    if sparse:
        rows = counts.nonzero().squeeze(1)
        counts = counts[rows]
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    return flat.argsort(), offsets, rows


def _table_grad(rows: torch.Tensor | None, values: torch.Tensor, n_rows: int) -> torch.Tensor:
    """A table gradient: dense as computed, or sparse COO over the retrieved rows (as
    nn.Embedding(sparse=True)), so a step never holds a dense N x d gradient."""
    if rows is None:
        return values
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, (n_rows, values.shape[1]), is_coalesced=True,
                                   check_invariants=False)


class _GatheredDot(torch.autograd.Function):
    """out[t, j] = table[idx[t, j]] . x[t], with a backward that only touches the rows gathered."""

    @staticmethod
    def forward(ctx, table, idx, x, chunk):
        ctx.save_for_backward(table, idx, x)
        return _gathered_dot(table, idx, x.contiguous(), chunk)

    @staticmethod
    def backward(ctx, g):
        table, idx, x = ctx.saved_tensors
        g = g.contiguous()
        g_table = g_x = None
        if ctx.needs_input_grad[2]:
            g_x = F.embedding_bag(idx, table, per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[0]:
            order, offsets, _ = _sort_by_row(idx, table.shape[0])
            g_table = _rows_grad(idx, order, offsets, x.contiguous(), g)
        return g_table, None, g_x, None


class _ExpertMix(torch.autograd.Function):
    """out[t] = sum_j w[t, j] a_j(x[t]) w_out[idx[t, j]] with a_j the retrieved neurons' activations.

    Forward: the input side is a gathered dot (one (block, m, d) gather at a time), the output side
    one fused `embedding_bag` with per-sample weights. Saved for backward: x, idx, w and the
    pre-activations, i.e. O(tokens * (d + m)), never O(tokens * m * d). Backward: dot products
    against gout (gathered in blocks again), `embedding_bag` for the input gradient, and the table
    gradients as transposed `embedding_bag`s over the pairs sorted by expert.
    """

    @staticmethod
    def forward(ctx, x, idx, w, w_out, w_in, b_in, w_gate, b_gate, act, chunk, sparse_grad=False):
        pre_in = _gathered_dot(w_in, idx, x, chunk)
        if b_in is not None:
            pre_in += b_in[idx]
        pre_g = None
        if w_gate is not None:
            pre_g = _gathered_dot(w_gate, idx, x, chunk)
            if b_gate is not None:
                pre_g += b_gate[idx]
            a = act(pre_g) * pre_in
        else:
            a = act(pre_in)
        out = F.embedding_bag(idx, w_out, per_sample_weights=(w * a).to(w_out.dtype), mode="sum")
        ctx.save_for_backward(x, idx, w, pre_in, pre_g, w_out, w_in, w_gate)
        ctx.act, ctx.chunk, ctx.has_b_in, ctx.has_b_gate = act, chunk, b_in is not None, b_gate is not None
        ctx.sparse_grad = sparse_grad
        return out

    @staticmethod
    def backward(ctx, gout):
        x, idx, w, pre_in, pre_g, w_out, w_in, w_gate = ctx.saved_tensors
        act, need = ctx.act, ctx.needs_input_grad
        gout = gout.contiguous()
        g_coef = _gathered_dot(w_out, idx, gout, ctx.chunk)  # v_i . gout
        if pre_g is not None:
            s = act(pre_g)
            a = s * pre_in
            g_a = g_coef * w
            g_in = g_a * s
            g_g = _act_grad(act, pre_g, g_a * pre_in)
        else:
            a = act(pre_in)
            g_in = _act_grad(act, pre_in, g_coef * w)
            g_g = None

        grads: list[Any] = [None] * 11
        if need[0]:
            gx = F.embedding_bag(idx, w_in, per_sample_weights=g_in, mode="sum")
            if g_g is not None:
                gx += F.embedding_bag(idx, w_gate, per_sample_weights=g_g, mode="sum")
            grads[0] = gx
        grads[2] = g_coef * a if need[2] else None
        if any(need[3:8]):
            flat = idx.reshape(-1)
            n_experts = w_out.shape[0]
            order, offsets, rows = _sort_by_row(idx, n_experts, ctx.sparse_grad)
            if need[3]:
                grads[3] = _table_grad(rows, _rows_grad(idx, order, offsets, gout, w * a), n_experts)
            if need[4]:
                grads[4] = _table_grad(rows, _rows_grad(idx, order, offsets, x, g_in), n_experts)
            if need[5] and ctx.has_b_in:
                grads[5] = g_in.new_zeros(n_experts).index_add_(0, flat, g_in.reshape(-1))
            if need[6] and g_g is not None:
                grads[6] = _table_grad(rows, _rows_grad(idx, order, offsets, x, g_g), n_experts)
            if need[7] and ctx.has_b_gate:
                grads[7] = g_g.new_zeros(n_experts).index_add_(0, flat, g_g.reshape(-1))
        return tuple(grads)


# ----------------------------------------------------------------------------- 3. the layer


class PeerLayer(nn.Module):
    """A PEER layer: h query heads retrieve top-k experts each from one pool of N single neurons.

    Parameters (state-dict names):
      query.weight (h*d_key, d), query.bias (h*d_key)   the h query networks, as one Linear
      query_bn.*                                        BatchNorm1d(h*d_key) on the query (paper)
      sub_keys (2, sqrt N, d_key/2), or (h, 2, sqrt N, d_key/2) with shared_keys=False
      w_in (N, d), [b_in (N)], [w_gate (N, d), b_gate (N)], w_out (N, d), [b_out (d)]
    Buffer (not saved): neuron_index (N,) - which source neuron an expert holds, -1 for none.

    Gate: "softmax" over each head's k scores (the paper), "sigmoid", or "none" (weight exactly 1;
    the scores still get a straight-through gradient, so query and keys remain trainable).
    Inputs (tokens, d) or (..., d). BatchNorm sees all tokens at once; retrieval and experts then
    run `chunk_size` tokens at a time. sparse_grad=True gives the expert tables (w_in, w_gate,
    w_out) sparse COO gradients over the retrieved rows, as nn.Embedding(sparse=True) does: a
    training step then never holds a dense N x d gradient (optimizers: SGD, SparseAdam).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        heads: int = 8,
        topk: int = 16,
        key_dim: int = 128,
        *,
        gated: bool = False,
        activation: str | None = None,
        gate: str = "softmax",
        query_bn: bool = True,
        shared_keys: bool = True,
        in_bias: bool | None = None,
        out_bias: bool = False,
        chunk_size: int = 512,
        sparse_grad: bool = False,
    ) -> None:
        super().__init__()
        n_sub = math.isqrt(n_experts)
        if n_experts < 1 or n_sub * n_sub != n_experts:
            raise ValueError(f"n_experts must be a perfect square (product keys), got {n_experts}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if key_dim % 2:
            raise ValueError(f"key_dim must be even (two halves), got {key_dim}")
        if not 1 <= topk <= n_experts:
            raise ValueError(f"topk must be in 1..{n_experts}, got {topk}")
        self.d_model, self.n_experts, self.n_sub = d_model, n_experts, n_sub
        self.heads, self.topk, self.key_dim = heads, topk, key_dim
        self.gated, self.gate, self.shared_keys = gated, gate, shared_keys
        self.activation = activation or ("silu" if gated else "gelu_new")
        self.act = ACT2FN[self.activation]
        self.in_bias = (not gated) if in_bias is None else in_bias
        self.out_bias = out_bias
        self.chunk_size = chunk_size
        self.sparse_grad = sparse_grad

        self.query = nn.Linear(d_model, heads * key_dim)
        self.query_bn = nn.BatchNorm1d(heads * key_dim) if query_bn else None
        key_shape = (2, n_sub, key_dim // 2) if shared_keys else (heads, 2, n_sub, key_dim // 2)
        self.sub_keys = nn.Parameter(torch.empty(key_shape))
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model))
        self.b_in = nn.Parameter(torch.zeros(n_experts)) if self.in_bias else None
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model)) if gated else None
        self.b_gate = nn.Parameter(torch.zeros(n_experts)) if gated and self.in_bias else None
        self.w_out = nn.Parameter(torch.empty(n_experts, d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model)) if out_bias else None
        self.register_buffer("neuron_index", torch.full((n_experts,), -1, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def config_dict(self) -> dict[str, Any]:
        """The constructor's arguments: `PeerLayer(**layer.config_dict())` rebuilds the same shapes."""
        return dict(d_model=self.d_model, n_experts=self.n_experts, heads=self.heads, topk=self.topk,
                    key_dim=self.key_dim, gated=self.gated, activation=self.activation, gate=self.gate,
                    query_bn=self.query_bn is not None, shared_keys=self.shared_keys, in_bias=self.in_bias,
                    out_bias=self.out_bias, chunk_size=self.chunk_size,
                    sparse_grad=self.sparse_grad)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper-style fresh layer: PKM keys uniform +-1/sqrt(d_key/2), small random experts."""
        bound = 1 / math.sqrt(self.key_dim // 2)
        self.sub_keys.uniform_(-bound, bound)
        self.query.reset_parameters()
        nn.init.zeros_(self.query.bias)
        std = 1 / math.sqrt(self.d_model)  # unit-variance pre-activations for unit-variance inputs
        for p in (self.w_in, self.w_gate, self.w_out):
            if p is not None:
                p.normal_(0.0, std)
        for p in (self.b_in, self.b_gate, self.b_out):
            if p is not None:
                p.zero_()
        if self.query_bn is not None:
            self.query_bn.reset_parameters()

    def _sub_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared_keys:
            return self.sub_keys[0], self.sub_keys[1]
        return self.sub_keys[:, 0], self.sub_keys[:, 1]

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d) -> (tokens, h, d_key). BatchNorm over all tokens, so chunking cannot change it."""
        q = self.query(x)
        if self.query_bn is not None:
            q = self.query_bn(q)
        return q.view(x.shape[0], self.heads, self.key_dim)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router scores and expert indices for each token and head: both (tokens, h, k)."""
        x = x.reshape(-1, self.d_model)
        q = self.queries(x)
        k1, k2 = self._sub_keys()
        half = self.key_dim // 2
        parts = [product_key_topk(c[..., :half], c[..., half:], k1, k2, self.topk) for c in q.split(self.chunk_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def gate_weights(self, scores: torch.Tensor) -> torch.Tensor:
        if self.gate == "softmax":
            return scores.softmax(dim=-1)
        if self.gate == "sigmoid":
            return torch.sigmoid(scores)
        return torch.ones_like(scores) + (scores - scores.detach())  # exactly 1, straight-through grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model).contiguous()
        scores, idx = self.retrieve(x)
        w = self.gate_weights(scores).flatten(1).to(x.dtype)
        out = _ExpertMix.apply(x, idx.flatten(1), w, self.w_out, self.w_in, self.b_in, self.w_gate,
                               self.b_gate, self.act, self.chunk_size, self.sparse_grad)
        if self.b_out is not None:
            out = out + self.b_out
        return out.view(shape)

    # -- analysis (dense over all N experts: for reports on small batches, not for the forward)

    @torch.no_grad()
    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """|a_i(x)| * ||v_i|| for every token and every expert: (tokens, N)."""
        x = x.reshape(-1, self.d_model)
        pre = x @ self.w_in.t()
        if self.b_in is not None:
            pre += self.b_in
        if self.w_gate is not None:
            g = x @ self.w_gate.t()
            if self.b_gate is not None:
                g += self.b_gate
            a = self.act(g) * pre
        else:
            a = self.act(pre)
        return a.abs() * self.w_out.norm(dim=1)

    @classmethod
    def from_ffn(cls, fc_in: nn.Module, fc_out: nn.Module, gate_proj: nn.Module | None = None,
                 **kwargs: Any) -> "PeerLayer":
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

        return peer_from_dense(rows(fc_in, True), bias(fc_in), None if gate_proj is None else rows(gate_proj, True),
                               rows(fc_out, False), bias(fc_out), b_gate=bias(gate_proj), **kwargs)


# ----------------------------------------------------------------------------- 4. neuron init


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


def _contributions(x: torch.Tensor, u: torch.Tensor, bu: torch.Tensor | None, g: torch.Tensor | None,
                   bg: torch.Tensor | None, v: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """|a_i(x)| ||v_i||: (tokens, neurons), the size of each neuron's term in the FFN's output."""
    pre = x @ u.t() + (0 if bu is None else bu)
    a = act(pre) if g is None else act(x @ g.t() + (0 if bg is None else bg)) * pre
    return a.abs() * v.norm(dim=1)


def _grid_size(n: int, n_sub: int, heads: int, slack: float) -> tuple[int, int]:
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
    layer = PeerLayer(d, n_experts, heads, topk, key_dim, gated=gated, activation=activation, gate=gate,
                      query_bn=query_bn, shared_keys=shared_keys, in_bias=b_in is not None or b_gate is not None,
                      out_bias=out_bias is not None, chunk_size=chunk_size)
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
    n_rows, n_cols = _grid_size(n, n_sub, heads, slack)
    if heads > 1 and (n_rows // heads) * n_cols < topk:  # else a head reaches into another's rows
        raise ValueError(f"neuron init: each head owns {n_rows // heads}x{n_cols} cells, fewer than "
                         f"topk={topk}; use fewer heads or a smaller topk")

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
        contrib = _contributions(xs, u, bu, g, bg, v, ACT2FN[layer.activation])
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
        margin = 1.0 + 2 * sum(qp[:, sl].norm(dim=1).max().item() * y[:, sl].norm(dim=1).max().item()
                               for sl in (slice(0, dc1), slice(dc1, None)))
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
    layer.sub_keys.copy_(torch.stack([keys1, keys2]) if shared_keys
                         else torch.stack([keys1, keys2]).expand(heads, -1, -1, -1))

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


# ----------------------------------------------------------------------------- 5. analysis


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
        contrib = layer.contributions(xc)
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
