"""PEER: a pool of N single-neuron experts found per token by product-key retrieval (arXiv 2407.04153).

Self-contained (torch and `transformers.activations` only): this file is copied next to
`modeling_mom.py` into `trust_remote_code` exports. Read top to bottom:

1. `product_key_topk`   the top-k of N = sqrt(N)^2 product keys in O((sqrt(N) + k^2) d_key)
2. `_ExpertMix`         the experts: gathered dots in, fused weighted gather-sum out, in blocks,
   `_GatheredDot`       with hand-written backwards that keep memory O(tokens (d + h k));
   `_dense_mix`         or, when the retrieved experts are a large share of N, all of them densely
3. `PeerLayer`          query network (+ BatchNorm), h heads over one pool, gate, experts

Only the runtime lives here. Turning a dense FFN into a PEER layer (neuron init, k-means, grid
cells) and the analysis helpers (oracle mass, expert usage) are in `mom_cli/surgery/peer_init.py`:
they are not shipped with exported checkpoints.

Symbols follow the paper: N experts, h heads, top-k per head, d_key the query/key width (two
halves of d_key/2), d the model width. An expert is one neuron of a dense FFN:
    GPT-2 style   e_i(x) = act(u_i.x + b_i) v_i                 (tables w_in, b_in, w_out)
    SwiGLU        e_i(x) = act(g_i.x) (u_i.x) v_i               (tables w_gate, w_in, w_out)
    f(x) = b_out + sum_heads sum_{i in TopK_head} s(q_head(x).k_i) e_i(x)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

GATES = ("softmax", "sigmoid", "none")


# ----------------------------------------------------------------------------- 1. product keys


def half_scores(q: torch.Tensor, sub_keys: torch.Tensor) -> torch.Tensor:
    """(..., h, d_key/2) x (sqrt N, d_key/2) shared, or (h, sqrt N, d_key/2) per head -> (..., h, sqrt N)."""
    if sub_keys.dim() == 2:
        return q @ sub_keys.t()
    return torch.einsum("...hd,hnd->...hn", q, sub_keys)


def product_key_topk(
    q1: torch.Tensor,
    q2: torch.Tensor,
    sub_keys1: torch.Tensor,
    sub_keys2: torch.Tensor,
    k: int,
    sorted: bool = True,  # noqa: A002 (torch.topk's name)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of q.K over the N = n^2 product keys K[i1*n + i2] = [sub_keys1[i1]; sub_keys2[i2]].

    q1, q2 are the two halves of the queries (..., h, d_key/2). Since q.K = q1.c_i1 + q2.c'_i2,
    every member of the top-k has i1 among the top-k of the first half and i2 among the top-k of
    the second, so the k^2 candidate sums hold the exact answer: cost O((n + k^2) d_key), not O(N)
    (and only about k ln k of the k^2 sums can win, see `_candidate_pairs`).
    Returns (scores, indices), both (..., h, k), scores in descending order; with sorted=False in
    no particular order, which is what a layer needs (a set of experts) at half the ranking's cost
    on a CPU (SmolLM2's 331 candidates for k = 96: 11 ms instead of 20 per 4,096 token-heads).

    Autograd: the candidates are only ranked (no grad); the k winners' scores are gathered again
    from the halves' (the same sums, so the same values in the same order), and gather's backward
    adds into k entries where indexing all candidates' backward would sort them.
    """
    n = sub_keys1.shape[-2]
    if not 1 <= k <= n * n:
        raise ValueError(f"top-k must be in 1..N={n * n}, got {k}")
    kk = min(k, n)  # candidates per half
    v1, i1 = _half_topk(q1, sub_keys1, kk)
    v2, i2 = _half_topk(q2, sub_keys2, kk)
    a, b = _candidate_pairs(kk, k, q1.device)
    with torch.no_grad():
        pos = _candidate_sums(v1, v2, kk, k).topk(k, dim=-1, sorted=sorted).indices
    ia, ib = a.take(pos), b.take(pos)
    scores = v1.gather(-1, ia) + v2.gather(-1, ib)
    indices = i1.gather(-1, ia) * n + i2.gather(-1, ib)
    return scores, indices


DENSE_HALF = 8  # a half's kk >= n / DENSE_HALF: its n scores are computed densely, with their gradient


def _half_topk(q: torch.Tensor, sub_keys: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kk best sub-keys of one half for each head, scores (with grad) and indices: (..., h, kk).

    Few of many (PKM's n = 1024, kk = 32): only ranked without grad, the chosen kk scored again as
    gathered dots, whose backward touches kk sub-keys (dense score gradients would cost as much as
    the forward matmul, twice). Most of few (SmolLM2's layers: n = 40, kk = 40): the (tokens, h, n)
    scores are one small matmul whose gradient is two more, where gathering rows and sorting them
    for the backward cost 3x as much.
    """
    n = sub_keys.shape[-2]
    if kk * DENSE_HALF >= n:
        s = half_scores(q, sub_keys)
        i = s.detach().topk(kk, dim=-1).indices
        return s.gather(-1, i), i
    with torch.no_grad():
        i = half_scores(q, sub_keys).topk(kk, dim=-1).indices
    return _selected_scores(q, sub_keys, i), i


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


@functools.lru_cache(maxsize=64)
def _candidate_selector(kk: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """(2 kk, candidates) 0/1 matrix: [v1, v2] @ it = v1[a] + v2[b] for every candidate pair (a, b)."""
    a, b = _candidate_pairs(kk, k, torch.device("cpu"))
    sel = torch.zeros(2 * kk, a.numel(), dtype=dtype)
    cols = torch.arange(a.numel())
    sel[a, cols] = 1
    sel[kk + b, cols] = 1
    return sel


SELECTOR_MAX_KK = 64  # above this, the selector's 2 kk multiply-adds per candidate outweigh indexing


@torch.no_grad()
def _candidate_sums(v1: torch.Tensor, v2: torch.Tensor, kk: int, k: int) -> torch.Tensor:
    """v1[..., a] + v2[..., b] over the candidate pairs: (..., h, candidates).

    On a CPU, with short top lists, one matmul with a 0/1 selector: each output adds exactly two
    nonzero products (x * 1 is exact, adding zeros is exact), so finite sums are bitwise those of
    indexing, which is 7x slower there (SmolLM2's kk = 40). Elsewhere indexing is one kernel, and a
    GPU's float32 matmuls may run in TF32; so may a CPU's when the matmul precision was lowered.
    """
    cpu = v1.device.type == "cpu" and kk <= SELECTOR_MAX_KK
    if not cpu or (v1.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"):
        a, b = _candidate_pairs(kk, k, v1.device)
        return v1[..., a] + v2[..., b]
    sel = _candidate_selector(kk, k, v1.dtype)
    with torch.autocast("cpu", enabled=False):
        return (torch.cat([v1, v2], -1) @ sel).view(*v1.shape[:-1], sel.shape[1])


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


DENSE_SHARE = 1 / 8  # h*k >= DENSE_SHARE * N: the experts run densely (see _dense_mix)
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


def _rows_grad(
    idx: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, src: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """(N, d) table gradient G[n] = sum over (t, j) with idx[t, j] = n of coef[t, j] src[t].

    The transposed problem of the forward gather-sum: bags are experts, members are tokens. With
    the pairs sorted by expert, `embedding_bag` computes it without a (tokens x m x d) tensor.
    """
    m = idx.shape[1]
    return F.embedding_bag(order // m, src, offsets, per_sample_weights=coef.reshape(-1)[order], mode="sum")


def _sort_by_row(
    idx: torch.Tensor, n_rows: int, sparse: bool = False
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
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, (n_rows, values.shape[1]), is_coalesced=True, check_invariants=False
    )


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

        # inputs of forward: x, idx, w, w_out, w_in, b_in, w_gate, b_gate, act, chunk, sparse_grad
        need_x, _, need_w, need_out, need_in, need_b_in, need_gate, need_b_gate = need[:8]
        g_x = g_w = g_w_out = g_w_in = g_b_in = g_w_gate = g_b_gate = None
        if need_x:
            g_x = F.embedding_bag(idx, w_in, per_sample_weights=g_in, mode="sum")
            if g_g is not None:
                g_x += F.embedding_bag(idx, w_gate, per_sample_weights=g_g, mode="sum")
        if need_w:
            g_w = g_coef * a
        if need_out or need_in or need_b_in or need_gate or need_b_gate:
            flat = idx.reshape(-1)
            n_experts = w_out.shape[0]
            order, offsets, rows = _sort_by_row(idx, n_experts, ctx.sparse_grad)
            if need_out:
                g_w_out = _table_grad(rows, _rows_grad(idx, order, offsets, gout, w * a), n_experts)
            if need_in:
                g_w_in = _table_grad(rows, _rows_grad(idx, order, offsets, x, g_in), n_experts)
            if need_b_in and ctx.has_b_in:
                g_b_in = g_in.new_zeros(n_experts).index_add_(0, flat, g_in.reshape(-1))
            if need_gate and g_g is not None:
                g_w_gate = _table_grad(rows, _rows_grad(idx, order, offsets, x, g_g), n_experts)
            if need_b_gate and ctx.has_b_gate:
                g_b_gate = g_g.new_zeros(n_experts).index_add_(0, flat, g_g.reshape(-1))
        return g_x, None, g_w, g_w_out, g_w_in, g_b_in, g_w_gate, g_b_gate, None, None, None


def expert_activations(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    act: nn.Module,
) -> torch.Tensor:
    """a_i(x) for every row i of the tables: (tokens, rows). GPT-2 style act(u_i.x + b_i);
    SwiGLU act(g_i.x + c_i) (u_i.x + b_i)."""
    pre = F.linear(x, w_in, b_in)
    return act(F.linear(x, w_gate, b_gate)) * pre if w_gate is not None else act(pre)


def expert_weights(idx: torch.Tensor, w: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each token's total gate weight on each expert, 0 where it retrieved none: (tokens, N) from
    (tokens, h*k) indices and weights (heads that retrieve the same expert add up)."""
    return w.new_zeros(idx.shape[0], n_experts).scatter_add(1, idx, w)


def _dense_mix(layer: PeerLayer, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """_ExpertMix's function and gradients, with every expert's activation computed by one matmul
    and the experts a token did not retrieve weighted by zero (heads that retrieve the same expert
    add up, as in the gathered sum).

    Why: a layer converted from a dense FFN retrieves h*k = 25-50% of its N experts. Gathering each
    token's h*k rows of the tables then streams far more memory than a matmul over all N: measured
    on SmolLM2's shapes (d = 576, N = 1600, h*k = 768, 1,024 tokens, one CPU thread), forward and
    backward took 1.0 s gathered and 0.23 s as dense matmuls, plus 0.22 s of retrieval either way.
    Memory: a few (tokens, N) tensors, at most 1/DENSE_SHARE times the gathered path's (tokens, h*k).
    """
    a = layer.activations(x)
    return (a * expert_weights(idx, w.to(a.dtype), layer.n_experts)) @ layer.w_out


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
        return dict(
            d_model=self.d_model,
            n_experts=self.n_experts,
            heads=self.heads,
            topk=self.topk,
            key_dim=self.key_dim,
            gated=self.gated,
            activation=self.activation,
            gate=self.gate,
            query_bn=self.query_bn is not None,
            shared_keys=self.shared_keys,
            in_bias=self.in_bias,
            out_bias=self.out_bias,
            chunk_size=self.chunk_size,
            sparse_grad=self.sparse_grad,
        )

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
        """Router scores and expert indices for each token and head: both (tokens, h, k), each
        head's k in no particular order."""
        x = x.reshape(-1, self.d_model)
        q = self.queries(x)
        k1, k2 = self._sub_keys()
        half = self.key_dim // 2
        parts = [
            product_key_topk(c[..., :half], c[..., half:], k1, k2, self.topk, sorted=False)
            for c in q.split(self.chunk_size)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def gate_weights(self, scores: torch.Tensor) -> torch.Tensor:
        if self.gate == "softmax":
            return scores.softmax(dim=-1)
        if self.gate == "sigmoid":
            return torch.sigmoid(scores)
        return torch.ones_like(scores) + (scores - scores.detach())  # exactly 1, straight-through grad

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """a_i(x) of every expert, retrieved or not: (tokens, N)."""
        x = x.reshape(-1, self.d_model)
        return expert_activations(x, self.w_in, self.b_in, self.w_gate, self.b_gate, self.act)

    def runs_densely(self) -> bool:
        """Whether the experts run as dense matmuls over all N (see _dense_mix): when the h*k
        retrieved are at least DENSE_SHARE of them, and table gradients are dense."""
        return not self.sparse_grad and self.heads * self.topk >= DENSE_SHARE * self.n_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # The gathers and embedding_bags (per-sample weights) need one dtype throughout, which
            # autocast would break: retrieval and the gathered mix run in the parameters' dtype, the
            # output in x's. The dense mix is plain matmuls, which autocast takes as everywhere else.
            mix = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                return self._forward(x.to(self.w_out.dtype), mix).to(x.dtype)
        return self._forward(x)

    def _forward(self, x: torch.Tensor, mix_dtype: torch.dtype | None = None) -> torch.Tensor:
        """`mix_dtype`: autocast's dtype for the dense mix (forward() turned autocast off around
        the rest)."""
        shape = x.shape
        x = x.reshape(-1, self.d_model).contiguous()
        scores, idx = self.retrieve(x)
        w = self.gate_weights(scores).flatten(1).to(x.dtype)
        if self.runs_densely():
            if mix_dtype is None:
                out = _dense_mix(self, x, idx.flatten(1), w)
            else:
                with torch.autocast(x.device.type, dtype=mix_dtype):
                    out = _dense_mix(self, x, idx.flatten(1), w).to(x.dtype)
            return (out if self.b_out is None else out + self.b_out).view(shape)
        out = _ExpertMix.apply(
            x,
            idx.flatten(1),
            w,
            self.w_out,
            self.w_in,
            self.b_in,
            self.w_gate,
            self.b_gate,
            self.act,
            self.chunk_size,
            self.sparse_grad,
        )
        if self.b_out is not None:
            out = out + self.b_out
        return out.view(shape)
