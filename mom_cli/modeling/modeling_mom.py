"""The Mixture-of-Modules runtime (arXiv 2407.06677), as a `transformers` model.

Read top to bottom: norms, the kinds of module (MHA, dense FFN, sparse MoE FFN, PEER FFN), the
router, routing and dispatch, attention, the routed block, the plain layer, the model. Families'
quirks (q/k norms, post-norms, sliding windows, soft-capping, scales) are config fields, each off
by default; a module carries those of its origin layer. This file, `configuration_mom.py`
`peer.py` (the PEER layer) and `segment_kernel.py` (the GPU's segment matmul), both imported
relatively, are copied verbatim into `trust_remote_code` exports, so they import nothing else from
`mom_cli`.

Symbols follow the paper: M modules per pool (+ SKIP, index M), H steps per block, top-K routing,
temperature T. Per step, for every token:
    MHA router -> top-K modules -> x += sum_k w_k W^O_k(attn(sum_k Q_k, sum_k K_k, sum_k V_k))
    FFN router -> top-K modules -> x += sum_k w_k FFN_k(x)
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    MoeCausalLMOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_mom import MomConfig
from .peer import PeerLayer
from .segment_kernel import disable as disable_triton_segment_mm
from .segment_kernel import segment_mm as triton_segment_mm
from .segment_kernel import usable as triton_usable

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
        self._picks_cache: tuple[tuple[int, int, int], list[list[int]]] | None = None
        self._padded_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def is_constant(self) -> bool:
        """True when the head is exactly zero, so the logits are the step bias whatever the input.

        Then inference skips the GRU/MLP entirely (it cannot change the choice). Checked once per
        in-place update of the head (tensor version counter), so it costs one sync per change.
        """
        w = self.head.weight
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return False  # compiled code routes through the router (same choice, no host read)
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

    def host_picks(self, k: int) -> list[list[int]] | None:
        """This router's `constant_picks` when it is constant, on the host; cached per in-place
        update of the step bias, so dispatching them needs no device sync."""
        if not self.is_constant():
            return None
        b = self.step_bias
        key = (b.data_ptr(), b._version, k)
        if self._picks_cache is None or self._picks_cache[0] != key:
            self._picks_cache = (key, Router.constant_picks(self.head.weight.detach(), b.detach(), k))
        return self._picks_cache[1]

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
            return self._scores(state, bias, step), state
        return self._scores(F.gelu(self.hidden(u)), bias, step), state

    def _scores(self, h: torch.Tensor, bias: torch.Tensor, step: int) -> torch.Tensor:
        """head(h) + the step's bias, in one addmm. On a GPU without autograd, through the head
        padded to a multiple of 8 scores: M + 1 scores a row (31 for 30 modules) are rows cuBLAS
        cannot align, and its unaligned kernel plus a split-K reduction took 5.9 + 2.3 us on an
        H200, where the GRU's aligned matmuls of more work took 3.9 us. The padded copy is kept
        until the head or the bias changes in place (as the stacked pools are); a CUDA graph
        captures the copy, so it is captured again after a weight update, as for the pools."""
        w, b = self.head.weight, self.step_bias
        if not h.is_cuda or w.shape[0] % 8 == 0 or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.linear(h, w, bias)
        key = _param_key([w, b])  # as the stacked pools' (None: not cacheable, made every call)
        if key is None or self._padded_cache is None or self._padded_cache[0] != key:
            pad, dtype = -w.shape[0] % 8, autocast_dtype(h) or w.dtype
            self._padded_cache = (key, F.pad(w, (0, 0, 0, pad)).to(dtype), F.pad(b, (0, pad)).to(dtype))
        _, w_pad, b_pad = self._padded_cache
        return F.linear(h, w_pad, b_pad[step])[:, : w.shape[0]]


# ----------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """Top-K choice for N tokens: slots (N, K), pruned ones already sent to SKIP, and their scores
    `top` (N, K), whose softmax at `temperature` is `weight`.

    `picks`: for a constant router, the K slots every token chose, known on the host. Otherwise
    everything stays on the device; only the per-module path (`groups`) syncs with the host.
    """

    idx: torch.Tensor
    top: torch.Tensor
    temperature: float
    n_modules: int
    skip_id: int
    picks: list[int] | None = None
    _weight: torch.Tensor | None = field(default=None, repr=False)

    @property
    def weight(self) -> torch.Tensor:
        """(N, K) mixing weights, computed on first use: a top-1 step's grouped dispatch never
        asks (the softmax of one score is exactly 1, and its gradient exactly 0). Not a
        functools.cached_property, whose lock torch.compile cannot trace."""
        if self._weight is None:
            self._weight = torch.softmax(self.top.float() / self.temperature, dim=-1).to(self.top.dtype)
        return self._weight

    @functools.cached_property
    def groups(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per chosen slot (SKIP included): its token positions and their weights. One host sync."""
        flat, k = self.idx.reshape(-1), self.idx.shape[1]
        order = torch.argsort(flat, stable=True)
        tokens, w = order // k, self.weight.reshape(-1)[order]
        groups, start = {}, 0
        for m, c in enumerate(torch.bincount(flat, minlength=self.n_modules).tolist()):
            if c:
                groups[m] = (tokens[start : start + c], w[start : start + c])
            start += c
        return groups

    def key_valid(self) -> torch.Tensor | None:
        """Tokens that chose more than SKIP (their keys may be attended to); None when all did."""
        if self.picks is not None:
            return (
                None
                if any(m != self.skip_id for m in self.picks)
                else self.idx.new_zeros(self.idx.shape[0], dtype=torch.bool)
            )
        valid = self.idx[:, 0] != self.skip_id if self.idx.shape[1] == 1 else (self.idx != self.skip_id).any(-1)
        return None if _all_on_host(valid) else valid


def _all_on_host(t: torch.Tensor) -> bool:
    """`t.all()` where asking is free (a CPU tensor in eager mode); False where it would cost a
    device sync or a graph break, and the caller then keeps the general (masked) form."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and bool(t.all())


def route(logits: torch.Tensor, k: int, temperature: float, skip_id: int, remap: torch.Tensor | None = None) -> Routing:
    """Top-K of the scores; weights are the softmax over the chosen scores (= renormalised softmax).

    Choices are slots 0..M-1 and SKIP (= M). `remap` sends the slots of removed modules to SKIP,
    so a pruned module's tokens skip, with the router itself unchanged.
    """
    top, idx = logits.topk(k, dim=-1)
    if remap is not None:
        idx = remap[idx]
    return Routing(idx=idx, top=top, temperature=temperature, n_modules=skip_id + 1, skip_id=skip_id)


def route_constant(
    bias: torch.Tensor, picks: list[int], n: int, temperature: float, skip_id: int, remap: list[int] | None
) -> Routing:
    """`route` for a constant router (logits = `bias` for all n tokens), built from its host-side picks."""
    top = bias[picks].expand(n, -1)
    slots = [remap[m] for m in picks] if remap is not None else list(picks)
    idx = _host_constant(tuple(slots), bias.device).expand(n, -1)
    return Routing(idx=idx, top=top, temperature=temperature, n_modules=skip_id + 1, skip_id=skip_id, picks=slots)


@functools.lru_cache(maxsize=4096)
def _host_constant(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small constant index tensor, copied to the device once, not at every step."""
    return torch.tensor(values, device=device)


@functools.lru_cache(maxsize=256)
def _arange(start: int, end: int, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """torch.arange(start, end) made once per size, device and dtype: the dispatch asks for the
    same few at every step, and each would be a kernel launch on a GPU. Read only."""
    return torch.arange(start, end, device=device, dtype=dtype)


def aux_load_balancing(logits: torch.Tensor, r: Routing, temperature: float) -> torch.Tensor:
    """Switch-style load balancing over the M+1 choices: n * sum_i f_i * P_i."""
    n = logits.shape[-1]
    probs = torch.softmax(logits.float() / temperature, dim=-1).mean(0)
    flat = r.idx.reshape(-1)
    # Counted by index_add, not bincount, which would ask the host for the output size.
    counts = torch.zeros(r.n_modules, device=flat.device).index_add_(
        0, flat, torch.ones(flat.shape, device=flat.device)
    )
    return n * (counts[:n] / flat.numel() * probs).sum()


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


# ----------------------------------------------------------------------------- dispatch, one module at a time


def scatter_modules(
    x: torch.Tensor, r: Routing, fn, out_dims: tuple[int, ...], weighted: bool, only: set[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """For each output: sum over the chosen modules m of (w *) fn(m, x[tokens of m]).

    The reference dispatch, and the one for modules the grouped dispatch cannot stack (PEER; `only`
    names them): each module runs on its own tokens (gather, run, scatter-add), one after another.
    `fn` returns one tensor per entry of `out_dims`.
    """
    outs = [x.new_zeros(x.shape[0], dim) for dim in out_dims]
    for m, (tok, w) in r.groups.items():
        if m == r.skip_id or (only is not None and m not in only):
            continue
        ys = fn(m, x.index_select(0, tok))
        ys = ys if isinstance(ys, tuple) else (ys,)
        if weighted:
            ys = tuple(y * w[:, None] for y in ys)
        outs = [o.index_add(0, tok, y.to(o.dtype)) for o, y in zip(outs, ys)]  # autocast: bf16 y, float32 sums
    return tuple(outs)


def constant_modules(x: torch.Tensor, r: Routing, fn, weighted: bool) -> tuple[torch.Tensor, ...] | None:
    """Dispatch for a constant router: every token goes to the same K modules, so each chosen
    module runs on all tokens in order (no gather, no scatter). None when all K choices are SKIP."""
    outs = None
    for j, m in enumerate(r.picks):
        if m == r.skip_id:
            continue
        ys = fn(m, x)
        ys = ys if isinstance(ys, tuple) else (ys,)
        if weighted:
            ys = tuple(y * r.weight[:, j : j + 1] for y in ys)
        outs = list(ys) if outs is None else [o + y for o, y in zip(outs, ys)]
    return None if outs is None else tuple(outs)


# ----------------------------------------------------------------------------- grouped dispatch
#
# One matmul per projection over all routed rows of a step: the N*K (token, choice) rows are sorted
# by module, each module's weights are stacked into (G, out, in), and a segment matmul multiplies
# each run of rows by its module's matrix (segment_kernel.py's Triton kernel on a GPU where it
# pays, torch._grouped_mm where the device and dtype allow, else one mm per segment). Norm
# statistics are computed once per token; only the per-module norm scale is gathered per row.
# Rows are put back in token order, each written to its own place.


def _grouped_mm_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm takes bf16 on CUDA and any float on CPU, with 16-byte aligned row strides;
    under torch.compile its fake kernel takes bf16 only."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // a.element_size()
    if a.shape[-1] % align or w.shape[-2] % align:
        return False
    if a.is_cuda or torch.compiler.is_compiling():
        return a.dtype == torch.bfloat16
    return a.device.type == "cpu"


def _zero_tail(y: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows past the last group are not written by torch._grouped_mm: make them zero."""
    if y.device.type == "cpu" and not torch.compiler.is_compiling():
        y[int(offs[-1]) :].zero_()  # on the CPU, reading the bound is free and touches only the tail
        return y
    keep = _arange(0, y.shape[0], y.device) < offs[-1]
    return y.masked_fill_(~keep[:, None], 0)


def _segment_forward(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, full: bool = False) -> torch.Tensor:
    """`full`: the groups cover every row (offs[-1] is the row count), so there is no tail to zero."""
    if triton_usable(a, w):
        try:
            return triton_segment_mm(a, w, offs, full)
        except Exception as e:  # Triton could not build or launch it here: the other paths serve
            disable_triton_segment_mm(f"{type(e).__name__}: {e}")
            warnings.warn(
                f"mom: the Triton segment matmul failed ({type(e).__name__}: {e}); using torch's", stacklevel=2
            )
    if _grouped_mm_ok(a, w):
        y = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
        return y if full else _zero_tail(y, offs)
    return _segment_loop(a, w, offs)


def _segment_loop(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """segment_mm as one mm per group; it reads the group sizes on the host."""
    pieces, start = [], 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            pieces.append(a[start:end] @ w[g].t())
        start = end
    if start < a.shape[0]:
        pieces.append(a.new_zeros(a.shape[0] - start, w.shape[1]))
    return torch.cat(pieces)


def _segment_wgrad(g: torch.Tensor, a: torch.Tensor, offs: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per group: the sum over its rows of g_row^T a_row, (G, out, in)."""
    if _grouped_mm_ok(a, g[None]):
        return torch._grouped_mm(g.t(), a, offs=offs)
    # written in place: a zeroed stack that each product is then copied into streams every
    # module's gradient through memory twice more
    out, start = g.new_empty(n_groups, g.shape[1], a.shape[1]), 0
    for i, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(g[start:end].t(), a[start:end], out=out[i])
        else:
            out[i].zero_()
        start = end
    return out


def _merged_wgrad(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_groups: int) -> torch.Tensor:
    """The weight gradient of all the steps that used one stacked pool, in one segment matmul:
    each step's rows are a few per module, so per-step weight gradients would each stream every
    module's full gradient through memory; merged, each module's rows of all steps form one group."""
    a0, g0, _ = rows[0]
    if a0.device.type == "cpu" and not torch.compiler.is_compiling():
        out = g0.new_empty(n_groups, g0.shape[1], a0.shape[1])
        _merged_wgrad_host(rows, out)
        return out
    return _merged_wgrad_device(rows, n_groups)


def _merged_wgrad_device(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_groups: int) -> torch.Tensor:
    """_merged_wgrad without reading the group bounds on the host: the rows of all steps sorted by
    group (stable, so each group's rows keep their step order), then one segment matmul."""
    _, order, offs = _sort_by_group(_row_groups(rows), n_groups)
    a = torch.cat([a for a, _, _ in rows]).index_select(0, order)
    g = torch.cat([g for _, g, _ in rows]).index_select(0, order)
    return _segment_wgrad(g, a, offs, n_groups)


def _row_groups(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Each row's group (the group count past the last), step after step; one batched search when
    the steps have as many rows."""
    offs = [o for _, _, o in rows]
    n = rows[0][0].shape[0]
    if all(a.shape[0] == n for a, _, _ in rows):
        r = _arange(0, n, offs[0].device, offs[0].dtype)
        return torch.searchsorted(torch.stack(offs), r.expand(len(offs), -1).contiguous(), right=True).flatten()
    return torch.cat([torch.bucketize(_arange(0, a.shape[0], o.device, o.dtype), o, right=True) for a, _, o in rows])


def _sort_by_group(gid: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted keys, the stable order that sorts them, each group's end as int32 `offs`) of rows'
    group ids. 8-bit keys where the groups fit: a GPU's radix sort then makes one pass where int64
    keys take eight (measured on an H200: 27 us per step's sort of 1024 int64 keys)."""
    keys, order = torch.sort(gid.to(torch.uint8) if n_groups < 256 else gid, stable=True)
    offs = torch.searchsorted(keys, _arange(1, n_groups + 1, keys.device, keys.dtype), out_int32=True)
    return keys, order, offs


def _merged_wgrad_host(
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], out: torch.Tensor | list[torch.Tensor]
) -> None:
    """_merged_wgrad where the group bounds can be read for free (the CPU), written into out[i]
    for group i. Each step's rows of a group are one slice, so group i's rows of all steps are one
    copy of its slices. Why group by group: the rows of all groups at once (up to 30 steps x 1024
    rows x 3072 columns for a [gate; up] pool) are fresh memory beyond the allocator's reuse,
    whose page faults cost more than the copy; one group's fit in memory freed by the last."""
    bounds = [[0, *offs.tolist()] for _, _, offs in rows]
    for i, o in enumerate(out):
        spans = [(a[b[i] : b[i + 1]], g[b[i] : b[i + 1]]) for (a, g, _), b in zip(rows, bounds) if b[i + 1] > b[i]]
        if not spans:  # every row of this group went to SKIP, or it was never picked
            o.zero_()
            continue
        a_i = spans[0][0] if len(spans) == 1 else torch.cat([a for a, _ in spans])
        g_i = spans[0][1] if len(spans) == 1 else torch.cat([g for _, g in spans])
        torch.mm(g_i.t(), a_i, out=o)


PACK_ROWS = 64  # the row count oneDNN picks its packed layout for (any count runs on it)


@functools.lru_cache(maxsize=1)
def _packing_works() -> bool:
    """Whether this torch has oneDNN's packed CPU linear and it computes x @ w.T (probed once)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_reorder_linear_weight"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(24, 16, generator=g), torch.randn(5, 16, generator=g)
        y = ops._linear_pointwise(x, ops._reorder_linear_weight(w, PACK_ROWS), None, "none", [], "")
        return bool(torch.allclose(y, x @ w.t(), atol=1e-5))
    except (RuntimeError, TypeError):
        return False


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACK_ROWS)


class PackedGroups:
    """The G weights of a pool's projection, each packed once for oneDNN's CPU matmul.

    Why: a routed step runs each module on a few dozen rows, and MKL's sgemm re-packs the whole
    weight at every call, which at that size costs about as much as the multiplication (measured
    1.5x slower per FLOP than one large matmul; 2x at the 17 rows per module of a 512-token
    training batch); packed once, the small matmuls run as fast as the dense model's.

    `parts[g]` are the parameters whose rows make group g's (out, in) weight ([q; k; v], [gate; up]
    or one). Packing replaces the stacked copy, so it costs the same, once per forward in training
    (once per parameter change otherwise), and serves every step of the forward. With autograd:
    the input gradient runs the transposed weights, packed at the first backward; the weight
    gradients of all steps are computed at once, as for a stack (`_merged_wgrad`), and handed to
    the parameters themselves (`_DeferredPackedGrad`). Only float32 on a CPU, outside
    torch.compile; see `packable`.

    `split`: each parameter packed on its own, unless the parameters train (for [gate; up]: the
    inference path `swiglu` fuses the activation and the product into the matmuls)."""

    def __init__(self, parts: list[list[torch.Tensor]], split: bool = False) -> None:
        self.parts = parts
        params = [p for ps in parts for p in ps]
        train = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        split = split and not train  # training needs the pre-activations anyway: one matmul per group
        self.widths = [p.shape[0] for p in parts[0]] if split else [sum(p.shape[0] for p in parts[0])]
        self.out_features = sum(self.widths)
        self.groups = [
            [_pack(p) for p in ps] if split else [_pack(torch.cat([p.detach() for p in ps]))] for ps in parts
        ]
        self.transposed: list[torch.Tensor] | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.anchor = _DeferredPackedGrad.apply(self, *params) if train else None

    @staticmethod
    def packable(w: torch.Tensor) -> bool:
        return (
            w.device.type == "cpu"
            and w.dtype == torch.float32
            and not torch.compiler.is_compiling()
            and _packing_works()
        )

    def __call__(self, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """segment_mm's result: rows [offs[g-1], offs[g]) of `a` through group g, zero past the last."""
        if torch.is_grad_enabled() and (a.requires_grad or self.anchor is not None):
            return _PackedSegmentMM.apply(a, self.anchor, offs, self)
        return _run_packed(a, offs, self.groups, self.widths)

    def swiglu(self, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """silu(a W_gate^T) * (a W_up^T) per group, without autograd, for split [gate; up] packs:
        oneDNN applies the silu and the product as the matmuls write their outputs."""
        op, (f, _) = torch.ops.mkldnn._linear_pointwise, self.widths
        h, start = a.new_empty(a.shape[0], f), 0
        for g, end in enumerate(offs.tolist()):
            if end > start:
                gate_pack, up_pack = self.groups[g]
                gate = op(a[start:end], gate_pack, None, "swish", [], "")
                h[start:end] = op.binary(a[start:end], gate, up_pack, None, "mul")
            start = end
        h[start:].zero_()
        return h

    def backward_groups(self) -> list[torch.Tensor]:
        """Each group's weight transposed and packed: g @ W_g is a linear of g with W_g^T."""
        if self.transposed is None:
            # one copy: the parts' transposes side by side are already the (in, out) matrix
            self.transposed = [_pack(torch.cat([p.detach().t() for p in ps], dim=1)) for ps in self.parts]
        return self.transposed


def _run_packed(
    a: torch.Tensor, offs: torch.Tensor, groups: list[list[torch.Tensor]], widths: list[int]
) -> torch.Tensor:
    """Rows [offs[g-1], offs[g]) of `a` through group g's packs, each writing `widths` columns."""
    y, start = a.new_empty(a.shape[0], sum(widths)), 0
    for g, end in enumerate(offs.tolist()):  # on the CPU, reading the bounds is free
        if end > start:
            col = 0
            for w, n in zip(groups[g], widths):
                y[start:end, col : col + n] = torch.ops.mkldnn._linear_pointwise(a[start:end], w, None, "none", [], "")
                col += n
        start = end
    y[start:].zero_()
    return y


class _PackedSegmentMM(torch.autograd.Function):
    """PackedGroups' segment matmul with its backward; the weights reach autograd through the
    pool's anchor (`_DeferredPackedGrad`), which collects the rows for their gradients."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, anchor: torch.Tensor | None, offs: torch.Tensor, packed: PackedGroups):
        ctx.save_for_backward(a, offs)
        ctx.packed = packed
        return _run_packed(a, offs, packed.groups, packed.widths)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, offs = ctx.saved_tensors
        packed, g = ctx.packed, g.contiguous()
        ga = None
        if ctx.needs_input_grad[0]:
            ga = _run_packed(g, offs, [[w] for w in packed.backward_groups()], [a.shape[1]])
        if ctx.needs_input_grad[1]:
            packed.pending.append((a, g, offs))
        return ga, None, None, None


class _DeferredPackedGrad(torch.autograd.Function):
    """A pool's trainable weights as one anchor that every step's packed matmul takes: its backward
    runs after all the steps', and computes their weight gradients at once (see _DeferredWeightGrad),
    split back into the parameters of each group."""

    @staticmethod
    def forward(ctx, packed: PackedGroups, *params: torch.Tensor) -> torch.Tensor:
        ctx.packed = packed
        ctx.set_materialize_grads(False)
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, _grad: torch.Tensor | None):
        packed = ctx.packed
        rows, packed.pending = packed.pending, []
        packed.transposed = None  # the next forward packs the updated weights anew
        n = sum(len(ps) for ps in packed.parts)
        if not rows:
            return (None,) * (n + 1)
        # one gradient per group, as the dense model has one per weight (see _merged_wgrad_host)
        gw = [ps[0].new_empty(sum(p.shape[0] for p in ps), ps[0].shape[1]) for ps in packed.parts]
        _merged_wgrad_host(rows, gw)
        grads: list[torch.Tensor | None] = [None]
        for gw_g, ps in zip(gw, packed.parts):
            grads += list(gw_g.split([p.shape[0] for p in ps]))
        return tuple(grads)


class _SegmentMM(torch.autograd.Function):
    """segment_mm with its backward. With `pending`, the weight gradient is left there for
    `_DeferredWeightGrad` to compute once for all steps of a forward."""

    @staticmethod
    def forward(
        ctx, a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, pending: list | None, full: bool = False
    ) -> torch.Tensor:
        ctx.save_for_backward(a, w, offs)
        ctx.pending, ctx.full = pending, full
        return _segment_forward(a, w, offs, full)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, w, offs = ctx.saved_tensors
        g = g.contiguous()
        ga = _segment_forward(g, w.transpose(1, 2), offs, ctx.full) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            if ctx.pending is None:
                gw = _segment_wgrad(g, a, offs, w.shape[0])
            else:
                ctx.pending.append((a, g, offs))
        return ga, gw, None, None, None


class _DeferredWeightGrad(torch.autograd.Function):
    """Identity on a pool's stacked weights, used by every step of a forward. Its backward runs
    after all the steps' backwards, and computes their weight gradients from `pending` at once."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, pending: list) -> torch.Tensor:
        ctx.pending = pending
        ctx.set_materialize_grads(False)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        rows, ctx.pending[:] = list(ctx.pending), []
        gw = _merged_wgrad(rows, grad.shape[0] if grad is not None else rows[0][2].shape[0]) if rows else None
        if grad is not None:
            gw = grad if gw is None else gw + grad
        return gw, None


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives a matmul on t's device, or None outside autocast."""
    dev = t.device.type
    if dev == "meta":  # weights not loaded yet (a model streamed layer by layer): no autocast there
        return None
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def segment_mm(
    a: torch.Tensor,
    w: torch.Tensor | None,
    offs: torch.Tensor,
    pending: list | None = None,
    packed: PackedGroups | None = None,
    full: bool = False,
) -> torch.Tensor:
    """Rows [offs[g-1], offs[g]) of `a` (R, in) times w[g].T, with w (G, out, in); rows past offs[-1]
    give zero. `offs` (G,) int32 stays on the device on the Triton and grouped_mm paths. `pending`: see
    `_DeferredWeightGrad`. Under autocast it runs in autocast's dtype, as nn.Linear does there.
    `packed`: the same weights packed for the CPU (then `w` is None). `full`: offs[-1] is the row
    count (a stack with a zero group last, see StackedPool), so no tail needs zeroing."""
    if packed is not None and a.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return packed(a, offs)
    dt = autocast_dtype(a)
    if dt is not None:
        a, w = a.to(dt), w.to(dt)  # no-ops when StackedPool.build cast the weights already
    if torch.compiler.is_compiling():
        if _grouped_mm_ok(a, w):
            return _SegmentMM.apply(a, w, offs, None, full)
        return torch.ops.mom.segment_mm(a, w, offs)  # opaque to the compiler: no graph break
    return _SegmentMM.apply(a, w, offs, pending, full)


def _register_segment_ops() -> None:
    """`mom::segment_mm` for torch.compile, where the fallback's host reads would break the graph.
    Registered once per process (an exported copy of this file finds it already there)."""
    if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op") or hasattr(torch.ops.mom, "segment_mm"):
        return

    @torch.library.custom_op("mom::segment_mm", mutates_args=())
    def _op(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return _segment_forward(a, w, offs)  # run eagerly, where the CPU kernel takes any float dtype

    @torch.library.custom_op("mom::segment_mm_wgrad", mutates_args=())
    def _wgrad(g: torch.Tensor, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return _segment_wgrad(g, a, offs, offs.shape[0])

    _op.register_fake(lambda a, w, offs: a.new_empty(a.shape[0], w.shape[1]))
    _wgrad.register_fake(lambda g, a, offs: g.new_empty(offs.shape[0], g.shape[1], a.shape[1]))

    def setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        a, w, offs = ctx.saved_tensors
        ga = torch.ops.mom.segment_mm(grad.contiguous(), w.transpose(1, 2).contiguous(), offs)
        return ga, torch.ops.mom.segment_mm_wgrad(grad.contiguous(), a, offs), None

    _op.register_autograd(backward, setup_context=setup)


_register_segment_ops()


@dataclass
class Dispatch:
    """A step's rows sorted by group: row i is (token tok[i], its weight w[i], group gid[i]);
    group g holds rows [offs[g-1], offs[g]); rows of SKIP and of modules run one by one come last.
    `w` is None for top-1 routing, whose weights are all exactly 1. `order[i]` is row i's
    (token, choice) pair, numbered token by token.

    Every tensor op here is a kernel launch per step on a GPU, so the group of each row, which
    inference with a folded norm never asks for, is made on first use."""

    tok: torch.Tensor
    w: torch.Tensor | None
    offs: torch.Tensor
    order: torch.Tensor
    k: int
    keys: torch.Tensor  # the sorted group ids, in the sort's key dtype
    _gid: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def plan(cls, r: Routing, group_of: torch.Tensor | None, n_groups: int) -> Dispatch:
        """Constants are made once (`_arange`), and an identity `group_of` (None) is not applied."""
        flat = (r.idx if group_of is None else group_of[r.idx]).reshape(-1)
        keys, order, offs = _sort_by_group(flat, n_groups)
        k = r.idx.shape[1]
        if k == 1:
            return cls(order, None, offs, order, k, keys)
        return cls(order // k, r.weight.reshape(-1).index_select(0, order), offs, order, k, keys)

    @property
    def gid(self) -> torch.Tensor:
        """Each row's group, as an index. The per-group tables are gathered with index_select, whose
        backward adds (atomically on a GPU: the order of a table row's sum varies, unless
        torch.use_deterministic_algorithms is on) where advanced indexing's backward sorts: 46 us
        per call on an H200, 30 calls per H15K1 training step."""
        if self._gid is None:
            self._gid = self.keys.long()
        return self._gid

    def unsort(self, y: torch.Tensor) -> torch.Tensor:
        """Sorted rows (R, D) -> per token the sum over its K rows (N, D): each row written to its
        place (one kernel, no inverse order to make). Under torch.use_deterministic_algorithms on
        a GPU, a gather through the inverse order instead, deterministic in every torch release."""
        if torch.are_deterministic_algorithms_enabled() and y.is_cuda:
            inv = torch.empty_like(self.order).scatter_(0, self.order, _arange(0, self.order.numel(), y.device))
            y = y.index_select(0, inv)
        else:
            y = y.new_empty(y.shape).index_copy_(0, self.order, y)
        return y if self.k == 1 else y.view(-1, self.k, y.shape[-1]).sum(1)


def _norm_parts(norm: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor | None, float] | None:
    """(kind, scale, shift, eps) of a norm the grouped path knows exactly; None for any other."""
    if type(norm) is RMSNorm and norm.style == "llama":
        return "rms", norm.weight, None, norm.eps
    if type(norm) is nn.LayerNorm and norm.elementwise_affine and len(norm.normalized_shape) == 1:
        return "layer", norm.weight, norm.bias, norm.eps
    return None


_MHA_PARTS = {"norm", "q_proj", "k_proj", "v_proj", "o_proj", "post_norm"}
_FFN_PARTS = {
    True: {"norm", "gate_proj", "up_proj", "down_proj", "post_norm"},
    False: {"norm", "fc_in", "fc_out", "post_norm"},
}


def groupable(module: nn.Module) -> bool:
    """Whether the grouped dispatch computes exactly what this module's own forward does: a
    pre-norm it knows, the projections, and no q/k norm, post-norm or residual multiplier (those
    modules run one by one). A projection that is not a plain `nn.Linear` (a peft LoRA layer, a
    quantized linear) runs through its own forward, one module at a time, since stacking reads
    `.weight` alone."""
    parts = {name for name, _ in module.named_children()}
    projections = [c for name, c in module.named_children() if name not in ("norm", "post_norm", "act")]
    if any(type(c) is not nn.Linear for c in projections):
        return False
    if type(module) is MhaModule:
        known = parts == _MHA_PARTS and not module.qk_norm
    elif type(module) is FfnModule:
        known = parts == _FFN_PARTS[module.gated] | ({"act"} & parts)
    else:
        return False
    plain = type(getattr(module, "post_norm", None)) is nn.Identity and getattr(module, "multiplier", 1.0) == 1.0
    return known and plain and _norm_parts(module.norm) is not None


def _pad_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-group table with a zero row appended: the row of SKIP and of modules run one by one."""
    return None if t is None else torch.cat([t, t.new_zeros(1, *t.shape[1:])])


@dataclass
class StackedPool:
    """The groupable modules of a pool, stacked: group g is slot `slots[g]`; `group_of` maps every
    choice (slot, SKIP last) to its group, or to G for SKIP and modules run one by one (`others`).

    Stacked weights (not packed ones) of a pool with no `others` get a zero matrix as group G
    (`zero_group`): SKIP's rows are then multiplied by zero like any other group's, and no segment
    matmul needs its unwritten tail rows zeroed (three or four kernels per matmul on a GPU)."""

    slots: list[int]
    others: set[int]  # live slots that are not stacked (PEER modules, LoRA-wrapped projections)
    kinds: set  # the attention kinds of the live modules (an MHA pool's; {None} for an FFN pool)
    group_of: torch.Tensor | None
    norm: str
    eps: float
    scale: torch.Tensor  # (G+1, d)
    shift: torch.Tensor | None
    w_in: torch.Tensor | None  # (G, out, in): [q; k; v], [gate; up] or fc_in; None when packed
    b_in: torch.Tensor | None  # (G+1, out)
    w_out: torch.Tensor | None  # (G, d, in): o_proj, down_proj or fc_out; None when packed
    b_out: torch.Tensor | None
    act: Callable | None = None
    gated: bool = False
    # On a CPU in float32, the weights packed instead of stacked (see PackedGroups).
    packed_in: PackedGroups | None = None
    packed_out: PackedGroups | None = None
    # Under autograd: the steps' rows whose weight gradients are computed at once (_DeferredWeightGrad).
    pending_in: list | None = None
    pending_out: list | None = None
    zero_group: bool = False
    folded: bool = False  # w_in holds the pre-norm's scale

    @property
    def n_groups(self) -> int:
        return len(self.slots) + self.zero_group

    @classmethod
    def build(cls, pool: nn.ModuleDict, n_slots: int, removed: set[int]) -> StackedPool | None:
        """The weights are packed (PackedGroups) where the device and dtype allow, else stacked."""
        live = [m for m in range(n_slots) if m not in removed and str(m) in pool]
        slots = [m for m in live if groupable(pool[str(m)])]
        if not slots:
            return None
        mods = [pool[str(m)] for m in slots]
        table = [len(slots)] * (n_slots + 1)
        for g, m in enumerate(slots):
            table[m] = g
        identity = table == list(range(n_slots + 1))  # every slot stacked in order, SKIP last
        kind, _, _, eps = _norm_parts(mods[0].norm)
        scale = _pad_rows(torch.stack([_norm_parts(m.norm)[1] for m in mods]))
        shift = _pad_rows(torch.stack([_norm_parts(m.norm)[2] for m in mods])) if kind == "layer" else None
        first = mods[0]
        if isinstance(first, MhaModule):
            ins = [[m.q_proj, m.k_proj, m.v_proj] for m in mods]
            outs = [m.o_proj for m in mods]
        elif first.gated:
            ins = [[m.gate_proj, m.up_proj] for m in mods]
            outs = [m.down_proj for m in mods]
        else:
            ins = [[m.fc_in] for m in mods]
            outs = [m.fc_out for m in mods]
        b_in = (
            _pad_rows(torch.stack([torch.cat([p.bias for p in ps]) for ps in ins]))
            if ins[0][0].bias is not None
            else None
        )
        b_out = _pad_rows(torch.stack([p.bias for p in outs])) if outs[0].bias is not None else None
        w0 = outs[0].weight
        # built once (a CUDA graph may capture this forward); None where it maps every choice to itself
        group_of = None if identity else _host_constant(tuple(table), w0.device)
        ffn = isinstance(first, FfnModule)
        pending_in = pending_out = packed_in = packed_out = w_in = w_out = None
        zero_group = folded = False
        if autocast_dtype(w0) is None and PackedGroups.packable(w0):  # packed instead of stacked
            packed_in = PackedGroups([[p.weight for p in ps] for ps in ins], split=ffn and first.gated)
            packed_out = PackedGroups([[p.weight] for p in outs])
        else:
            # one copy: each module's [q; k; v] (or [gate; up]) rows are consecutive in the stack
            zero_group = len(live) == len(slots)
            rows_in, w_outs = [p.weight for ps in ins for p in ps], [p.weight for p in outs]
            if zero_group:
                rows_in.append(rows_in[0].new_zeros(sum(p.weight.shape[0] for p in ins[0]), rows_in[0].shape[1]))
                w_outs.append(w_outs[0].new_zeros(w_outs[0].shape))
            w_in = torch.cat(rows_in).view(len(ins) + zero_group, -1, rows_in[0].shape[1])
            if kind == "rms" and not w_in.requires_grad:
                # W diag(s) x = W (s * x): the pre-norm's scale folded into the weights. Not in
                # training, where bf16 gradients through the product lose precision.
                w_in, folded = w_in * scale[: w_in.shape[0], None, :], True
            w_out = torch.stack(w_outs)
            dt = autocast_dtype(w_in)
            if dt is not None:  # once per forward, not once per step (segment_mm would cast each time)
                w_in, w_out = w_in.to(dt), w_out.to(dt)
                b_in, b_out = (None if b is None else b.to(dt) for b in (b_in, b_out))
        if w_in is not None and w_in.requires_grad and not torch.compiler.is_compiling():
            pending_in, pending_out = [], []
            w_in, w_out = _DeferredWeightGrad.apply(w_in, pending_in), _DeferredWeightGrad.apply(w_out, pending_out)
        return cls(
            slots,
            set(live) - set(slots),
            {getattr(pool[str(m)], "kind", None) for m in live},
            group_of,
            kind,
            eps,
            scale,
            shift,
            w_in,
            b_in,
            w_out,
            b_out,
            act=first.act if ffn else None,
            gated=ffn and first.gated,
            packed_in=packed_in,
            packed_out=packed_out,
            pending_in=pending_in,
            pending_out=pending_out,
            zero_group=zero_group,
            folded=folded,
        )

    def normed_rows(self, x: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """Each row's token through its own module's pre-norm: statistics once per token."""
        if self.norm == "rms":  # as RMSNorm: statistics in float32, scale in the input dtype
            base = F.rms_norm(x, (x.shape[-1],), eps=self.eps)  # one fused kernel on a GPU
            rows = base.index_select(0, d.tok)
            return rows if self.folded else self.scale.index_select(0, d.gid) * rows
        base = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        return torch.addcmul(
            self.shift.index_select(0, d.gid), base.index_select(0, d.tok), self.scale.index_select(0, d.gid)
        )

    def project_in(self, rows: torch.Tensor, d: Dispatch) -> torch.Tensor:
        y = segment_mm(rows, self.w_in, d.offs, self.pending_in, self.packed_in, self.zero_group)
        return y if self.b_in is None else y + self.b_in.index_select(0, d.gid)

    def project_out(self, rows: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """The output projection, weighted by each row's routing weight, summed back per token."""
        y = segment_mm(rows, self.w_out, d.offs, self.pending_out, self.packed_out, self.zero_group)
        if self.b_out is not None:
            y = y + self.b_out.index_select(0, d.gid)
        return d.unsort(y if d.w is None else y * d.w[:, None])

    def ffn(self, x: torch.Tensor, d: Dispatch) -> torch.Tensor:
        rows = self.normed_rows(x, d)
        if self._fused_swiglu(rows):
            return self.project_out(self.packed_in.swiglu(rows, d.offs), d)
        h = self.project_in(rows, d)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.project_out(h, d)

    def _fused_swiglu(self, rows: torch.Tensor) -> bool:
        """Whether the packed inference path can fuse SwiGLU: split packs, silu, no input bias, and
        nothing that needs the pre-activations for a backward."""
        p = self.packed_in
        return (
            p is not None
            and len(p.widths) == 2
            and type(self.act) in _SILU
            and self.b_in is None
            and rows.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (rows.requires_grad or p.anchor is not None))
        )


_SILU = (nn.SiLU, type(ACT2FN["silu"]))


def _pool_params(pool: nn.Module) -> list[nn.Parameter]:
    """`pool.parameters()`, shared ones repeated. Walked at every forward, where nn.Module's
    generators cost about a millisecond for a pool of 30 modules: as much as a token's routing."""
    if torch.compiler.is_compiling():
        return list(pool.parameters())
    out, todo = [], [pool]
    while todo:
        m = todo.pop()
        out += [p for p in m._parameters.values() if p is not None]
        todo += [c for c in m._modules.values() if c is not None]
    return out


def _stack_params(pool: nn.ModuleDict) -> list[nn.Parameter]:
    """The parameters a pool's stack is made of: its groupable modules'. One that runs on its own
    (a PEER layer, a LoRA'd or quantized module) is not in the stack, so training it must not make
    the stack anew at every forward (heal trains PEER layers among frozen FFNs: SmolLM2's 20 were
    copied and cast to bf16 at each step)."""
    return [p for m in pool.values() if groupable(m) for p in _pool_params(m)]


def _param_key(params: list[nn.Parameter]) -> tuple | None:
    """Changes whenever one of a pool's parameters is replaced or updated in place; None for
    inference tensors (a model streamed layer by layer), which carry no version counter: never cached."""
    if not params or any(p.is_inference() for p in params):
        return None
    # the stack is cast (autocast) or packed (without it) for the autocast state it was built in
    return (autocast_dtype(params[0]), *((p.data_ptr(), p._version) for p in params))


# ----------------------------------------------------------------------------- attention


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """A RoPE table's sin (..., [s, s]) as [-s, s], made once per forward for `apply_rope`."""
    s = sin[..., : sin.shape[-1] // 2]
    return torch.cat((-s, s), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] channels of each head (all of them unless partial: GPT-NeoX, Phi).

    x cos + rotate_half(x) sin, where rotate_half(x) = [-x2, x1] is x rolled by half a head with
    the sign in the table: three kernels where the textbook form (a negation, a concatenation,
    two products, a sum) takes five, at every routed step on a GPU."""
    rd = cos.shape[-1]
    partial = rd < x.shape[-1]
    x_rot = x[..., :rd] if partial else x
    out = torch.addcmul(x_rot * cos, x_rot.roll(rd // 2, -1), sin_signed)
    return torch.cat((out, x[..., rd:]), dim=-1) if partial else out


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

    is_causal = True  # read by transformers' attention kernels

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        self.config = config  # its `_attn_implementation` picks the kernel at each call
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = self.n_heads // self.n_kv
        self.scaling = self.head_dim**-0.5
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
        return self._positioned(q, k, v, window, scale, ctx, layer_idx, key_valid, track_valid)

    def forward_qkv(
        self,
        qkv: torch.Tensor,
        ctx: StepContext,
        layer_idx: int,
        key_valid: torch.Tensor | None,
        track_valid: bool,
        kind: Kind | MixedKinds | None = None,
    ) -> torch.Tensor:
        """`forward` on [Q | K | V] in one (B*T, (H + 2 KV) * D) tensor: one RoPE for the
        queries and keys together (half the kernels, which a GPU launches at every step)."""
        kind = self.default_kind if kind is None else kind
        if isinstance(kind, MixedKinds) or kind[1] is None:
            kv = self.n_kv * self.head_dim
            q, k, v = qkv.split([self.n_heads * self.head_dim, kv, kv], dim=-1)
            return self(q, k, v, ctx, layer_idx, key_valid, track_valid, kind)
        window, rope, scale = kind
        n, b, t = self.n_heads, ctx.batch, ctx.seq
        heads = qkv.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H + 2 KV, T, D)
        cos, sin = (c.unsqueeze(1) for c in ctx.rope[rope])
        qk = apply_rope(heads[:, : n + self.n_kv], cos, sin)
        return self._positioned(
            qk[:, :n], qk[:, n:], heads[:, n + self.n_kv :], window, scale, ctx, layer_idx, key_valid, track_valid
        )

    def _positioned(self, q, k, v, window, scale, ctx: StepContext, layer_idx: int, key_valid, track_valid: bool):
        """Attention of positioned (B, heads, T, D) queries, keys and values, through the cache."""
        b, t = ctx.batch, ctx.seq
        valid = None if key_valid is None else key_valid.view(b, t)
        if ctx.cache is not None:
            if track_valid:
                flag = (valid if valid is not None else q.new_ones(b, t, dtype=torch.bool)).to(v.dtype)
                v = torch.cat([v, flag[:, None, :, None].expand(b, self.n_kv, t, 1)], dim=-1)
            k, v = ctx.cache.update(k, v, layer_idx)
            if track_valid:
                valid = v[:, 0, :, -1] > 0.5
                v = v[..., :-1]
                if _all_on_host(valid):
                    valid = None
        if self.softcap is not None:
            out = self._softcapped(q, k, v, ctx.mask(valid, k.shape[-2], window, always=True), scale).transpose(1, 2)
        else:
            out = self._kernel(q, k, v, ctx.mask(valid, k.shape[-2], window), scale)
        return out.reshape(b * t, self.n_heads * self.head_dim)

    def _kernel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
    ) -> torch.Tensor:
        """(B, H, T, D) queries over (B, KV, S, D) keys -> (B, T, H, D). `eager` is the reference;
        any other `attn_implementation` (sdpa by default) is transformers' registered kernel, which
        takes the same boolean mask (True = may attend) and, without one, causal attention."""
        impl = self.config._attn_implementation or "sdpa"
        if impl != "eager":
            out, _ = ALL_ATTENTION_FUNCTIONS[impl](self, q, k, v, mask, dropout=0.0, scaling=scale)
            return out
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        scores = (q @ k.transpose(-1, -2)) * (self.scaling if scale is None else scale)
        t, s = q.shape[-2], k.shape[-2]
        if mask is None:  # causal, the last t of s keys being the queries' own
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return (probs @ v).transpose(1, 2)

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


@dataclass(kw_only=True)
class StepContext:
    """What every attention call of one forward pass shares."""

    batch: int
    seq: int
    past: int
    cache: Cache | None
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # RoPE table -> (cos, signed_sin(sin)), each (B, T, rot)
    pad_mask: torch.Tensor | None  # (B, past+T) bool, True = real token
    device: torch.device
    dispatch: str = "grouped"  # or "modules" (MomModel.dispatch)
    _causal_cache: dict = field(default_factory=dict, repr=False)

    def mask(
        self,
        key_valid: torch.Tensor | None,
        n_keys: int,
        window: int | torch.Tensor | None = None,
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
        rows, cols, allowed, diagonal = self._causal(n_keys)
        if window is not None:
            w = window if isinstance(window, int) else window[:, None, :, None]
            allowed = allowed & (cols > rows - w)
        if keys is not None:
            # Always let a query see itself, so rows of padding or all-SKIP tokens stay finite;
            # their outputs are discarded. (allowed & keys) | diagonal in one kernel: the diagonal
            # is inside every causal (or windowed) mask.
            allowed = torch.where(keys[:, None, None, :], allowed, diagonal)
        return allowed

    def _causal(self, n_keys: int) -> tuple[torch.Tensor, ...]:
        """(query positions, key positions, causal mask, diagonal), the same at every step of a
        forward: made once (each is a kernel launch per step on a GPU)."""
        hit = self._causal_cache.get(n_keys)
        if hit is None:
            rows = torch.arange(self.seq, device=self.device)[:, None] + (n_keys - self.seq)
            cols = torch.arange(n_keys, device=self.device)[None, :]
            hit = self._causal_cache[n_keys] = (rows, cols, (cols <= rows)[None, None], (cols == rows)[None, None])
        return hit


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


@dataclass
class StepRecord:
    """What a routing recorder sees of one routed step."""

    kind: str
    step: int
    routing: Routing
    x_in: torch.Tensor
    x_out: torch.Tensor


@dataclass
class StepOutput:
    """One half-step of a block: the residual stream after it, the router state, the load-balancing
    term (training only) and, when asked for, what a recorder sees."""

    hidden: torch.Tensor
    state: Any
    aux: torch.Tensor | None
    record: StepRecord | None


@dataclass
class BlockOutput:
    hidden: torch.Tensor
    aux: list[torch.Tensor]  # load-balancing terms, one per routing decision (training only)
    records: list[StepRecord]  # filled only when asked for


def record_steps(recorder: Any, block_id: int, records: list[StepRecord]) -> None:
    """Hand a block's routed steps to a routing recorder (outside autograd)."""
    with torch.no_grad():
        for rec in records:
            recorder.record(block_id, rec.kind, rec.step, rec.routing, rec.x_in, rec.x_out)


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
        self._stack_cache: dict[str, tuple[tuple, StackedPool | None]] = {}
        self.set_removed(set(), set())

    def set_removed(self, mha: set[int], ffn: set[int]) -> None:
        """Switch slots off (on top of those pruned from the checkpoint): their tokens SKIP."""
        self._remaps: dict[tuple[str, torch.device], torch.Tensor] = {}  # made on first use, per device
        self._stack_cache = {}
        for kind, extra, pool in (("mha", mha, self.mha), ("ffn", ffn, self.ffn)):
            self.removed[kind] = {m for m in range(self.slots[kind]) if str(m) not in pool} | set(extra)

    def _remap_table(self, kind: str) -> list[int] | None:
        """Slot -> slot, or SKIP (= M) for removed slots; None when nothing is removed."""
        if not self.removed[kind]:
            return None
        n = self.slots[kind]
        return [n if m in self.removed[kind] else m for m in range(n)] + [n]

    def _remap(self, kind: str, device: torch.device) -> torch.Tensor | None:
        key = (kind, device)
        if key not in self._remaps:
            table = self._remap_table(kind)
            self._remaps[key] = None if table is None else torch.tensor(table, device=device)
        return self._remaps[key]

    def _stacked(self, kind: str, fresh: dict[str, StackedPool | None]) -> StackedPool | None:
        """The pool's stacked (or packed) weights, looked up once per forward (`fresh`). When some of
        the stacked modules' parameters train, built anew so that gradients reach them; otherwise
        (inference, training only the routers or the modules that run on their own) cached until a
        parameter changes."""
        if kind in fresh:
            return fresh[kind]
        pool = self.mha if kind == "mha" else self.ffn
        params = _pool_params(pool)
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if trains:  # only the stacked modules' training makes it anew; inference skips this walk
            params = _stack_params(pool)
            trains = any(p.requires_grad for p in params)
        key = None if trains or torch.compiler.is_compiling() else _param_key(params)
        if key is None:
            if trains and not torch.compiler.is_compiling():
                self._stack_cache.pop(kind, None)  # an evaluation's copy must not outlive it in training
            fresh[kind] = StackedPool.build(pool, self.slots[kind], self.removed[kind])
            return fresh[kind]
        hit = self._stack_cache.get(kind)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, StackedPool.build(pool, self.slots[kind], self.removed[kind]))
            self._stack_cache[kind] = hit
        fresh[kind] = hit[1]
        return hit[1]

    def _route(self, kind: str, x: torch.Tensor, state, step: int) -> tuple[Routing, Any, torch.Tensor | None]:
        router = self.mha_router if kind == "mha" else self.ffn_router
        k = min(self.k, self.slots[kind] + self.skip)
        picks = router.host_picks(k)
        if picks is not None:
            bias = router.step_bias[step].to(x.dtype)
            r = route_constant(
                bias, picks[step], x.shape[0], self.temperature, self.slots[kind], self._remap_table(kind)
            )
            return r, state, None
        logits, state = router(x, state, step)
        r = route(logits, k, self.temperature, self.slots[kind], self._remap(kind, x.device))
        aux = aux_load_balancing(logits, r, self.temperature) if self.training and torch.is_grad_enabled() else None
        return r, state, aux

    def forward(self, x: torch.Tensor, ctx: StepContext, first_layer: int, record: bool = False) -> BlockOutput:
        out = BlockOutput(x, [], [])
        fresh: dict[str, StackedPool | None] = {}
        s_mha = s_ffn = None
        for h in range(self.steps):
            a = self.mha_step(x, s_mha, h, ctx, first_layer + h, record, fresh)
            f = self.ffn_step(a.hidden, s_ffn, h, ctx, record, fresh, step_input=x)
            for part in (a, f):
                out.aux += [] if part.aux is None else [part.aux]
                out.records += [] if part.record is None else [part.record]
            x, s_mha, s_ffn = f.hidden, a.state, f.state
        out.hidden = x
        return out

    def mha_step(
        self,
        x: torch.Tensor,
        state: Any,
        h: int,
        ctx: StepContext,
        layer_idx: int,
        record: bool = False,
        fresh: dict | None = None,
    ) -> StepOutput:
        """Step h's attention half: route, attend, add to the residual stream."""
        r, state, aux = self._route("mha", x, state, h)
        y = x + self._attend(x, r, ctx, layer_idx, {} if fresh is None else fresh)
        return StepOutput(y, state, aux, StepRecord("mha", h, r, x, y) if record else None)

    def ffn_step(
        self,
        y: torch.Tensor,
        state: Any,
        h: int,
        ctx: StepContext,
        record: bool = False,
        fresh: dict | None = None,
        step_input: torch.Tensor | None = None,
    ) -> StepOutput:
        """Step h's feed-forward half: route, run the chosen FFN modules, add to the residual stream.
        With GPT-NeoX's parallel residual, the FFN reads the step's input (before attention)."""
        f = step_input if self.parallel and step_input is not None else y
        r, state, aux = self._route("ffn", f, state, h)
        x = y + self._feed_forward(f, r, ctx, {} if fresh is None else fresh)
        return StepOutput(x, state, aux, StepRecord("ffn", h, r, y, x) if record else None)

    def step(
        self,
        x: torch.Tensor,
        ctx: StepContext,
        first_layer: int,
        h: int,
        states: tuple,
        recorder: Any = None,
        block_id: int = 0,
    ) -> tuple[torch.Tensor, tuple]:
        """Step h alone; `states` are the routers' states before it (a caller may resume here), and
        `recorder` sees its routing."""
        a = self.mha_step(x, states[0], h, ctx, first_layer + h, recorder is not None)
        f = self.ffn_step(a.hidden, states[1], h, ctx, recorder is not None, step_input=x)
        if recorder is not None:
            record_steps(recorder, block_id, [a.record, f.record])
        return f.hidden, (a.state, f.state)

    def _feed_forward(self, x: torch.Tensor, r: Routing, ctx: StepContext, fresh: dict) -> torch.Tensor:
        run = lambda m, xs: self.ffn[str(m)](xs)
        if r.picks is not None:
            y = constant_modules(x, r, run, weighted=True)
            return x.new_zeros(x.shape) if y is None else y[0]
        stack = self._stacked("ffn", fresh) if ctx.dispatch == "grouped" else None
        if stack is None:
            return scatter_modules(x, r, run, (self.d,), weighted=True)[0]
        d = Dispatch.plan(r, stack.group_of, stack.n_groups)
        y = stack.ffn(x, d)
        if stack.others:  # modules the grouped path cannot stack (PEER) run one by one
            y = y + scatter_modules(x, r, run, (self.d,), weighted=True, only=stack.others)[0]
        return y

    def _attend(self, x: torch.Tensor, r: Routing, ctx: StepContext, layer_idx: int, fresh: dict) -> torch.Tensor:
        mods = self.mha
        track = self.skip or bool(self.removed["mha"])
        # Q, K and V are the plain sums of the chosen modules' projections (the paper's assembly);
        # only the output projections are weighted.
        qkv = lambda m, xs: mods[str(m)].qkv(xs)
        out = lambda m, xs: mods[str(m)].out(xs)
        valid = r.key_valid() if track else None
        if r.picks is not None:
            q_k_v = constant_modules(x, r, qkv, weighted=False)
            if q_k_v is None:  # every token skips: only keep the cache in step
                self.attn.skip_all(x, ctx, layer_idx, track)
                return x.new_zeros(x.shape)
            a = self.attn(*q_k_v, ctx, layer_idx, valid, track_valid=track, kind=self._kind(r))
            return constant_modules(a, r, out, weighted=True)[0]
        stack = self._stacked("mha", fresh) if ctx.dispatch == "grouped" else None
        if stack is None or stack.others or len(stack.kinds) > 1:
            q_k_v = scatter_modules(x, r, qkv, (self.attn_dim, self.kv_dim, self.kv_dim), False)
            a = self.attn(*q_k_v, ctx, layer_idx, valid, track_valid=track, kind=self._kind(r))
            return scatter_modules(a, r, out, (self.d,), weighted=True)[0]
        # One attention kind in the pool (the common case): nothing about it depends on the routing.
        d = Dispatch.plan(r, stack.group_of, stack.n_groups)
        q_k_v = d.unsort(stack.project_in(stack.normed_rows(x, d), d))
        a = self.attn.forward_qkv(q_k_v, ctx, layer_idx, valid, track, next(iter(stack.kinds)))
        return stack.project_out(a.index_select(0, d.tok), d)

    def _kind(self, r: Routing) -> Kind | MixedKinds:
        """The attention kind of the chosen modules; per token (its first choice) when they differ."""
        chosen = r.picks if r.picks is not None else r.groups
        kinds = {m: self.mha[str(m)].kind for m in chosen if m != r.skip_id}
        distinct = sorted(set(kinds.values()), key=str)
        if len(distinct) <= 1:
            return distinct[0] if distinct else self.attn.default_kind
        table = torch.zeros(r.n_modules, dtype=torch.long, device=r.idx.device)
        for m, kind in kinds.items():
            table[m] = distinct.index(kind)
        return MixedKinds(distinct, table[r.idx[:, 0]])


# ----------------------------------------------------------------------------- model

# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache`;
# the model takes either name and returns the one this transformers knows.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class MomModelOutput(BaseModelOutputWithPast):
    """The final hidden states, the cache, and the routers' mean load-balancing term (training)."""

    aux_loss: torch.FloatTensor | None = None


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
        # "grouped": one segment matmul per projection per step; "modules": the reference, one module at a time.
        self.dispatch = "grouped"
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
    ) -> MomModelOutput:
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
        if attention_mask is not None and attention_mask.dim() == 2 and not _all_on_host(attention_mask.bool()):
            pad = attention_mask[:, -(past + t) :].bool()
        ctx = self.context(x, position_ids, past, cache if use_cache else None, pad)

        h = x.reshape(b * t, -1)
        aux: list[torch.Tensor] = []
        layer = 0
        for plain in self.bottom:
            h = self._gradient_checkpointing_func(plain, h, ctx, layer) if checkpointed else plain(h, ctx, layer)
            layer += 1
        for i, block in enumerate(self.blocks):
            out = (
                self._checkpointed_block(block, h, ctx, layer)
                if checkpointed
                else block(h, ctx, layer, self.recorder is not None)
            )
            h = out.hidden
            aux += out.aux
            if self.recorder is not None:
                record_steps(self.recorder, i, out.records)
            layer += block.steps
        for plain in self.top:
            h = self._gradient_checkpointing_func(plain, h, ctx, layer) if checkpointed else plain(h, ctx, layer)
            layer += 1
        h = self.norm(h).view(b, t, -1)
        aux_loss = torch.stack(aux).mean() if aux else None
        return MomModelOutput(last_hidden_state=h, aux_loss=aux_loss, **{_CACHE_FIELD: cache})

    def rope_tables(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, signed_sin(sin)) per RoPE table: one, or one per attention type (Gemma 3's local
        and global bases)."""
        if not self.config.rope_per_type:
            tables = {"default": self.rotary_emb(x, position_ids)}
        else:
            types = set(self.config.attention_types or ["full_attention"])
            tables = {kind: self.rotary_emb(x, position_ids, layer_type=kind) for kind in sorted(types)}
        return {kind: (cos, signed_sin(sin)) for kind, (cos, sin) in tables.items()}

    def add_positions(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The embedded tokens (B, T, d) as the first layer sees them: scaled, plus learned positions."""
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x if self.embed_positions is None else x + self.embed_positions(position_ids)

    def context(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        past: int = 0,
        cache: Cache | None = None,
        pad: torch.Tensor | None = None,
    ) -> StepContext:
        """What every layer of a pass over x (B, T, d) shares: positions, cache, padding."""
        rope = self.rope_tables(x, position_ids) if self.rotary_emb is not None else {}
        return StepContext(
            batch=x.shape[0],
            seq=x.shape[1],
            past=past,
            cache=cache,
            rope=rope,
            pad_mask=pad,
            device=x.device,
            dispatch=self.dispatch,
        )

    def _checkpointed_block(self, block: MomBlock, h: torch.Tensor, ctx: StepContext, layer: int) -> BlockOutput:
        """A block whose activations are recomputed in backward. Its aux terms leave as a tensor
        output (so gradients reach them), and only the first run's routing is kept for the recorder."""
        first = BlockOutput(h, [], [])
        record = self.recorder is not None

        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = block(x, ctx, layer, record and not first.records)
            first.records = first.records or out.records
            return out.hidden, torch.stack(out.aux) if out.aux else x.new_zeros(0)

        first.hidden, terms = self._gradient_checkpointing_func(run, h)
        first.aux = list(terms.unbind(0))
        return first


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
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h, cache, aux_loss = out.last_hidden_state, getattr(out, _CACHE_FIELD), out.aux_loss
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head(h[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + self.config.aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, **{_CACHE_FIELD: cache})
