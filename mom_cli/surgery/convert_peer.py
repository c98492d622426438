"""`mom convert-peer`: dense FFN modules of a MoM become PEER layers built from their own neurons.

A dense FFN with d_ff neurons is already a sum of d_ff single-neuron experts, so each trained
neuron becomes one expert of a PEER layer (arXiv 2407.04153) and only retrieval has to be learned
(`mom_cli/surgery/peer_init.py: peer_from_dense`, "neuron init"). With `--calibrate DATA`, retrieval (query
networks, query BatchNorm, sub-keys) is then trained to reproduce each dense layer's output, with
the experts frozen (`mom_cli/peer_calibrate.py: calibrate`).

Built as a plan, validated, then executed (like `decompose`):
  plan      which pooled FFN modules (by origin layer), the PEER shape (N, h, k, d_key, gate), the
            init, the neurons dropped; every check that needs no weights happens here
  execute   with data: load the MoM and record, with forward hooks on the unconverted model, each
            selected module's input after its pre-norm (x) and its dense output (y), on the
            calibration tokens and on held-out tokens; build and calibrate each layer; measure it
            (oracle mass found, output error, expert usage) and the perplexity before and after;
            write the checkpoint: converted modules' tensors from the built layers, all others
            copied lazily from the input.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mom_cli.console import log, progress
from mom_cli.errors import UsageError
from mom_cli.io.atomic import releases_locks
from mom_cli.io.text import check_seq_len
from mom_cli.modeling.configuration_mom import MomConfig

INITS = ("neurons", "random")
ACTIVE_SHARE = 0.5  # default h*k: half of the FFN's neurons per token
CAPTURE_BUDGET = 2 * 2**30  # bytes of recorded (x, y) activations held at once; more layers take more passes


@dataclass
class ConvertOptions:
    layers: str
    experts: int | None = None  # N (default: the smallest perfect square >= the neurons kept)
    heads: int = 8  # h
    topk: int | None = None  # k per head (default: h*k = ACTIVE_SHARE of d_ff)
    key_dim: int = 128  # d_key, two halves of d_key/2
    gate: str | None = None  # default: none for --init neurons (the FFN's own sum), softmax for random
    init: str = "neurons"
    query_bn: bool = True
    shared_keys: bool = True
    drop_neurons: str | None = None  # "weakest" or neuron indexes ("0-99,512")
    calibrate: str | None = None  # DATA
    calib_tokens: int = 8192
    calib_steps: int = 30  # bench_convert_peer: more steps barely move the mass found (best state kept)
    seq_len: int = 512
    batch_size: int = 4
    eval_data: str | None = None  # default: DATA after the calibration tokens
    eval_tokens: int | None = None  # default: as many as calibration (8192 without --calibrate)
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: as stored
    seed: int = 0


@dataclass
class LayerPlan:
    """One pooled FFN module to convert, and the PeerLayer it becomes."""

    origin: int
    block: int
    slot: int
    drop: list[int] | None  # neurons left out (None: keep all; resolved from "weakest" at execution)
    peer: dict[str, Any]  # PeerLayer arguments (config.peer entry)

    @property
    def key(self) -> str:
        return f"{self.block}.{self.slot}"

    @property
    def prefix(self) -> str:
        from mom_cli.io.checkpoint import module_prefix

        return module_prefix("blocks", self.block, "ffn", self.slot)


# ----------------------------------------------------------------------------- the plan


def _ints(spec: str, what: str, limit: int) -> list[int]:
    """'10-19', '0,4,8', '3' -> sorted distinct ints; every value in 0..limit-1."""
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"{what} {spec!r}: use indexes and ranges such as 10-19 or 0,4,8")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if lo > hi:
            raise UsageError(f"{what} {spec!r}: range {lo}-{hi} is backwards; write {hi}-{lo}")
        if hi >= limit:
            raise UsageError(f"{what} {spec!r}: {hi} is out of range; there are {limit} (0-{limit - 1})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _num_layers(config: MomConfig) -> int:
    src = config.source_config
    n = src.get("num_hidden_layers") or src.get("n_layer")
    origins = [
        *config.bottom_layers,
        *config.top_layers,
        *(o for b in config.blocks for o in b["ffn"] if o is not None),
    ]
    return int(n) if n else max(origins) + 1


def _check_dense_ffn(config: MomConfig) -> None:
    """A PEER module is a pre-norm and one dense FFN: refuse the families whose FFN modules are more."""
    quirks = {
        "moe_block": config.moe_block,
        "post_norm": config.post_norm,
        "pre_norm": not config.pre_norm,
        "residual_multiplier": config.residual_multiplier != 1.0,
    }
    for name, on in quirks.items():
        if on:
            raise UsageError(f"convert-peer: {config.source_model_type} FFN modules ({name}) are not supported yet")


def select_modules(config: MomConfig, spec: str) -> list[tuple[int, int, int]]:
    """(origin, block, slot) of the FFN modules `--layers` names, by source layer index.

    `all`: every pooled FFN module not yet PEER; `middle`: the middle third of those (layers 10-19
    of a 30-layer model decomposed whole).
    """
    _check_dense_ffn(config)
    pooled = {o: (b, m) for b, s in enumerate(config.blocks) for m, o in enumerate(s["ffn"]) if o is not None}
    dense = sorted(o for o, (b, m) in pooled.items() if f"{b}.{m}" not in config.peer)
    if spec.strip() in ("all", "middle"):
        chosen = dense if spec.strip() == "all" else dense[len(dense) // 3 : len(dense) - len(dense) // 3]
        if not chosen:
            raise UsageError(f"--layers {spec}: this checkpoint has no dense pooled FFN module left to convert")
        return [(o, *pooled[o]) for o in chosen]
    n = _num_layers(config)
    out = []
    for o in _ints(spec, "--layers", n):
        if o in config.bottom_layers or o in config.top_layers:
            where = "bottom" if o in config.bottom_layers else "top"
            raise UsageError(
                f"--layers: layer {o} is a plain ({where}) layer; only FFN modules in MoM blocks can "
                f"become PEER: choose among {_ranges(dense)}"
            )
        if o not in pooled:
            raise UsageError(
                f"--layers: the FFN module of layer {o} was pruned from this checkpoint; choose among {_ranges(dense)}"
            )
        if f"{pooled[o][0]}.{pooled[o][1]}" in config.peer:
            raise UsageError(f"--layers: the FFN module of layer {o} is already PEER; choose among {_ranges(dense)}")
        out.append((o, *pooled[o]))
    return out


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3,7'."""
    if not values:
        return "(none)"
    parts, start = [], values[0]
    for a, b in zip(values, [*values[1:], None]):
        if b != a + 1:
            parts.append(f"{start}-{a}" if a > start else str(a))
            start = b
    return ",".join(parts)


def _smallest_square(n: int) -> int:
    """The default N: the smallest perfect square >= n (every neuron gets an expert)."""
    return (math.isqrt(n - 1) + 1) ** 2 if n > 1 else 1


def _square_hint(n: int) -> str:
    r = math.isqrt(max(n, 0))
    return f"{r * r} or {(r + 1) ** 2}" if r > 0 else "1"


def plan_layers(config: MomConfig, opts: ConvertOptions) -> list[LayerPlan]:
    """Check every option against the checkpoint and describe each module's PEER layer."""
    d_ff = config.intermediate_size
    if opts.init not in INITS:
        raise UsageError(f"unknown --init {opts.init!r}: use neurons or random")
    gate = opts.gate or ("none" if opts.init == "neurons" else "softmax")
    if gate not in ("softmax", "sigmoid", "none"):
        raise UsageError(f"unknown --gate {gate!r}: use softmax, sigmoid or none")
    if opts.heads < 1:
        raise UsageError("--heads must be >= 1")
    if opts.key_dim < 2 or opts.key_dim % 2:
        raise UsageError(f"--key-dim {opts.key_dim} must be even and >= 2 (the query splits into two halves)")
    if opts.init == "random" and (opts.calibrate or opts.drop_neurons):
        flag = "--calibrate" if opts.calibrate else "--drop-neurons"
        raise UsageError(f"{flag} needs --init neurons: a random PEER layer has no trained neurons to keep or retrieve")
    drop = _parse_drop(opts.drop_neurons, d_ff)
    n, kept = _experts(opts, d_ff, d_ff - len(drop))
    k = opts.topk if opts.topk is not None else max(1, round(ACTIVE_SHARE * d_ff / opts.heads))
    if not 1 <= k <= n:
        raise UsageError(f"--topk {k} must be between 1 and --experts {n}")
    if opts.init == "neurons":
        _check_neuron_init(kept, n, opts.heads, k, opts.key_dim)
    peer = dict(
        d_model=config.hidden_size,
        n_experts=n,
        heads=opts.heads,
        topk=k,
        key_dim=opts.key_dim,
        gated=config.gated_mlp,
        activation=config.hidden_act,
        gate=gate,
        query_bn=opts.query_bn,
        shared_keys=opts.shared_keys,
        in_bias=config.mlp_bias,
        out_bias=config.mlp_bias,
    )
    return [LayerPlan(o, b, m, drop or None, dict(peer)) for o, b, m in select_modules(config, opts.layers)]


def _experts(opts: ConvertOptions, d_ff: int, kept: int) -> tuple[int, int]:
    """(N, neurons that become experts). Every kept neuron needs an expert: N < kept is refused."""
    if opts.experts is None:
        if opts.drop_neurons == "weakest":
            raise UsageError("--drop-neurons weakest needs --experts N (the N strongest neurons are kept)")
        return _smallest_square(kept), kept
    n = opts.experts
    if n < 1 or math.isqrt(n) ** 2 != n:
        raise UsageError(f"--experts {n} is not a perfect square (product keys need N = n^2); use {_square_hint(n)}")
    if opts.init == "random":
        return n, 0
    if opts.drop_neurons == "weakest":
        kept = min(n, d_ff)
    if n < kept:
        raise UsageError(
            f"--experts {n} is fewer than the {kept} neurons of each FFN: pass --drop-neurons weakest "
            f"(or a list of neurons) to say which to leave out, or use --experts {_smallest_square(kept)}"
        )
    return n, kept


def _parse_drop(spec: str | None, d_ff: int) -> list[int]:
    """Neurons to leave out: [] for none or "weakest" (chosen later), else the indexes given."""
    if spec is None or spec == "weakest":
        return []
    drop = _ints(spec, "--drop-neurons", d_ff)
    if len(drop) >= d_ff:
        raise UsageError(f"--drop-neurons {spec} leaves no neuron of the {d_ff}; keep at least one")
    return drop


def _check_neuron_init(kept: int, n: int, heads: int, k: int, key_dim: int) -> None:
    """Neuron init's own limits (see peer_from_dense), checked before any weights are read."""
    from mom_cli.surgery.peer_init import grid_size

    n_sub = math.isqrt(n)
    if key_dim // 2 <= heads:
        raise UsageError(
            f"--key-dim {key_dim} is too small for {heads} heads: neuron init needs key-dim/2 > heads; "
            f"use --key-dim {2 * heads + 2} or more"
        )
    if n_sub < heads:
        raise UsageError(
            f"--experts {n} has sqrt(N) = {n_sub} < --heads {heads}; neuron init gives each head its own "
            f"rows of the key grid: use fewer heads or --experts {heads * heads} or more"
        )
    rows, cols = grid_size(kept, n_sub, heads, 1.0)
    if heads > 1 and (rows // heads) * cols < k:
        raise UsageError(
            f"--topk {k} is more than the {(rows // heads) * cols} experts each of the {heads} heads owns; "
            f"use fewer --heads or a smaller --topk"
        )


# ----------------------------------------------------------------------------- activations


@dataclass
class Captured:
    """Per module key: its inputs after the pre-norm (x) and dense outputs (y), float32 on CPU."""

    x: dict[str, torch.Tensor] = field(default_factory=dict)
    y: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.inference_mode()
def capture(
    model: Any, plans: list[LayerPlan], batches: torch.Tensor, batch_size: int, device: str, label: str
) -> Captured:
    """Run the (unconverted) model over `batches`, recording each selected module's x and y.

    Layers are recorded in groups that fit CAPTURE_BUDGET, one pass over the data per group.
    """
    d = model.config.hidden_size
    per_layer = 2 * batches.numel() * d * 4
    group = max(1, CAPTURE_BUDGET // max(per_layer, 1))
    got = Captured()
    for g in range(0, len(plans), group):
        chunk = plans[g : g + group]
        xs: dict[str, list[torch.Tensor]] = {p.key: [] for p in chunk}
        ys: dict[str, list[torch.Tensor]] = {p.key: [] for p in chunk}
        handles = []
        for p in chunk:
            module = model.model.blocks[p.block].ffn[str(p.slot)]

            def hook(mod, args, out, key=p.key):
                xs[key].append(mod.norm(args[0]).float().cpu())
                ys[key].append(out.float().cpu())

            handles.append(module.register_forward_hook(hook))
        try:
            with progress() as bar:
                task = bar.add_task(label, total=batches.shape[0])
                for i in range(0, batches.shape[0], batch_size):
                    model(input_ids=batches[i : i + batch_size].to(device), use_cache=False)
                    bar.advance(task, min(batch_size, batches.shape[0] - i))
        finally:
            for h in handles:
                h.remove()
        for key in xs:
            got.x[key], got.y[key] = torch.cat(xs[key]), torch.cat(ys[key])
    return got


def ffn_dtype(reader: Any, config: MomConfig, prefix: str) -> torch.dtype:
    """The dtype the dense FFN at `prefix` is stored in: its PEER layer is saved in it too."""
    return reader.dtype(prefix + ("up_proj.weight" if config.gated_mlp else "fc_in.weight"))


def dense_rows(reader: Any, config: MomConfig, prefix: str) -> dict[str, torch.Tensor | None]:
    """The dense FFN at `prefix` as one row per neuron (peer_from_dense's arguments)."""

    def get(name: str) -> torch.Tensor | None:
        return reader.get(prefix + name) if config.mlp_bias or not name.endswith("bias") else None

    if config.gated_mlp:
        return dict(
            w_in=get("up_proj.weight"),
            b_in=get("up_proj.bias"),
            w_gate=get("gate_proj.weight"),
            b_gate=get("gate_proj.bias"),
            w_out=get("down_proj.weight").t(),
            out_bias=get("down_proj.bias"),
        )
    return dict(
        w_in=get("fc_in.weight"),
        b_in=get("fc_in.bias"),
        w_gate=None,
        b_gate=None,
        w_out=get("fc_out.weight").t(),
        out_bias=get("fc_out.bias"),
    )


@torch.no_grad()
def neuron_strength(rows: dict[str, torch.Tensor | None], act: str, x: torch.Tensor | None) -> torch.Tensor:
    """How much each neuron adds to the FFN's output: mean |a_i(x)| ||v_i|| over x (the oracle's
    measure), or without data ||u_i|| ||v_i|| (times ||g_i|| when gated)."""
    from transformers.activations import ACT2FN

    u, v, g = rows["w_in"].float(), rows["w_out"].float(), rows["w_gate"]
    if x is None:
        s = u.norm(dim=1) * v.norm(dim=1)
        return s if g is None else s * g.float().norm(dim=1)
    from mom_cli.modeling.peer import expert_activations

    def f32(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float()

    total = torch.zeros(u.shape[0])
    fn = ACT2FN[act]
    for xc in x.split(1024):
        total += expert_activations(xc, u, f32(rows["b_in"]), f32(g), f32(rows["b_gate"]), fn).abs().sum(0)
    return total / x.shape[0] * v.norm(dim=1)


def build_layer(
    plan: LayerPlan,
    rows: dict[str, torch.Tensor | None],
    calib_x: torch.Tensor | None,
    keep: torch.Tensor | None,
    init: str,
    seed: int,
) -> Any:
    """The PeerLayer of one module, in float32 on CPU (neuron init fits keys to calib_x when given)."""
    from mom_cli.surgery.peer_init import peer_from_dense

    p = plan.peer
    try:
        with torch.random.fork_rng(devices=[]):  # --init random: reproducible per layer, caller's RNG untouched
            torch.manual_seed(seed + 7919 * plan.origin)
            return peer_from_dense(
                rows["w_in"],
                rows["b_in"],
                rows["w_gate"],
                rows["w_out"],
                rows["out_bias"],
                p["n_experts"],
                p["heads"],
                p["topk"],
                p["key_dim"],
                b_gate=rows["b_gate"],
                activation=p["activation"],
                gate=p["gate"],
                query_bn=p["query_bn"],
                shared_keys=p["shared_keys"],
                keep=keep,
                init=init,
                calib_x=calib_x,
                seed=seed + plan.origin,
            )
    except ValueError as e:  # a limit of the layer or its init that the plan could not see
        raise UsageError(f"layer {plan.origin}: {e}") from e


def round_to(layer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the layer's float tensors through the checkpoint dtype, so what is measured is what is saved."""
    with torch.no_grad():
        for t in [*layer.parameters(), *layer.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))


# ----------------------------------------------------------------------------- report


@dataclass
class LayerReport:
    module: str  # "block.slot"
    origin: int
    n_experts: int
    heads: int
    topk: int
    key_dim: int
    gate: str
    neurons_kept: int
    params_total: int
    params_active_per_token: int
    calib_error_before: float | None = None  # relative output error on the calibration tokens
    calib_error_after: float | None = None
    calib_seconds: float | None = None
    oracle_mass_found: float | None = None  # held-out: share of the oracle's top-h*k mass retrieved
    output_error: float | None = None  # held-out: sum ||peer(x) - dense(x)||^2 / sum ||dense(x)||^2
    expert_usage: float | None = None  # held-out: share of the N experts retrieved at least once
    usage_kl_uniform: float | None = None  # held-out: KL(accumulated router weights || uniform)


@dataclass
class ConvertReport:
    path: Path
    init: str
    calibrated: bool
    layers: list[LayerReport]
    heldout_perplexity: tuple[float, float] | None
    heldout_tokens: int
    params: tuple[int, int]
    active_params: tuple[int, int]
    flops: tuple[int, int]

    def as_dict(self) -> dict[str, Any]:
        pair = lambda t: {"before": t[0], "after": t[1]}  # noqa: E731
        return {
            "path": str(self.path),
            "init": self.init,
            "calibrated": self.calibrated,
            "layers": [asdict(r) for r in self.layers],
            "heldout_perplexity": None if self.heldout_perplexity is None else pair(self.heldout_perplexity),
            "heldout_tokens": self.heldout_tokens,
            "params_total": pair(self.params),
            "params_active_per_token": pair(self.active_params),
            "flops_per_token": pair(self.flops),
        }


@torch.no_grad()
def measure(layer: Any, x: torch.Tensor, y: torch.Tensor, rep: LayerReport) -> None:
    """Held-out quality of a built layer (eval mode): oracle mass found, output error, usage."""
    from mom_cli.surgery.peer_calibrate import relative_error
    from mom_cli.surgery.peer_init import oracle_mass_fraction, usage_stats

    layer.eval()
    rep.output_error = relative_error(layer, x, y)
    rep.oracle_mass_found = oracle_mass_fraction(layer, x)
    scores, idx = layer.retrieve(x)
    stats = usage_stats(idx, layer.n_experts, layer.gate_weights(scores))
    rep.expert_usage, rep.usage_kl_uniform = stats["usage"], stats["kl_uniform"]


# ----------------------------------------------------------------------------- the command


def converted_config(config: MomConfig, plans: list[LayerPlan], layers: dict[str, Any], record: dict) -> MomConfig:
    new = MomConfig.from_dict(config.to_dict())
    new.peer = {**config.peer, **{p.key: layers[p.key].config_dict() for p in plans}}
    new.mom_provenance = [*config.mom_provenance, record]
    return new


def output_tensors(reader: Any, new: MomConfig, plans: list[LayerPlan], layers: dict[str, Any]) -> list:
    """Every tensor of the new checkpoint: PEER tensors from the built layers, the rest copied lazily."""
    from mom_cli.io.checkpoint import param_shapes
    from mom_cli.io.tensorio import PlannedTensor

    built: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for p in plans:
        dtype = ffn_dtype(reader, new, p.prefix)
        for name, t in layers[p.key].state_dict().items():
            built[f"{p.prefix}peer.{name}"] = t
            dtypes[f"{p.prefix}peer.{name}"] = dtype if t.is_floating_point() else t.dtype
    out = []
    for name, shape in param_shapes(new).items():
        if name in built:
            out.append(PlannedTensor(name, shape, dtypes[name], lambda t=built[name]: t))
        else:
            out.append(PlannedTensor(name, shape, reader.dtype(name), lambda name=name: reader.get(name)))
    return out


@dataclass
class Measured:
    """What the data gives: the unconverted model, its recorded activations, held-out perplexity."""

    model: Any
    calib: Captured | None
    held: Captured | None
    held_blocks: torch.Tensor | None
    ppl_before: float | None = None


def _ppl(model: Any, batches: torch.Tensor, batch_size: int, device: str) -> float:
    from mom_cli.analysis.evaluate import perplexity

    return math.exp(perplexity(model, batches, batch_size, device)[0])


def _load_data(ckpt: Path, opts: ConvertOptions) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
    """(model, calibration blocks, held-out blocks); every data error comes before any log line."""
    from mom_cli.io.loading import load_model
    from mom_cli.io.text import calibration_split

    model, tokenizer = load_model(str(ckpt), opts.device, opts.dtype)
    return (
        model,
        *calibration_split(
            tokenizer, opts.calibrate, opts.calib_tokens, opts.seq_len, opts.eval_data, opts.eval_tokens
        ),
    )


def _record(
    model: Any,
    calib_blocks: torch.Tensor | None,
    held_blocks: torch.Tensor | None,
    plans: list[LayerPlan],
    opts: ConvertOptions,
) -> Measured:
    """Record the selected modules' activations, and the held-out perplexity, before conversion."""
    m = Measured(model, None, None, held_blocks)
    if calib_blocks is not None:
        m.calib = capture(model, plans, calib_blocks, opts.batch_size, opts.device, "recording calibration activations")
    if held_blocks is not None:
        m.held = capture(model, plans, held_blocks, opts.batch_size, opts.device, "recording held-out activations")
        m.ppl_before = _ppl(model, held_blocks, opts.batch_size, opts.device)
    return m


def _swap_in(model: Any, plans: list[LayerPlan], layers: dict[str, Any], device: str) -> None:
    """Put the built PEER layers into the loaded model in place of the dense modules."""
    from mom_cli.modeling.modeling_mom import PeerFfnModule

    for p in plans:
        pool = model.model.blocks[p.block].ffn
        module = PeerFfnModule(model.config, layers[p.key].config_dict())
        module.norm.load_state_dict(pool[str(p.slot)].norm.state_dict())
        module.peer = layers[p.key]
        pool[str(p.slot)] = module.to(device).eval()


@releases_locks
def convert_peer(ckpt: Path, out: Path, opts: ConvertOptions, force: bool = False) -> ConvertReport:
    from mom_cli.analysis.info import summary
    from mom_cli.io import provenance
    from mom_cli.io.atomic import atomic_dir, check_output
    from mom_cli.io.checkpoint import copy_extras, read_mom, write_checkpoint

    check_output(out, force)  # fail before calibrating for minutes
    if opts.seq_len < 2 or opts.batch_size < 1 or opts.calib_steps < 0:
        raise UsageError("--seq-len must be >= 2, --batch-size >= 1 and --calib-steps >= 0")
    if opts.calibrate and opts.calib_tokens < opts.seq_len:
        raise UsageError(
            f"--calib-tokens {opts.calib_tokens} is less than one --seq-len {opts.seq_len}; "
            f"give more tokens or a shorter --seq-len"
        )
    config, reader = read_mom(ckpt)
    plans = plan_layers(config, opts)
    if opts.calibrate or opts.eval_data:
        check_seq_len(opts.seq_len, config.max_position_embeddings)
    data = _load_data(ckpt, opts) if opts.calibrate or opts.eval_data else None
    first = plans[0].peer
    log(
        f"convert-peer {ckpt}: {len(plans)} FFN module(s) (layers {_ranges([p.origin for p in plans])}) -> PEER "
        f"N={first['n_experts']}, h={first['heads']}, k={first['topk']}, d_key={first['key_dim']}, "
        f"gate {first['gate']}, init {opts.init}"
    )
    m = None if data is None else _record(*data, plans, opts)

    layers: dict[str, Any] = {}
    reports: list[LayerReport] = []
    for p in plans:
        layers[p.key], rep = _convert_one(p, reader, config, opts, m)
        reports.append(rep)
    ppl = None
    if m is not None and m.held is not None:
        _swap_in(m.model, plans, layers, opts.device)
        ppl = (m.ppl_before, _ppl(m.model, m.held_blocks, opts.batch_size, opts.device))

    layers = {k: v.cpu() for k, v in layers.items()}
    record = provenance.record(
        "convert-peer",
        {
            **{k: v for k, v in asdict(opts).items() if k != "device"},
            "layers": [p.origin for p in plans],
            "modules": [p.key for p in plans],
            "heldout_perplexity": None if ppl is None else list(ppl),
        },
        str(ckpt),
    )
    new = converted_config(config, plans, layers, record)
    with atomic_dir(out, force) as tmp, progress() as bar:
        tensors = output_tensors(reader, new, plans, layers)
        task = bar.add_task("writing tensors", total=len(tensors))
        write_checkpoint(tmp, new, tensors, lambda d: copy_extras(ckpt, d), on_tensor=lambda t: bar.advance(task))
    before, after = summary(config, get=reader.get), summary(new, get=reader.get)
    return ConvertReport(
        out,
        opts.init,
        m is not None and m.calib is not None,
        reports,
        ppl,
        0 if ppl is None else m.held_blocks.numel(),
        (before["params_total"], after["params_total"]),
        (before["params_active_per_token"], after["params_active_per_token"]),
        (before["flops_per_token"], after["flops_per_token"]),
    )


def _convert_one(
    p: LayerPlan, reader: Any, config: MomConfig, opts: ConvertOptions, m: Measured | None
) -> tuple[Any, LayerReport]:
    """Build (and calibrate) one layer on opts.device, in float32, and measure it."""
    from mom_cli.analysis.info import peer_costs

    rows = dense_rows(reader, config, p.prefix)
    calib, held = (None, None) if m is None else (m.calib, m.held)
    x, y = (None, None) if calib is None else (calib.x[p.key], calib.y[p.key])
    keep = _kept_neurons(p, rows, config, x) if opts.init == "neurons" else None
    layer = build_layer(p, rows, x, keep, opts.init, opts.seed)
    costs = peer_costs(layer.config_dict())
    rep = LayerReport(
        p.key,
        p.origin,
        layer.n_experts,
        layer.heads,
        layer.topk,
        layer.key_dim,
        layer.gate,
        config.intermediate_size if keep is None else keep.numel(),
        costs["params_total"],
        costs["params_active"],
    )
    layer = layer.to(opts.device)
    if x is not None and opts.calib_steps > 0:
        _calibrate(layer, x.to(opts.device), y.to(opts.device), p.origin, opts, rep)
    layer.eval()
    round_to(layer, ffn_dtype(reader, config, p.prefix))
    if held is not None:
        measure(layer, held.x[p.key].to(opts.device), held.y[p.key].to(opts.device), rep)
    return layer, rep


def _calibrate(
    layer: Any, x: torch.Tensor, y: torch.Tensor, origin: int, opts: ConvertOptions, rep: LayerReport
) -> None:
    """Train the layer's retrieval to reproduce the dense outputs y, with a progress bar."""
    from mom_cli.surgery.peer_calibrate import calibrate

    with progress() as bar:
        task = bar.add_task(f"calibrating layer {origin}", total=opts.calib_steps)

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, description=f"calibrating layer {origin} (loss {loss:.3g})")

        res = calibrate(layer, x, y, steps=opts.calib_steps, seed=opts.seed, on_step=on_step)
    rep.calib_error_before, rep.calib_error_after, rep.calib_seconds = res.loss_before, res.loss_after, res.seconds
    log(f"layer {origin}: calibration error {res.loss_before:.4f} -> {res.loss_after:.4f} ({res.seconds:.0f}s)")


def _kept_neurons(p: LayerPlan, rows: dict, config: MomConfig, x: torch.Tensor | None) -> torch.Tensor | None:
    """The neurons that become experts: all, all but the listed ones, or the N strongest."""
    d_ff = config.intermediate_size
    if p.drop:
        dropped = torch.zeros(d_ff, dtype=torch.bool)
        dropped[p.drop] = True
        return (~dropped).nonzero().flatten()
    n = p.peer["n_experts"]
    if n >= d_ff:
        return None
    strength = neuron_strength(rows, config.hidden_act, x)  # "weakest": drop the d_ff - N weakest
    return strength.topk(n).indices.sort().values
