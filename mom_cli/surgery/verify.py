"""`mom decompose` checks its own work: the written modules compute what the source's layers do.

A few tokens run through the source's own `transformers` model, one sublayer resident at a time
(a meta-device skeleton, each attention, MLP or norm filled from the lazy reader just before it
runs and emptied when the next one starts; a layer that reads its sublayers' weights itself is
filled whole); each layer's input and output are kept. Then each source layer's MHA and FFN modules, read
back from the written checkpoint into a MoM plain layer, run on that same input; the embeddings
and the head are checked the same way. Everything runs in float32, so a difference beyond float
rounding is a mapping error, not precision.

A family whose source layers cannot be filled from the checkpoint's own tensor names (transformers
converts them when it loads) is checked on the whole model instead, when it is small enough.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mom_cli.errors import MomError
from mom_cli.io.lazy import empty, fill, fill_buffers, is_empty

TOKENS = 8
TOLERANCE = 1e-4  # of the output's scale, when the modules hold the source's tensors bit for bit
FULL_MODEL_MAX_BYTES = 4 * 10**9  # the full-model fallback loads both models in float32


@dataclass
class Verdict:
    method: str  # "per-layer", "full-model" or "skipped"
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None  # of the scale of what was compared (a layer's update, the logits)
    worst: str | None = None
    tolerance: float | None = None
    tokens: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _NotStandalone(Exception):
    """The source model cannot be filled tensor by tensor from its checkpoint."""


class _Worst:
    def __init__(self, tolerance: float) -> None:
        self.tolerance, self.abs, self.rel, self.where = tolerance, 0.0, 0.0, ""

    def add(self, where: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> None:
        diff = (got.float() - want.float()).abs().max().item()
        rel = diff / max(scale.float().abs().max().item(), 1e-12)
        if rel > self.rel or not self.where:
            self.abs, self.rel, self.where = diff, rel, where
        if not rel <= self.tolerance:  # NaN fails too
            raise MomError(
                f"verification failed at {where}: max |Δ| {diff:.3g} ({rel:.3g} of its scale) is beyond the "
                f"float tolerance {self.tolerance:.0e}; the family's tensor mapping is wrong, nothing was written"
            )


def tolerance_for(exact_copy: bool, dtype: torch.dtype) -> float:
    """Float rounding alone when the tensors were copied as they are; else that of the cast too."""
    return TOLERANCE if exact_copy else max(TOLERANCE, 8 * torch.finfo(dtype).eps)


def verify(source: Any, ckpt: Path, config: Any, tolerance: float) -> Verdict:
    """Compare the MoM checkpoint written at `ckpt` with `source`, layer by layer."""
    from mom_cli.console import log

    ids = _tokens(source.config, config.vocab_size)
    worst = _Worst(tolerance)
    try:
        try:
            trace = _source_trace(source, ids, by_sublayer=True)
        except _NotStandalone:  # a layer that reads its sublayers' weights itself: fill it whole
            trace = _source_trace(source, ids, by_sublayer=False)
    except _NotStandalone as e:
        return _full_model(source, ckpt, config, ids, worst, f"its layers cannot run standalone ({e})")
    try:
        _compare(trace, ckpt, config, ids, worst)
    except MomError as e:
        # A layer whose runtime needs more than its index (a scale tied to the depth it came
        # from, ...) may differ alone yet be exact in place: the whole model settles it.
        if not _full_model_possible(source, config):
            raise
        try:
            return _full_model(source, ckpt, config, ids, _Worst(tolerance), f"the per-layer check disagreed ({e})")
        except MomError:
            raise e from None
    log(
        f"verified: {len(trace.layers)} layers, embeddings and head equal the source's within {worst.abs:.2g} "
        f"(max relative {worst.rel:.2g}, at {worst.where})"
    )
    return Verdict("per-layer", worst.abs, worst.rel, worst.where, tolerance, ids.shape[1])


def _tokens(cfg: Any, vocab: int) -> torch.Tensor:
    n = TOKENS
    window = getattr(cfg, "sliding_window", None)
    if isinstance(window, int) and window > 1:
        n = min(n, window)  # a layer run alone sees no window mask; within it the window is moot
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- the source's side


@dataclass
class _Trace:
    embedded: torch.Tensor  # the first layer's input
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (input, output) of each layer, (1, T, d)
    logits: torch.Tensor  # of the source's head on its final hidden states
    final_input: torch.Tensor  # the last layer's output, before the final norm


def _source_skeleton(cfg: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(cfg)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=False, dtype=torch.float32).eval()
    except Exception as e:  # transformers cannot build this config: nothing to run it with
        raise _NotStandalone(f"transformers cannot build {type(cfg).__name__}: {e}") from e


def _layer_list(base: nn.Module, n: int) -> tuple[str, nn.ModuleList]:
    for name, m in base.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return name, m
    raise _NotStandalone(f"no list of {n} decoder layers in {type(base).__name__}")


def _getter(source: Any, prefix: str) -> tuple[Callable[[str], torch.Tensor], Callable[[str], bool]]:
    """Tensors by the skeleton's base-model names; checkpoints store them with or without the prefix."""
    keys = source.reader.keys()

    def resolve(name: str) -> str | None:
        for k in (prefix + name, name):
            if k in keys:
                return k
        return None

    def get(name: str) -> torch.Tensor:
        k = resolve(name)
        if k is None:
            raise _NotStandalone(f"the checkpoint has no tensor {prefix + name}")
        return source.reader.get(k)

    return get, lambda name: resolve(name) is not None


class _Resident:
    """One sublayer of a layer in memory at a time, on the source's side and the MoM's: each is
    filled when it is called and the one before it emptied (a 7B layer is 0.8 GB in float32, its
    FFN alone 0.54 GB)."""

    def __init__(self, load: Callable[[nn.Module, str], None]) -> None:
        self.load, self.current = load, None

    def watch(self, module: nn.Module, prefix: str) -> None:
        def hook(m: nn.Module, args: tuple) -> None:
            if self.current is not m:
                self.evict()
            if is_empty(m):  # filled again if called again after another sublayer
                self.load(m, prefix)
            self.current = m

        module.register_forward_pre_hook(hook)

    def evict(self) -> None:
        if self.current is not None:
            empty(self.current)
            self.current = None


@torch.no_grad()
def _source_trace(source: Any, ids: torch.Tensor, by_sublayer: bool) -> _Trace:
    model = _source_skeleton(source.config)
    base = model.base_model
    prefix = f"{model.base_model_prefix}." if base is not model else ""
    get, has = _getter(source, prefix)
    list_name, layers = _layer_list(base, _num_layers(source.config))
    init = model._init_weights
    fill_buffers(model, init)
    for name, child in base.named_children():
        if child is not layers and name != list_name:
            _fill_source(child, f"{name}.", get, has, init)
    embed = base.get_input_embeddings()
    embed.register_forward_hook(lambda m, a, out: (empty(m), out.float())[1])  # used once: free it at once
    seen: list[list[torch.Tensor]] = []
    resident = _Resident(lambda m, prefix: _fill_source(m, prefix, get, has, init))

    def before(i: int):
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            if not by_sublayer:
                _fill_source(m, f"{list_name}.{i}.", get, has, init)
            x = args[0] if args else kwargs["hidden_states"]
            seen.append([x.detach().clone()])

        return hook

    def after(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        seen[-1].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        resident.evict()
        empty(m)

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(before(i), with_kwargs=True)
        layer.register_forward_hook(after, with_kwargs=True)
        if by_sublayer:
            if any(True for _ in layer.parameters(recurse=False)):
                raise _NotStandalone("the layer holds weights of its own")
            for name, child in layer.named_children():
                if any(True for _ in child.parameters()):
                    resident.watch(child, f"{list_name}.{i}.{name}.")
    try:
        out = base(input_ids=ids, use_cache=False)
    except _NotStandalone:
        raise
    except Exception as e:  # a model whose forward the skeleton cannot run
        raise _NotStandalone(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    final = out[0] if isinstance(out, tuple) else out.last_hidden_state
    head = model.get_output_embeddings()
    embed_name = next(n for n, m in base.named_modules() if m is embed)
    stored = source.reader.keys()

    def head_get(name: str) -> torch.Tensor:  # the head's own tensor, or the tied embeddings
        return source.reader.get(name) if name in stored else get(f"{embed_name}.{name.removeprefix('lm_head.')}")

    _fill_source(head, "lm_head.", head_get, stored.__contains__, init)
    logits = head(final)
    empty(head)
    return _Trace(seen[0][0], [(a, b) for a, b in seen], logits, seen[-1][1])


def _fill_source(module: nn.Module, prefix: str, get: Callable, has: Callable, init: Callable) -> None:
    """Fill a source submodule in float32 from the checkpoint's tensors, shapes checked."""
    try:
        fill(module, prefix, get, has, init, torch.float32)
    except ValueError as e:
        raise _NotStandalone(str(e)) from e


def _num_layers(cfg: Any) -> int:
    from mom_cli.families import family_for

    return family_for(cfg.model_type).num_layers(cfg)


# ----------------------------------------------------------------------------- the MoM's side


def _origins(config: Any) -> dict[int, tuple[str, str]]:
    """Source layer -> (its MHA module's prefix, its FFN module's prefix) in the checkpoint."""
    out: dict[int, list[str]] = {}
    for where in ("bottom", "top"):
        for i, o in enumerate(getattr(config, f"{where}_layers")):
            out[o] = [f"model.{where}.{i}.mha.", f"model.{where}.{i}.ffn."]
    for b, spec in enumerate(config.blocks):
        for kind, j in (("mha", 0), ("ffn", 1)):
            for m, o in enumerate(spec[kind]):
                if o is not None:
                    out.setdefault(o, ["", ""])[j] = f"model.blocks.{b}.{kind}.{m}."
    return {o: (p[0], p[1]) for o, p in out.items()}


@torch.no_grad()
def _compare(trace: _Trace, ckpt: Path, config: Any, ids: torch.Tensor, worst: _Worst) -> None:
    from mom_cli.io.checkpoint import meta_model
    from mom_cli.io.tensorio import SafetensorsReader
    from mom_cli.modeling.modeling_mom import PlainLayer

    reader = SafetensorsReader(ckpt)
    keys = reader.keys()
    tied = lambda n: reader.get("model.embed_tokens.weight" if n == "lm_head.weight" and n not in keys else n)
    model = meta_model(config).eval()
    inner, init = model.model, model._init_weights
    load = lambda m, p: fill(m, p, tied, keys.__contains__, init, torch.float32)
    fill_buffers(model, init)
    pos = torch.arange(ids.shape[1])[None]
    load(inner.embed_tokens, "model.embed_tokens.")
    if inner.embed_positions is not None:
        load(inner.embed_positions, "model.embed_positions.")
    x = inner.add_positions(inner.embed_tokens(ids), pos)
    empty(inner.embed_tokens)
    worst.add("the embeddings", x, trace.embedded, trace.embedded)
    for i, (x_in, y) in enumerate(trace.layers):
        mha, ffn = _origins(config)[i]
        with torch.device("meta"):
            layer = PlainLayer(config)
        resident = _Resident(load)
        load(layer.mha, mha)  # the layer calls its MHA module's methods, never the module: filled here
        resident.current = layer.mha  # and replaced by the FFN module when that one runs
        resident.watch(layer.ffn, ffn)
        ctx = inner.context(x_in, pos)
        got = layer(x_in.reshape(-1, x_in.shape[-1]), ctx, i).view_as(y)
        worst.add(f"layer {i} (modules {mha.rstrip('.')} and {ffn.rstrip('.')})", got, y, y - x_in)
        resident.evict()
        empty(layer)
    load(inner.norm, "model.norm.")
    load(model.lm_head, "lm_head.")
    logits = model.lm_head(inner.norm(trace.final_input))
    worst.add("the final norm and head", logits, trace.logits, trace.logits)


# ----------------------------------------------------------------------------- the fallback


def _identity_plan(config: Any) -> bool:
    """Whether the decomposition's routing is the source's function (each step one module, weight 1)."""
    return config.router_top_k == 1 and all(spec["steps"] == len(spec["mha"]) for spec in config.blocks)


def _full_model_possible(source: Any, config: Any) -> bool:
    from mom_cli.io.checkpoint import param_shapes

    size = 4 * sum(torch.Size(s).numel() for s in param_shapes(config).values())
    return size <= FULL_MODEL_MAX_BYTES and _identity_plan(config) and not source.gguf


@torch.no_grad()
def _full_model(source: Any, ckpt: Path, config: Any, ids: torch.Tensor, worst: _Worst, why: str) -> Verdict:
    from transformers import AutoModelForCausalLM

    import mom_cli
    from mom_cli.console import warn

    if not _full_model_possible(source, config):
        note = f"not verified: {why}, and the model is too large or its plan not the source's function for a full-model check"
        warn(note)
        return Verdict("skipped", note=note)
    warn(f"verifying on the whole model: {why}")
    src = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, trust_remote_code=False).eval()
    want = src(ids, use_cache=False).logits
    del src
    got = mom_cli.load(ckpt, dtype=torch.float32).eval()(ids, use_cache=False).logits
    worst.add("the logits (whole model)", got, want, want)
    return Verdict("full-model", worst.abs, worst.rel, worst.where, worst.tolerance, ids.shape[1], note=why)
