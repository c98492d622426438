"""The Mixture-of-Modules runtime (arXiv 2407.06677), as a `transformers` model.

Read top to bottom: norms, the kinds of module (MHA, dense FFN, sparse MoE FFN, PEER FFN), the
router, routing and dispatch, attention, the routed block, the plain layer, the model. Families'
quirks (q/k norms, post-norms, sliding windows, soft-capping, scales) are config fields, each off
by default; a module carries those of its origin layer. This file, `configuration_mom.py`
and `peer.py` (the PEER layer, imported relatively) are copied verbatim into `trust_remote_code`
exports, so they import nothing else from `mom_cli`.

Symbols follow the paper: M modules per pool (+ SKIP, index M), H steps per block, top-K routing,
temperature T. Per step, for every token:
    MHA router -> top-K modules -> x += sum_k w_k W^O_k(attn(sum_k Q_k, sum_k K_k, sum_k V_k))
    FFN router -> top-K modules -> x += sum_k w_k FFN_k(x)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_mom import MomConfig
from .peer import PeerLayer


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """RMSNorm with statistics in float32. The scale (`style`): Llama's w in the input dtype;
    OLMo 2's w in float32 ("float32"); Gemma's 1 + w in float32, w stored as w - 1 ("unit_offset")."""

    def __init__(self, dim: int, eps: float, style: str = "llama") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if style == "unit_offset" else torch.ones(dim))
        self.eps = eps
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.style == "unit_offset":
            return (x * (1.0 + self.weight.float())).to(dtype)
        if self.style == "float32":
            return (self.weight * x).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(config: MomConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps, config.rmsnorm)


def maybe_norm(config: MomConfig, on: bool) -> nn.Module:
    """A module's pre- or post-norm where the family has one, else the identity (no weights)."""
    return make_norm(config) if on else nn.Identity()


def source_class(config: MomConfig, name: str) -> Callable[..., nn.Module]:
    """A class of the source family's own `transformers` modeling file (rotary embedding, MoE block)."""
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(config.source_model_type)
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


def source_config(config: MomConfig) -> Any:
    """The source's `transformers` config, for the source classes reused here."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.source_config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(config.source_model_type, **cfg)
    cfg._experts_implementation = "eager"  # an MoE block outside its model: transformers' own loop
    return cfg


# ----------------------------------------------------------------------------- modules


class MhaModule(nn.Module):
    """One attention module: its own pre-norm, Q/K/V projections (and q/k norms), output
    projection W^O (and post-norm). Its origin layer fixes its attention `kind`: sliding window,
    RoPE table and score scale, which travel with the module wherever a router sends it."""

    def __init__(self, config: MomConfig, origin: int | None = None) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.norm = maybe_norm(config, config.pre_norm)
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=config.o_bias)
        self.head_dim = hd
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            per_head = self.qk_norm == "head"
            self.q_norm = make_norm(config, hd if per_head else config.num_attention_heads * hd)
            self.k_norm = make_norm(config, hd if per_head else config.num_key_value_heads * hd)
        self.post_norm = maybe_norm(config, config.post_norm)
        self.multiplier = config.residual_multiplier
        self.kind = config.attention_kind(origin)

    def _norm_qk(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.qk_norm == "head":
            return norm(x.view(*x.shape[:-1], -1, self.head_dim)).flatten(-2)
        return norm(x)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if self.qk_norm:
            q, k = self._norm_qk(self.q_norm, q), self._norm_qk(self.k_norm, k)
        return q, k, v

    def out(self, a: torch.Tensor) -> torch.Tensor:
        """W^O, then the family's post-norm and residual multiplier."""
        y = self.post_norm(self.o_proj(a))
        return y if self.multiplier == 1.0 else y * self.multiplier


class FfnModule(nn.Module):
    """One FFN module: its own pre-norm, then SwiGLU (Llama family) or act(W_in x) (GPT-2),
    then the family's post-norm and residual multiplier."""

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.norm = maybe_norm(config, config.pre_norm)
        self.gated = config.gated_mlp
        self.act = ACT2FN[config.hidden_act]
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=config.mlp_bias)
            self.up_proj = nn.Linear(d, f, bias=config.mlp_bias)
            self.down_proj = nn.Linear(f, d, bias=config.mlp_bias)
        else:
            self.fc_in = nn.Linear(d, f, bias=config.mlp_bias)
            self.fc_out = nn.Linear(f, d, bias=config.mlp_bias)
        self.post_norm = maybe_norm(config, config.post_norm)
        self.multiplier = config.residual_multiplier

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))
        return self.fc_out(self.act(self.fc_in(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.post_norm(self.mlp(self.norm(x)))
        return y if self.multiplier == 1.0 else y * self.multiplier


class MoeFfnModule(FfnModule):
    """An FFN module that is a whole sparse MoE block (Mixtral, Qwen3-MoE): the source family's
    own `transformers` block (its top-k expert router and experts), between this module's norms.
    The MoM router picks the block; the block's router picks its experts."""

    def __init__(self, config: MomConfig) -> None:
        nn.Module.__init__(self)
        self.norm = maybe_norm(config, config.pre_norm)
        self.moe = source_class(config, config.moe_block)(source_config(config))
        self.post_norm = maybe_norm(config, config.post_norm)
        self.multiplier = config.residual_multiplier

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.moe(h[None])[0]  # the block takes (batch, seq, d); tokens here are (N, d)


class PeerFfnModule(nn.Module):
    """An FFN module whose feed-forward is a PEER layer (arXiv 2407.04153): the same pre-norm as
    the dense module, then N single-neuron experts found per token by product-key retrieval.

    Made by `mom convert-peer` from `config.peer["block.slot"]` (the PeerLayer's arguments). PEER
    works per token, so it needs no cache; its query BatchNorm uses running statistics in eval mode.
    """

    def __init__(self, config: MomConfig, peer_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.norm = make_norm(config)
        self.peer = PeerLayer(**peer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        bn = self.peer.query_bn
        if bn is None or not bn.training or h.shape[0] > 1:
            return self.peer(h)
        # In training, a router may send this module a single token, whose batch variance is
        # undefined (BatchNorm raises): that token uses the running statistics instead.
        bn.eval()
        try:
            return self.peer(h)
        finally:
            bn.train()


def make_ffn(config: MomConfig, block: int, slot: int) -> nn.Module:
    """FFN slot `slot` of block `block`: a PEER module when config.peer names "block.slot", else dense."""
    peer_kwargs = config.peer.get(f"{block}.{slot}")
    if peer_kwargs is not None:
        return PeerFfnModule(config, peer_kwargs)
    return MoeFfnModule(config) if config.moe_block else FfnModule(config)


# ----------------------------------------------------------------------------- router


class Router(nn.Module):
    """Scores the M modules of a pool (+ SKIP) for each token at each step of a block.

    `gru`: a GRU cell whose state runs across the H steps of a block, then a linear head (the
    paper's default). `mlp`: d -> hidden -> choices, stateless. Both add a per-step bias: decompose
    sets it so that step h picks module h, and zero-initialises the head, which makes the router's
    choice exactly the identity until it is trained.
    """

    def __init__(self, config: MomConfig, n_choices: int, steps: int) -> None:
        super().__init__()
        d, r = config.hidden_size, config.router_hidden
        self.kind = config.router
        if self.kind == "gru":
            self.cell = nn.GRUCell(d, r)
            self.head = nn.Linear(r, n_choices, bias=False)
        else:
            self.hidden = nn.Linear(d, r)
            self.head = nn.Linear(r, n_choices, bias=False)
        self.step_bias = nn.Parameter(torch.zeros(steps, n_choices))
        self._constant_cache: tuple[int, int, bool] | None = None

    def is_constant(self) -> bool:
        """True when the head is exactly zero, so the logits are the step bias whatever the input.

        Then inference skips the GRU/MLP entirely (it cannot change the choice). Checked once per
        in-place update of the head (tensor version counter), so it costs one sync per change.
        """
        w = self.head.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return False
        key = (w.data_ptr(), w._version)
        if self._constant_cache is None or self._constant_cache[:2] != key:
            self._constant_cache = (*key, bool(torch.count_nonzero(w).item() == 0))
        return self._constant_cache[2]

    @staticmethod
    def constant_picks(head: torch.Tensor, step_bias: torch.Tensor, k: int) -> list[list[int]] | None:
        """The k slots each step picks for every token when the head is exactly zero (the logits are
        then the step bias), read from stored tensors; None for a router that looks at its input."""
        if torch.count_nonzero(head):
            return None
        return step_bias.float().topk(min(k, step_bias.shape[-1]), dim=-1).indices.tolist()

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.step_bias[step].to(x.dtype)
        if self.is_constant():
            return bias.expand(x.shape[0], -1), state
        # The residual stream can carry outliers of magnitude 1e3; normalise so the GRU does not saturate.
        u = F.rms_norm(x, (x.shape[-1],))
        if self.kind == "gru":
            if state is None:
                state = x.new_zeros(x.shape[0], self.cell.hidden_size)
            state = self.cell(u, state)
            return self.head(state) + bias, state
        return self.head(F.gelu(self.hidden(u))) + bias, state


@dataclass
class Routing:
    """Top-K choice for N tokens: module ids (N, K) with weights (N, K), and where each module's tokens are."""

    idx: torch.Tensor
    weight: torch.Tensor
    n_modules: int
    skip_id: int
    # Per module m: (token positions, their weights); empty modules are absent.
    groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Tokens that chose nothing but SKIP (None when there are none).
    all_skip: torch.Tensor | None = None


def route(logits: torch.Tensor, k: int, temperature: float, skip_id: int, remap: torch.Tensor | None = None) -> Routing:
    """Top-K of the scores; weights are the softmax over the chosen scores (= renormalised softmax).

    Choices are slots 0..M-1 and SKIP (= M). `remap` sends the slots of removed modules to SKIP,
    so a pruned module's tokens skip, with the router itself unchanged.
    """
    top, idx = logits.topk(k, dim=-1)
    weight = torch.softmax(top.float() / temperature, dim=-1).to(logits.dtype)
    if remap is not None:
        idx = remap[idx]
    n = skip_id + 1
    r = Routing(idx=idx, weight=weight, n_modules=n, skip_id=skip_id)
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=n).tolist()  # one host sync per routing decision
    if counts[skip_id] > 0:
        r.all_skip = (idx == skip_id).all(-1)
        if not bool(r.all_skip.any()):
            r.all_skip = None
    n_tok = idx.shape[0]
    if k == 1 and max(counts) == n_tok:
        # Everyone chose the same module (identity routing): no gather, no scatter.
        m = counts.index(n_tok)
        r.groups[m] = (None, weight.reshape(-1))
        return r
    order = torch.argsort(flat, stable=True)
    tokens, w = order // k, weight.reshape(-1)[order]
    start = 0
    for m, c in enumerate(counts):
        if c:
            r.groups[m] = (tokens[start : start + c], w[start : start + c])
        start += c
    return r


def aux_load_balancing(logits: torch.Tensor, r: Routing, temperature: float) -> torch.Tensor:
    """Switch-style load balancing over the M+1 choices: n * sum_i f_i * P_i."""
    n = logits.shape[-1]
    probs = torch.softmax(logits.float() / temperature, dim=-1).mean(0)
    frac = torch.bincount(r.idx.reshape(-1), minlength=r.n_modules).float()[:n] / r.idx.numel()
    return n * (frac * probs).sum()


class RoutingRecorder:
    """Counts how often, and with how much weight, each module is chosen at each step.

    `stats[(block, kind, step)]` -> (tokens per choice, weight mass per choice), SKIP last.
    Attach with `model.model.recorder = RoutingRecorder()`; `prune` and the plots read it.
    A recorder sees each step's input and output too (`x_in`, `x_out`), for probes that need them.
    """

    def __init__(self) -> None:
        self.stats: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, block: int, kind: str, step: int, r: Routing, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        flat = r.idx.reshape(-1)
        count = torch.bincount(flat, minlength=r.n_modules).double().cpu()
        mass = torch.zeros(r.n_modules, dtype=torch.float64, device=flat.device)
        mass.index_add_(0, flat, r.weight.reshape(-1).double())
        key = (block, kind, step)
        if key in self.stats:
            c0, m0 = self.stats[key]
            count, mass = c0 + count, m0 + mass.cpu()
        self.stats[key] = (count, mass.cpu())


def scatter_modules(
    x: torch.Tensor, r: Routing, fn, out_dims: tuple[int, ...], weighted: bool
) -> tuple[torch.Tensor, ...]:
    """For each output: sum over the chosen modules m of (w *) fn(m, x[tokens of m]).

    Each module runs on its own tokens only (grouped gather / scatter-add), never on every token.
    `fn` returns one tensor per entry of `out_dims`.
    """
    outs: list[torch.Tensor] | None = None
    for m, (tok, w) in r.groups.items():
        if m == r.skip_id:
            continue
        ys = fn(m, x if tok is None else x.index_select(0, tok))
        ys = ys if isinstance(ys, tuple) else (ys,)
        if weighted:
            ys = tuple(y * w[:, None] for y in ys)
        if tok is None:  # every token, in order (identity routing): no scatter
            outs = list(ys) if outs is None else [o + y for o, y in zip(outs, ys)]
            continue
        if outs is None:
            outs = [x.new_zeros(x.shape[0], dim) for dim in out_dims]
        outs = [o.index_add(0, tok, y) for o, y in zip(outs, ys)]
    if outs is None:  # every token skipped
        outs = [x.new_zeros(x.shape[0], dim) for dim in out_dims]
    return tuple(outs)


# ----------------------------------------------------------------------------- attention


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] channels of each head (all of them unless partial: GPT-NeoX, Phi)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# An attention kind: (sliding window or None, RoPE table or None, score scale); see MomConfig.attention_kind.
Kind = tuple[int | None, str | None, float]


@dataclass
class MixedKinds:
    """A step whose tokens chose MHA modules of different kinds: token i uses kinds[which[i]]."""

    kinds: list[Kind]
    which: torch.Tensor  # (B*T,) index into kinds


class Attention(nn.Module):
    """Causal attention over per-token Q, K, V, with RoPE, GQA, sliding windows, soft-capping
    and the KV cache.

    Keys of tokens that chose only SKIP are masked out for everyone (the paper's code lets them
    take attention mass). Their validity travels in the cache as one extra value channel, so
    beam reordering, cropping and batch selection in `generate()` keep it in step for free.
    """

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.softcap = config.attn_softcap
        self.default_kind = config.attention_kind(None)

    def _position(self, q, k, ctx: StepContext, kind: Kind | MixedKinds):
        """RoPE by each token's kind; returns q, k, the window (int, or (B, T) per query) and the scale."""
        if not isinstance(kind, MixedKinds):
            window, rope, scale = kind
            if rope is not None:
                cos, sin = (c.unsqueeze(1) for c in ctx.rope[rope])
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return q, k, window, scale
        b, t = ctx.batch, ctx.seq
        which = kind.which.view(b, 1, t, 1)
        q0, k0 = q, k
        windows = torch.full((b, t), 1 << 30, dtype=torch.long, device=q.device)
        scales = q.new_ones(b, 1, t, 1)
        for j, (window, rope, scale) in enumerate(kind.kinds):
            mine = which == j
            if rope is not None:
                cos, sin = (c.unsqueeze(1) for c in ctx.rope[rope])
                q, k = torch.where(mine, apply_rope(q0, cos, sin), q), torch.where(mine, apply_rope(k0, cos, sin), k)
            if window is not None:
                windows = torch.where(mine.view(b, t), window, windows)
            scales = torch.where(mine, scale, scales)
        return q * scales, k, windows, 1.0  # per-query scales folded into q

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: StepContext,
        layer_idx: int,
        key_valid: torch.Tensor | None,
        track_valid: bool,
        kind: Kind | MixedKinds | None = None,
    ) -> torch.Tensor:
        b, t = ctx.batch, ctx.seq
        q = q.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k, window, scale = self._position(q, k, ctx, self.default_kind if kind is None else kind)
        valid = None if key_valid is None else key_valid.view(b, t)
        if ctx.cache is not None:
            if track_valid:
                flag = (valid if valid is not None else q.new_ones(b, t, dtype=torch.bool)).to(v.dtype)
                v = torch.cat([v, flag[:, None, :, None].expand(b, self.n_kv, t, 1)], dim=-1)
            k, v = ctx.cache.update(k, v, layer_idx)
            if track_valid:
                valid = v[:, 0, :, -1] > 0.5
                v = v[..., :-1]
                if bool(valid.all()):
                    valid = None
        if self.softcap is not None:
            out = self._softcapped(q, k, v, ctx.mask(valid, k.shape[-2], window, always=True), scale)
        else:
            mask = ctx.mask(valid, k.shape[-2], window)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, scale=scale,
                enable_gqa=self.n_kv != self.n_heads,
            )
        return out.transpose(1, 2).reshape(b * t, self.n_heads * self.head_dim)

    def _softcapped(self, q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """Gemma 2's attention: scores capped by cap * tanh(scores / cap) before the softmax
        (no fused kernel takes a cap), softmax in float32 as `transformers`' eager path."""
        groups = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def skip_all(self, x: torch.Tensor, ctx: StepContext, layer_idx: int, track_valid: bool) -> None:
        """A step where every token skips attention still fills its cache layer (with keys nobody
        may attend to), so every layer's cache keeps the same length."""
        if ctx.cache is None:
            return
        b, t = ctx.batch, ctx.seq
        k = x.new_zeros(b, self.n_kv, t, self.head_dim)
        v = x.new_zeros(b, self.n_kv, t, self.head_dim + track_valid)  # validity channel 0: masked
        ctx.cache.update(k, v, layer_idx)


@dataclass
class StepContext:
    """What every attention call of one forward pass shares."""

    batch: int
    seq: int
    past: int
    cache: Cache | None
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # RoPE table -> (cos, sin), each (B, T, rot)
    pad_mask: torch.Tensor | None  # (B, past+T) bool, True = real token
    device: torch.device

    def mask(
        self, key_valid: torch.Tensor | None, n_keys: int, window: int | torch.Tensor | None = None,
        always: bool = False,
    ) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, n_keys) mask, or None when plain causal attention is exact.

        `window`: a query sees the `window` latest keys, itself included (`transformers`' sliding
        window); an int for every query, or (B, T) per query.
        """
        keys = self.pad_mask
        if key_valid is not None:
            keys = key_valid if keys is None else keys & key_valid
        if isinstance(window, int) and window >= n_keys:
            window = None  # every key is inside the window
        if keys is None and window is None and not always and (self.past == 0 or self.seq == 1):
            return None
        rows = torch.arange(self.seq, device=self.device)[:, None] + (n_keys - self.seq)
        cols = torch.arange(n_keys, device=self.device)[None, :]
        allowed = (cols <= rows)[None, None]
        if window is not None:
            w = window if isinstance(window, int) else window[:, None, :, None]
            allowed = allowed & (cols > rows - w)
        if keys is not None:
            # Always let a query see itself, so rows of padding or all-SKIP tokens stay finite;
            # their outputs are discarded.
            allowed = allowed & keys[:, None, None, :] | (cols == rows)[None, None]
        return allowed


# ----------------------------------------------------------------------------- layers


class PlainLayer(nn.Module):
    """A source layer kept as it is: x += MHA(x); x += FFN(x) (GPT-NeoX: x += MHA(x) + FFN(x))."""

    def __init__(self, config: MomConfig, origin: int | None = None) -> None:
        super().__init__()
        self.mha = MhaModule(config, origin)
        self.ffn = MoeFfnModule(config) if config.moe_block else FfnModule(config)
        self.attn = Attention(config)
        self.parallel = config.parallel_residual

    def forward(self, x: torch.Tensor, ctx: StepContext, layer_idx: int) -> torch.Tensor:
        q, k, v = self.mha.qkv(x)
        y = x + self.mha.out(self.attn(q, k, v, ctx, layer_idx, None, track_valid=False, kind=self.mha.kind))
        return y + self.ffn(x if self.parallel else y)


def make_pool(origins: list[int | None], make: Callable[[int], nn.Module]) -> nn.ModuleDict:
    """A pool keyed by slot: slot m holds make(m) unless its module was pruned (origin None)."""
    return nn.ModuleDict({str(m): make(m) for m, origin in enumerate(origins) if origin is not None})


class MomBlock(nn.Module):
    """An MHA pool, an FFN pool, SKIP, two routers, and H steps over them.

    The routers score M slots per pool (+ SKIP). A slot whose module was pruned, or is switched
    off for a measurement (`removed`), routes its tokens to SKIP.
    """

    def __init__(self, config: MomConfig, spec: dict[str, Any], block_id: int = 0) -> None:
        super().__init__()
        self.steps = int(spec["steps"])
        self.k = config.router_top_k
        self.temperature = config.router_temperature
        self.skip = config.skip
        self.slots = {"mha": len(spec["mha"]), "ffn": len(spec["ffn"])}
        self.mha = make_pool(spec["mha"], lambda m: MhaModule(config, spec["mha"][m]))
        self.ffn = make_pool(spec["ffn"], lambda m: make_ffn(config, block_id, m))
        self.mha_router = Router(config, self.slots["mha"] + self.skip, self.steps)
        self.ffn_router = Router(config, self.slots["ffn"] + self.skip, self.steps)
        self.attn = Attention(config)
        self.d = config.hidden_size
        self.attn_dim = config.num_attention_heads * config.head_dim
        self.kv_dim = config.num_key_value_heads * config.head_dim
        self.parallel = config.parallel_residual
        self.removed: dict[str, set[int]] = {}
        self.set_removed(set(), set())

    def set_removed(self, mha: set[int], ffn: set[int]) -> None:
        """Switch slots off (on top of those pruned from the checkpoint): their tokens SKIP."""
        self._remaps: dict[tuple[str, torch.device], torch.Tensor] = {}  # made on first use, per device
        for kind, extra, pool in (("mha", mha, self.mha), ("ffn", ffn, self.ffn)):
            self.removed[kind] = {m for m in range(self.slots[kind]) if str(m) not in pool} | set(extra)

    def _remap(self, kind: str, device: torch.device) -> torch.Tensor | None:
        """Slot -> slot, or SKIP (= M) for removed slots; None when nothing is removed."""
        if not self.removed[kind]:
            return None
        key = (kind, device)
        if key not in self._remaps:
            n = self.slots[kind]
            table = [n if m in self.removed[kind] else m for m in range(n)] + [n]
            self._remaps[key] = torch.tensor(table, device=device)
        return self._remaps[key]

    def _route(self, kind: str, x: torch.Tensor, state, step: int, aux: list) -> tuple:
        router = self.mha_router if kind == "mha" else self.ffn_router
        logits, state = router(x, state, step)
        remap = self._remap(kind, x.device)
        r = route(logits, min(self.k, logits.shape[-1]), self.temperature, self.slots[kind], remap)
        if self.training and torch.is_grad_enabled():
            aux.append(aux_load_balancing(logits, r, self.temperature))
        return r, state

    def forward(
        self, x: torch.Tensor, ctx: StepContext, first_layer: int, aux: list, recorder, block_id: int
    ) -> torch.Tensor:
        s_mha = s_ffn = None
        for h in range(self.steps):
            y, s_mha = self.mha_step(x, s_mha, h, ctx, first_layer + h, aux, recorder, block_id)
            x, s_ffn = self.ffn_step(y, s_ffn, h, aux, recorder, block_id, step_input=x)
        return x

    def mha_step(self, x: torch.Tensor, state, h: int, ctx: StepContext, layer_idx: int, aux: list,
                 recorder=None, block_id: int = 0) -> tuple[torch.Tensor, Any]:
        """Step h's attention half: route, attend, add to the residual stream."""
        r, state = self._route("mha", x, state, h, aux)
        y = x + self._attend(x, r, ctx, layer_idx)
        if recorder is not None:
            recorder.record(block_id, "mha", h, r, x, y)
        return y, state

    def ffn_step(self, y: torch.Tensor, state, h: int, aux: list, recorder=None, block_id: int = 0,
                 step_input: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Step h's feed-forward half: route, run the chosen FFN modules, add to the residual stream.
        With GPT-NeoX's parallel residual, the FFN reads the step's input (before attention)."""
        f = step_input if self.parallel and step_input is not None else y
        r, state = self._route("ffn", f, state, h, aux)
        x = y + scatter_modules(f, r, lambda m, xs: self.ffn[str(m)](xs), (self.d,), weighted=True)[0]
        if recorder is not None:
            recorder.record(block_id, "ffn", h, r, y, x)
        return x, state

    def step(self, x: torch.Tensor, ctx: StepContext, first_layer: int, h: int, states: tuple, aux: list,
             recorder, block_id: int) -> tuple[torch.Tensor, tuple]:
        """Step h alone; `states` are the routers' states before it (a caller may resume here)."""
        s_mha, s_ffn = states
        x, s_mha = self.mha_step(x, s_mha, h, ctx, first_layer + h, aux, recorder, block_id)
        x, s_ffn = self.ffn_step(x, s_ffn, h, aux, recorder, block_id)
        return x, (s_mha, s_ffn)

    def _attend(self, x: torch.Tensor, r: Routing, ctx: StepContext, layer_idx: int) -> torch.Tensor:
        mods = self.mha
        track = self.skip or bool(self.removed["mha"])
        if list(r.groups) == [r.skip_id]:  # every token skips: only keep the cache in step
            self.attn.skip_all(x, ctx, layer_idx, track)
            return x.new_zeros(x.shape)
        # Q, K and V are the plain sums of the chosen modules' projections (the paper's assembly);
        # only the output projections are weighted.
        q, k, v = scatter_modules(x, r, lambda m, xs: mods[str(m)].qkv(xs), (self.attn_dim, self.kv_dim, self.kv_dim), False)
        key_valid = None if r.all_skip is None else ~r.all_skip
        a = self.attn(q, k, v, ctx, layer_idx, key_valid, track_valid=track, kind=self._kind(r))
        return scatter_modules(a, r, lambda m, xs: mods[str(m)].out(xs), (self.d,), weighted=True)[0]

    def _kind(self, r: Routing) -> Kind | MixedKinds:
        """The attention kind of the chosen modules; per token (its first choice) when they differ."""
        kinds = {m: self.mha[str(m)].kind for m in r.groups if m != r.skip_id}
        distinct = sorted(set(kinds.values()), key=str)
        if len(distinct) == 1:
            return distinct[0]
        table = torch.zeros(r.n_modules, dtype=torch.long, device=r.idx.device)
        for m, kind in kinds.items():
            table[m] = distinct.index(kind)
        return MixedKinds(distinct, table[r.idx[:, 0]])


# ----------------------------------------------------------------------------- model

# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache`;
# the model takes either name and returns the one this transformers knows.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MomPreTrainedModel(PreTrainedModel):
    config_class = MomConfig
    config: MomConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MomBlock", "PlainLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # linear, embedding, norms, and the rotary embedding's buffers
        if "RotaryEmbedding" in type(module).__name__ and not hasattr(module, "original_inv_freq"):
            # A source rotary class with one table per attention type (Gemma 3), which the generic
            # init above does not know: its buffers as a fresh instance computes them.
            fresh = type(module)(module.config, device="cpu")
            for name, buf in fresh.named_buffers():
                init.copy_(module.get_buffer(name), buf)
        if isinstance(module, Router):
            # Identity until trained: the logits are the step bias (set by `mom decompose`).
            init.zeros_(module.head.weight)
            init.zeros_(module.step_bias)
        if isinstance(module, PeerLayer):
            # Not saved (which neuron an expert came from is known only when it is built); loading
            # would otherwise leave it uninitialised memory.
            init.constant_(module.neuron_index, -1)


class MomModel(MomPreTrainedModel):
    def __init__(self, config: MomConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_type == "learned"
            else None
        )
        self.bottom = nn.ModuleList(PlainLayer(config, o) for o in config.bottom_layers)
        self.blocks = nn.ModuleList(MomBlock(config, spec, i) for i, spec in enumerate(config.blocks))
        self.top = nn.ModuleList(PlainLayer(config, o) for o in config.top_layers)
        self.norm = make_norm(config)
        self.rotary_emb = self._make_rotary(config) if config.position_type == "rope" else None
        self.recorder: RoutingRecorder | None = None
        self.gradient_checkpointing = False  # set by transformers' activation_checkpointing_enable()
        self.post_init()

    @staticmethod
    def _make_rotary(config: MomConfig) -> nn.Module:
        # transformers' own rotary embedding, so every RoPE scaling variant it knows works here:
        # the source family's class (partial rotary, per-type tables), or Llama's.
        if config.rotary_embedding:
            return source_class(config, config.rotary_embedding)(source_config(config))
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = LlamaConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
        )
        return LlamaRotaryEmbedding(rope)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Cache | None, torch.Tensor | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        cache = cache if cache is not None else past_key_values  # the name before transformers 5.24
        use_cache = self.config.use_cache if use_cache is None else use_cache
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        use_cache = use_cache and not checkpointed  # a recomputed layer would write its cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None].expand(b, -1)
        x = self.add_positions(x, position_ids)
        pad = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            pad = attention_mask[:, -(past + t) :].bool()
        ctx = self.context(x, position_ids, past, cache if use_cache else None, pad)

        h = x.reshape(b * t, -1)
        aux: list[torch.Tensor] = []
        layer = 0
        for plain in self.bottom:
            h = self._gradient_checkpointing_func(plain, h, ctx, layer) if checkpointed else plain(h, ctx, layer)
            layer += 1
        for i, block in enumerate(self.blocks):
            if checkpointed:
                h = self._checkpointed_block(block, h, ctx, layer, aux, i)
            else:
                h = block(h, ctx, layer, aux, self.recorder, i)
            layer += block.steps
        for plain in self.top:
            h = self._gradient_checkpointing_func(plain, h, ctx, layer) if checkpointed else plain(h, ctx, layer)
            layer += 1
        h = self.norm(h).view(b, t, -1)
        aux_loss = torch.stack(aux).mean() if aux else None
        return h, cache, aux_loss

    def rope_tables(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per RoPE table: one, or one per attention type (Gemma 3's local and global bases)."""
        if not self.config.rope_per_type:
            return {"default": self.rotary_emb(x, position_ids)}
        types = set(self.config.attention_types or ["full_attention"])
        return {kind: self.rotary_emb(x, position_ids, layer_type=kind) for kind in sorted(types)}

    def add_positions(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The embedded tokens (B, T, d) as the first layer sees them: scaled, plus learned positions."""
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x if self.embed_positions is None else x + self.embed_positions(position_ids)

    def context(self, x: torch.Tensor, position_ids: torch.Tensor, past: int = 0, cache: Cache | None = None,
                pad: torch.Tensor | None = None) -> StepContext:
        """What every layer of a pass over x (B, T, d) shares: positions, cache, padding."""
        rope = self.rope_tables(x, position_ids) if self.rotary_emb is not None else {}
        return StepContext(x.shape[0], x.shape[1], past, cache, rope, pad, x.device)

    def _checkpointed_block(self, block: MomBlock, h: torch.Tensor, ctx: StepContext, layer: int, aux: list, i: int) -> torch.Tensor:
        """A block whose activations are recomputed in backward. The recomputation must not count
        twice: the block's aux terms come back as an output (not appended again), and the recorder
        sees only the first run (outside autograd, so both runs save the same tensors)."""
        first = [True]
        recorder = None if self.recorder is None else _FirstRunRecorder(self.recorder, first)

        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            terms: list[torch.Tensor] = []
            out = block(x, ctx, layer, terms, recorder, i)
            first[0] = False
            return out, torch.stack(terms) if terms else x.new_zeros(0)

        h, terms = self._gradient_checkpointing_func(run, h)
        aux.extend(terms.unbind(0))
        return h


class _FirstRunRecorder:
    """Passes a checkpointed block's routing to the real recorder on its first run only."""

    def __init__(self, recorder: Any, first: list[bool]) -> None:
        self.recorder, self.first = recorder, first

    def record(self, *args: Any) -> None:
        if self.first[0]:
            with torch.no_grad():
                self.recorder.record(*args)


class MomForCausalLM(MomPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MomConfig) -> None:
        super().__init__(config)
        self.model = MomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final (normed) hidden states."""
        logits = self.lm_head(h)
        if self.config.logits_divisor != 1.0:  # Granite
            logits = logits / self.config.logits_divisor
        if self.config.final_softcap is not None:  # Gemma 2
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        h, cache, aux_loss = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head(h[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + self.config.aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, **{_CACHE_FIELD: cache})
