"""`mom heal`: win back the quality a lossy surgery cost, by distillation from the source model.

regions    what the surgeries changed, found in the checkpoint: converted PEER layers, pruned
           modules, and blocks whose routing no longer follows the source layer by layer
           (compressed, or trained routers). A region is a span of the residual stream between
           two positions of the source model: position 2l is the input of layer l, 2l+1 the
           input of its FFN, 2L the input of the final norm. Regions never overlap (overlaps merge).
trains     PEER: the layer's experts, queries and keys; a pruned module: the next FOLLOW live
           modules of its block; a block: its routers and modules. `retrieval` trains only PEER
           queries, keys and routers; `all` every parameter inside the region.
stage 1    local: the teacher's residual stream at every region's input and output is cached on
           disk (bf16, memory-mapped, at most `cache_size` bytes). Each region then learns to map
           its cached input to its cached output (MSE; KL through the final norm and head when the
           region ends at the top), one after another. With `local_inputs` "student" (the default,
           one rank), a region reads the student's own state at its input instead, which the
           regions before it in its block (trained by then) changed: see StudentInputs. A PEER
           layer's queries and keys also learn,
           with weight `retrieval_loss`, to retrieve the experts whose contributions are largest
           (see retrieval_term). A token budget fills the cache before the
           first step; a time budget fills it on demand, the teacher taking at most half of the
           stage's time (see local_stage).
stage 2    global: end-to-end KL distillation to the teacher of the same parameters.
budget     tokens (2M, 500k, 131072) or wall time (30m, 90s, 2h); `local_share` of it goes to
           stage 1, split evenly over the regions. Uppercase M is millions, lowercase m minutes.
           A token budget fixes every step, so `resume` is bit-exact; a time budget continues
           with the time that was left. The clock starts after loading (checkpoint, data, teacher)
           and the held-out perplexities before healing, each logged with its time; see Clock.
state      `OUT.heal-state/` beside the output: state.pt (atomic), the teacher cache and
           heal_metrics.jsonl; removed when the output is written unless `keep_state`.
ranks      under torchrun: stage 1 gives region i to rank i mod world and then shares the
           results (each region on the teacher's inputs, so that they train at once); stage 2 is
           DDP (see `distributed`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from mom_cli import console
from mom_cli.console import log, warn
from mom_cli.errors import MomError, UsageError
from mom_cli.training import distributed, optim
from mom_cli.training import train as tr

TRAIN_MODES = ("auto", "retrieval", "all")
LOCAL_INPUTS = ("student", "teacher")
FOLLOW = 2  # live modules after a pruned one that learn to make up for it
METRICS_FILE = "heal_metrics.jsonl"
STATE_FILE = "state.pt"
LOCAL_EVAL_BLOCKS = 4  # cached sequences kept out of stage 1 to measure each region's error
FILL_BATCHES = 16  # micro-batches per on-demand teacher pass (time budgets)
FILL_SHARE = 0.5  # of stage 1's time at most in teacher passes (time budgets)
REFIT_BATCHES = 8  # micro-batches of cached rows a PEER layer's output vectors are refitted on
REFIT_RIDGE = 0.1  # the refit's pull towards the current vectors, relative to the mean activation energy
REFIT_MAX_EXPERTS = 8192  # above this, the refit's N x N system is too large to solve: skipped


@dataclass
class HealOptions:
    data: str
    teacher: str | None = None  # default: the source model in the provenance
    budget: str | None = None  # tokens or a duration (see parse_budget); default: one pass over DATA
    train: str = "auto"
    local_share: float = 0.3
    local_inputs: str = "student"  # stage 1 feeds a region the student's state ("student") or the teacher's
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 3e-4  # stage 1 (per region)
    retrieval_loss: float = 1.0  # stage 1: weight of a PEER layer's retrieval term (0: output error alone)
    global_lr: float = 1e-3  # stage 2 (bench_heal: 1e-3 beat 1e-4 on PEER 25%/50% and prune 8)
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    cache_size: str = "4G"  # bytes of cached teacher states at most
    eval_data: str | None = None
    eval_tokens: int = 32768
    device: str = "auto"
    dtype: str = "auto"
    save_every: int = 0
    eval_every: int = 0  # held-out perplexity every N steps, besides before and after
    resume: bool = False
    keep_state: bool = False
    seed: int = 0
    stop_after: int | None = None  # library only: stop after this many steps as if killed


@dataclass
class Budget:
    tokens: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.tokens:,} tokens" if self.tokens is not None else f"{self.seconds:g} s"


@dataclass
class Region:
    """A span [start, end) of source positions and the student parameters that learn it."""

    name: str
    cause: str  # the operation that made it: convert-peer, prune, decompose or train-routers
    block: int
    start: int
    end: int
    units: list[tuple[str, int]]  # ("mha" | "ffn", step) of an aligned block, or ("block", 0)
    params: list[str]
    steps: int = 0
    tokens: int = 0
    error_before: float | None = None
    error_after: float | None = None
    # what the errors measure: "relative error" (relative_error), or "KL" (nats per token, through
    # the final norm and head) for a region that ends at the top, whose loss leaves the residual's
    # scale free (the final norm removes it), so its relative error can grow while it heals
    metric: str = "relative error"

    def report(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("units", "params")} | {"params": len(self.params)}


@dataclass
class HealResult:
    path: Path | None
    teacher: str
    budget: str
    regions: list[dict[str, Any]]
    trainable_params: int
    local_tokens: int
    local_seconds: float
    global_steps: int
    global_tokens: int
    global_seconds: float
    kl_first: float | None
    kl_last: float | None
    eval_ppl_teacher: float | None
    eval_ppl_before: float | None
    eval_ppl_after: float | None
    heldout_tokens: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, held-out perplexity)
    main: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "main"}


# ----------------------------------------------------------------------------- options


_SIZE = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
_TIME = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def parse_budget(text: str) -> Budget:
    """'2M', '500k', '131072' -> tokens; '30m', '90s', '2h', '1.5h' -> wall time."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text or "")
    if m and m[2] in _SIZE and int(float(m[1]) * _SIZE[m[2]]) >= 1:
        return Budget(tokens=int(float(m[1]) * _SIZE[m[2]]))
    if m and m[2] in _TIME and float(m[1]) > 0:
        return Budget(seconds=float(m[1]) * _TIME[m[2]])
    raise UsageError(f"--budget {text!r} is not a number of tokens (2M, 500k, 131072) or a duration (30m, 90s, 2h)")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKMG]?)i?B?\s*", text)
    if not m:
        raise UsageError(f"--cache-size {text!r} is not a size in bytes (4G, 500M)")
    return int(float(m[1]) * {"": 1, "k": 2**10, "K": 2**10, "M": 2**20, "G": 2**30}[m[2]])


def check_options(o: HealOptions) -> Budget | None:
    if o.train not in TRAIN_MODES:
        raise UsageError(f"unknown --train {o.train!r}: use one of {', '.join(TRAIN_MODES)}")
    if o.schedule not in tr.SCHEDULES:
        raise UsageError(f"unknown --schedule {o.schedule!r}: use cosine or constant")
    if not 0 <= o.local_share <= 1:
        raise UsageError("--local-share must be between 0 and 1")
    if o.local_inputs not in LOCAL_INPUTS:
        raise UsageError(f"unknown --local-inputs {o.local_inputs!r}: use student or teacher")
    if o.retrieval_loss < 0:
        raise UsageError("--retrieval-loss must be >= 0 (0: PEER layers learn from the output error alone)")
    if o.batch_size < 1 or o.seq_len < 2 or min(o.save_every, o.eval_every) < 0 or min(o.lr, o.global_lr) <= 0:
        raise UsageError(
            "--batch-size must be >= 1, --seq-len >= 2, --save-every and --eval-every >= 0 and learning rates > 0"
        )
    if o.dtype in ("fp16", "float16"):
        raise UsageError("mom heal runs in bf16 or fp32: use --dtype bf16, fp32 or auto")
    if o.dtype != "auto" and o.dtype not in tr.DTYPES:
        raise UsageError(f"unknown --dtype {o.dtype!r}: use bf16, fp32 or auto")
    parse_size(o.cache_size)
    return parse_budget(o.budget) if o.budget is not None else None


# ----------------------------------------------------------------------------- regions


def block_starts(config: Any) -> list[int]:
    """The source layer each block starts at: blocks follow the bottom layers, one pool after another."""
    starts, s = [], len(config.bottom_layers)
    for b in config.blocks:
        starts.append(s)
        s += len(b["mha"])
    return starts


def num_positions(config: Any) -> int:
    """2L: the final norm's input (L source layers)."""
    return 2 * (len(config.bottom_layers) + sum(len(b["mha"]) for b in config.blocks) + len(config.top_layers))


@torch.no_grad()
def aligned(block: nn.Module, spec: dict[str, Any], top_k: int) -> bool:
    """Step h runs exactly source layer h (as decompose leaves it): constant routers whose step
    bias picks slot h. Then the block can be cut anywhere between modules."""
    m = len(spec["mha"])
    if top_k != 1 or spec["steps"] != m or len(spec["ffn"]) != m:
        return False
    for router in (block.mha_router, block.ffn_router):
        if bool(torch.count_nonzero(router.head.weight)) or router.step_bias.shape[0] != m:
            return False
        if not torch.equal(router.step_bias.argmax(-1).cpu(), torch.arange(m)):
            return False
    return True


def _module_params(model: nn.Module, prefix: str, mode: str) -> list[str]:
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    if mode == "all":
        return names
    peer = [n for n in names if ".peer." in n]
    if peer:  # a PEER module: its experts, queries and keys
        return [n for n in peer if tr.group_of(n) == "peer_retrieval"] if mode == "retrieval" else peer
    return [] if mode == "retrieval" else names


def causes(config: Any) -> set[str]:
    return {r.get("command") for r in config.mom_provenance}


def find_regions(model: nn.Module, config: Any, mode: str) -> list[Region]:
    """Every changed span of the checkpoint, with the parameters that learn it (see the docstring)."""
    ops = causes(config)
    regions: list[Region] = []
    blocks = model.model.blocks
    for i, (spec, s) in enumerate(zip(config.blocks, block_starts(config))):
        m = len(spec["mha"])
        prefix = f"model.blocks.{i}."
        if not aligned(blocks[i], spec, config.router_top_k):
            names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
            if mode != "all":
                names = [n for n in names if "_router." in n or mode == "auto" or tr.group_of(n) == "peer_retrieval"]
            compressed = spec["steps"] != m or config.router_top_k != 1
            cause = "train-routers" if "train-routers" in ops and not compressed else "decompose"
            regions.append(Region(f"block {i}", cause, i, 2 * s, 2 * (s + m), [("block", 0)], names))
            continue
        live = [(kind, h) for h in range(m) for kind in ("mha", "ffn") if spec[kind][h] is not None]
        spans: list[tuple[int, int, str, list[tuple[str, int]]]] = []
        for h in range(m):
            if f"{i}.{h}" in config.peer and spec["ffn"][h] is not None:
                p = position(s, h, "ffn")
                spans.append((p, p + 1, "convert-peer", [("ffn", h)]))
            for kind in ("mha", "ffn"):
                if spec[kind][h] is None:
                    p = position(s, h, kind)
                    after = [u for u in live if position(s, u[1], u[0]) > p][:FOLLOW]
                    if not after:
                        warn(
                            f"the pruned {kind.upper()} module of layer {s + h} has no live module after it in "
                            f"block {i}: nothing learns to make up for it"
                        )
                        continue
                    last = after[-1]
                    spans.append((p, position(s, last[1], last[0]) + 1, "prune", after))
        for a, b, cause, trained in _merge(spans):
            units = span_units(s, m, a, b)
            names = [n for kind, h in trained for n in _module_params(model, f"{prefix}{kind}.{h}.", mode)]
            regions.append(Region(f"positions {a}-{b} (layers {a // 2}-{(b - 1) // 2})", cause, i, a, b, units, names))
    top = num_positions(config)
    for r in regions:
        r.metric = "KL" if r.end == top else r.metric  # what region_loss trains it on
    return [r for r in regions if r.params]


def position(s: int, h: int, kind: str) -> int:
    """The input position of unit (kind, h) of a block that starts at source layer s."""
    return 2 * (s + h) + (kind == "ffn")


def pruned_positions(config: Any) -> list[int]:
    """The input position of every pruned module (a region may leave one out: see find_regions)."""
    return [
        position(s, h, kind)
        for spec, s in zip(config.blocks, block_starts(config))
        for kind in ("mha", "ffn")
        for h, slot in enumerate(spec[kind])
        if slot is None
    ]


def span_units(s: int, m: int, a: int, b: int) -> list[tuple[str, int]]:
    """The units of a block starting at source layer s (m layers) whose input positions lie in [a, b)."""
    return [(kind, h) for h in range(m) for kind in ("mha", "ffn") if a <= position(s, h, kind) < b]


def _merge(spans: list) -> list[tuple[int, int, str, list[tuple[str, int]]]]:
    """Overlapping spans become one region: their union, trained modules and causes together."""
    out: list[list] = []
    for a, b, cause, trained in sorted(spans, key=lambda x: x[0]):
        if out and a < out[-1][1]:
            last = out[-1]
            last[1] = max(last[1], b)
            last[2] = last[2] if cause in last[2].split("+") else f"{last[2]}+{cause}"
            last[3] += [u for u in trained if u not in last[3]]
        else:
            out.append([a, b, cause, list(trained)])
    return [tuple(x) for x in out]


# ----------------------------------------------------------------------------- running a region


def step_context(model: nn.Module, b: int, t: int, x: torch.Tensor) -> Any:
    """What the attention of a region needs for b sequences of t tokens at positions 0..t-1."""
    pos = torch.arange(t, device=x.device)[None].expand(b, -1)
    return model.model.context(x.view(b, t, -1), pos)


def run_region(model: nn.Module, region: Region, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The student from the region's input to its output: x (B, T, d) -> (B, T, d), with the
    routers' load-balancing terms (training only)."""
    b, t, d = x.shape
    ctx = step_context(model, b, t, x)
    block = model.model.blocks[region.block]
    h, aux = x.reshape(b * t, d), []
    for kind, step in region.units:
        if kind == "block":
            out = block(h, ctx, 0)
            h, aux = out.hidden, aux + out.aux
            continue
        half = block.mha_step(h, None, step, ctx, 0) if kind == "mha" else block.ffn_step(h, None, step, ctx)
        h, aux = half.hidden, aux + ([] if half.aux is None else [half.aux])
    return h.view(b, t, d), aux


def student_from(model: nn.Module, p: int, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The student's logits from its residual stream h (B, T, d) at position p, a position inside a
    block that follows its source layer by layer, or a block's start: the rest of that block, the
    blocks after it, the top layers, the final norm and the head; with the routers' aux terms."""
    cfg, mom = model.config, model.model
    b, t, d = h.shape
    starts = block_starts(cfg)
    i = max(j for j, s in enumerate(starts) if 2 * s <= p)
    s, m = starts[i], len(cfg.blocks[i]["mha"])
    units = [("block", 0)] if p == 2 * s else span_units(s, m, p, 2 * (s + m))
    x, aux = run_region(model, Region("rest", "", i, p, 2 * (s + m), units, []), h)
    x, ctx, layer = x.reshape(b * t, d), step_context(model, b, t, h), s + m
    for block in mom.blocks[i + 1 :]:
        out = block(x, ctx, layer)
        x, aux, layer = out.hidden, aux + out.aux, layer + block.steps
    for plain in mom.top:
        x, layer = plain(x, ctx, layer), layer + 1
    return model.head(mom.norm(x).view(b, t, d)), aux


def token_scale(target: torch.Tensor) -> torch.Tensor:
    """1 / the RMS of each token's target residual: (..., 1). See as_seen."""
    return target.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12).rsqrt()


def as_seen(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """h per token divided by the target residual's RMS: an error as the next layer's RMSNorm sees it.

    Why: a few tokens carry residuals hundreds of times larger than the rest (SmolLM2's layer 11
    FFN writes 100% of its output's squared norm at position 0, measured on the Python docs), so a
    plain MSE on the residual stream trains that layer on position 0 alone. The next norm divides
    each token by its own RMS, so this is the error that reaches the rest of the model.
    """
    return h.float() * token_scale(target)


def region_loss(model: nn.Module, region: Region, top: int, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE on the residual stream as the next norm sees it (as_seen); KL through the final norm and
    head when the region ends at the top."""
    if region.end == top:
        head = lambda h: model.lm_head(model.model.norm(h))  # noqa: E731
        with torch.no_grad():
            t_logits = head(target)
        return tr.kl_to_teacher(head(y), t_logits)
    return as_seen(y.float() - target.float(), target).pow(2).mean()


def relative_error(y: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> float:
    """||y - target||^2 / ||target - x||^2, each token's terms as the next norm sees them (as_seen):
    0 is exact, 1 is as far off as leaving the region out."""
    scale, t = token_scale(target), target.float()
    miss = ((y.float() - t) * scale).pow(2).sum()
    change = ((t - x.float()) * scale).pow(2).sum()
    return float(miss / change.clamp_min(1e-12))


@contextmanager
def timed(what: str, into: list[str] | None = None) -> Iterator[None]:
    """Log how long `what` took (or keep the line in `into`, to log once the run is known to start):
    every second before the first step is accounted for on stderr."""
    t0 = time.perf_counter()
    yield
    line = f"{what}: {time.perf_counter() - t0:.1f} s"
    log(line) if into is None else into.append(line)


# ----------------------------------------------------------------------------- the teacher cache


class _Enough(Exception):
    """Raised by the hook of the last cached position: the teacher's pass can stop there."""


def residual_taps(teacher: nn.Module, family: Any) -> list[nn.Module]:
    """The teacher's module that reads the residual stream at each position 0..2L (its first
    argument is the stream): pre-norms, or OLMo 2's sublayers, then the final norm."""
    layers_path, attn_in, ffn_in, final = family.residual_inputs
    taps = [layer.get_submodule(n) for layer in teacher.get_submodule(layers_path) for n in (attn_in, ffn_in)]
    return taps + [teacher.get_submodule(final)]


def _stream(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]  # OLMo 2's attention takes keywords


class TeacherCache:
    """The teacher's residual stream at some positions, one (n, T, d) bf16 memory-mapped file per
    position (stored as int16 bits: numpy has no bf16). Row j holds the data block `source[j]`;
    rows [0, filled) are written, in order, by `grow`; cache.json records how many (atomically,
    after the rows are flushed), so a resumed run keeps them."""

    def __init__(self, folder: Path, positions: list[int], source: np.ndarray, seq_len: int, d: int) -> None:
        self.folder, self.positions, self.source = folder, positions, source
        self.shape = (len(source), seq_len, d)
        self.maps: dict[int, np.memmap] = {}
        self.filled, self.fill_seconds = 0, 0.0

    def meta(self, key: dict[str, Any]) -> dict[str, Any]:
        return {"key": key, "positions": self.positions, "shape": list(self.shape)}

    def open(self, key: dict[str, Any]) -> None:
        """Reopen the rows a previous run filled with the same key, or start an empty cache."""
        path = self.folder / "cache.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        if {k: saved.get(k) for k in ("key", "positions", "shape")} == self.meta(key):
            self.filled, self.fill_seconds = saved["filled"], saved["fill_seconds"]
            self._map("r+")
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._map("w+")  # sparse files: unfilled rows take no disk
        self._save(key)

    def _map(self, mode: str) -> None:
        self.maps = {
            p: np.memmap(self.folder / f"pos{p}.bf16", dtype=np.int16, mode=mode, shape=self.shape)
            for p in self.positions
        }

    def _save(self, key: dict[str, Any]) -> None:
        from mom_cli.io.atomic import atomic_file

        with atomic_file(self.folder / "cache.json", True) as tmp:
            tmp.write_text(json.dumps(self.meta(key) | {"filled": self.filled, "fill_seconds": self.fill_seconds}))

    def grow(
        self,
        upto: int,
        teacher: nn.Module,
        family: Any,
        blocks: np.ndarray,
        batch_size: int,
        device: str,
        key: dict[str, Any],
        autocast: Callable,
    ) -> None:
        """Fill rows [filled, upto): one teacher pass, up to the last cached position only; hooks on
        the modules that read the residual stream (pre-norms, or OLMo 2's sublayers) catch every
        position at once."""
        upto = min(upto, self.shape[0])
        if upto <= self.filled:
            return
        t0 = time.perf_counter()
        rows: slice = slice(0, 0)

        def keep(pos: int):
            def hook(mod, args, kwargs):
                self.maps[pos][rows] = as_bits(_stream(args, kwargs)).reshape(-1, *self.shape[1:])
                if pos == last:  # the layers above (and the head) would only be thrown away
                    raise _Enough

            return hook

        taps = residual_taps(teacher, family)
        last = max(self.positions)
        hooks = [taps[p].register_forward_pre_hook(keep(p), with_kwargs=True) for p in self.positions]
        try:
            with torch.no_grad(), console.progress() as bar:
                task = bar.add_task("caching the teacher", total=upto - self.filled)
                for i in range(self.filled, upto, batch_size):
                    rows = slice(i, min(i + batch_size, upto))
                    x = torch.from_numpy(blocks[self.source[rows]].astype(np.int64)).to(device)
                    with autocast(), suppress(_Enough):
                        teacher(input_ids=x, use_cache=False)
                    bar.update(task, completed=rows.stop - self.filled)
        finally:
            for h in hooks:
                h.remove()
        for m in self.maps.values():
            m.flush()
        seconds = time.perf_counter() - t0
        if self.filled == 0 or seconds >= 1:  # the first pass, and those worth a line (local_stage sums up)
            log(
                f"teacher cache: rows {self.filled}-{upto} of {self.shape[0]} in {seconds:.1f} s "
                f"({(upto - self.filled) * self.shape[1] / seconds:,.0f} tokens/s)"
            )
        self.filled, self.fill_seconds = upto, self.fill_seconds + seconds
        self._save(key)

    def read(self, pos: int, rows: torch.Tensor, device: str) -> torch.Tensor:
        return read_rows(self.maps[pos], rows, device)


def read_rows(bits: np.memmap, rows: torch.Tensor, device: str) -> torch.Tensor:
    """Rows of a bf16 memmap (int16 bits) as a float32 tensor on `device`."""
    idx = rows.reshape(-1).numpy()
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):  # a slice: no gather
        part = bits[idx[0] : idx[0] + idx.size]
    else:
        part = bits[idx]
    return torch.from_numpy(np.ascontiguousarray(part)).view(torch.bfloat16).to(device).float()


def as_bits(h: torch.Tensor) -> np.ndarray:
    """A tensor as the int16 bits of its bf16 values, for a memmap (numpy has no bf16)."""
    return h.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy()


def chain_head(regions: list[Region], i: int) -> int:
    """The first region of region i's chain: the regions before it in the same aligned block
    (whole-block regions stand alone). Stage 1 feeds region i the student's own state, which the
    regions of its chain before it have changed."""
    while i > 0 and _linked(regions[i - 1], regions[i]):
        i -= 1
    return i


def _linked(a: Region, b: Region) -> bool:
    return a.block == b.block and "block" not in (a.units[0][0], b.units[0][0])


class StudentInputs:
    """The student's residual stream at the start of the region that trains (stage 1 with
    `local_inputs` "student"), for the cache rows the teacher has filled.

    Why: a region trained on the teacher's input learns its own error only, and the errors of a
    chain of regions then compound until stage 2. Fed the state the regions before it (already
    trained) actually give it, a region learns to map that to the teacher's output: it also makes
    up for what those before it still miss, at stage 1's cost (as in sequential calibration,
    llm-compressor's and GPTQ's "true sequential").

    Two memmaps take turns: region i's rows go to slot i % 2, carried from slot (i-1) % 2 through
    region i-1 and the unchanged modules up to region i. student.json, saved after each flush,
    records each slot's region and valid rows. A run that can resume (`save_every`) saves its
    state at every region's end, so a resumed one finds its region's slot intact (the next region
    wrote the other) and reuses it, bit for bit; a crash mid-write redoes only that write. Rows the
    teacher fills later run from the chain's first cached input, in one go rather than rounded to
    bf16 at each region's start as the carried ones are: either is the student to bf16 rounding.

    A region's errors (relative_error) are then measured on these inputs, so they include what the
    regions before it miss: they are not comparable with errors on the teacher's inputs.
    """

    def __init__(self, run: Heal, cache: TeacherCache) -> None:
        self.run, self.cache = run, cache
        self.path = cache.folder / "student.json"
        self.region: int | None = None  # the region whose input the rows hold; None: the teacher's
        self.filled = 0
        self.maps: dict[int, np.memmap] = {}

    def _slots(self) -> dict[str, dict[str, int]]:
        """Slot ("0", "1") -> {"region", "filled"}, as last saved."""
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def _map(self, slot: int, fresh: bool = False) -> np.memmap:
        path = self.cache.folder / f"student{slot}.bf16"
        mode = "w+" if fresh or not path.exists() else "r+"
        self.maps.pop(slot, None)  # the old map first: "w+" truncates the file it maps
        self.maps[slot] = np.memmap(path, dtype=np.int16, mode=mode, shape=self.cache.shape)
        return self.maps[slot]

    def _save(self) -> None:
        from mom_cli.io.atomic import atomic_file

        slot = self.region % 2
        self.maps[slot].flush()
        slots = self._slots() | {str(slot): {"region": self.region, "filled": self.filled}}
        with atomic_file(self.path, True) as tmp:
            tmp.write_text(json.dumps(slots))

    def prepare(self, i: int) -> None:
        """Make rows [0, filled) hold the student's state at region i's start."""
        regions = self.run.regions
        head = chain_head(regions, i)
        if head == i:
            self.region = None
            return
        slots = self._slots()
        mine, before = slots.get(str(i % 2), {}), slots.get(str((i - 1) % 2), {})
        self.region = i
        if mine.get("region") == i:
            self.filled = mine["filled"]
            self._map(i % 2)
        elif before.get("region") == i - 1 and i - 1 != head:
            src, dst = self._map((i - 1) % 2), self._map(i % 2, fresh=True)
            read = lambda rows: read_rows(src, rows, self.run.device)  # noqa: E731
            self._run(regions[i].block, regions[i - 1].start, regions[i].start, read, dst, 0, before["filled"])
            self.filled = before["filled"]
            self._save()
        else:
            self._map(i % 2, fresh=True)
            self.filled = 0
        self.extend()

    def extend(self) -> None:
        """Rows the teacher filled since: from the chain's first cached input up to the region."""
        if self.region is None or self.filled >= self.cache.filled:
            return
        start = self.run.regions[chain_head(self.run.regions, self.region)].start
        end = self.run.regions[self.region].start
        read = lambda rows: self.cache.read(start, rows, self.run.device)  # noqa: E731
        block = self.run.regions[self.region].block
        self._run(block, start, end, read, self.maps[self.region % 2], self.filled, self.cache.filled)
        self.filled = self.cache.filled
        self._save()

    @torch.no_grad()
    def _run(self, block: int, a: int, b: int, read: Callable, into: np.memmap, lo: int, hi: int) -> None:
        """The student (in eval mode, as it will run) from position a to b of a block, over rows [lo, hi)."""
        run = self.run
        spec, s = run.config.blocks[block], block_starts(run.config)[block]
        span = Region("span", "", block, a, b, span_units(s, len(spec["mha"]), a, b), [])
        was = run.model.training
        run.model.eval()
        try:
            for i in range(lo, hi, run.opts.batch_size):
                rows = torch.arange(i, min(i + run.opts.batch_size, hi))
                with run.autocast():
                    y, _ = run_region(run.model, span, read(rows))
                into[i : i + len(rows)] = as_bits(y)
        finally:
            run.model.train(was)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        return read_rows(self.maps[self.region % 2], rows, self.run.device)


def _same_model(a: str, b: str) -> bool:
    """Two model references name the same model: the same hub id, or the same local folder."""
    pa, pb = Path(a), Path(b)
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


# ----------------------------------------------------------------------------- the run


class Heal:
    """Model, teacher, regions, data, budget and state of one healing run."""

    def __init__(
        self, ckpt: Path, out: Path, opts: HealOptions, budget: Budget | None, d: distributed.Dist, device: str
    ) -> None:
        from mom_cli.families import family_for
        from mom_cli.io.checkpoint import read_mom
        from mom_cli.io.loading import load_model

        self.ckpt, self.out, self.opts, self.dist, self.device = ckpt, out, opts, d, device
        self.config, _ = read_mom(ckpt)
        if opts.teacher is None and not self.config.mom_provenance:
            raise UsageError(
                f"{ckpt} records no provenance, so neither its changes nor its source are known; "
                "pass the model it was made from: --teacher MODEL"
            )
        if opts.seq_len > self.config.max_position_embeddings:
            raise UsageError(
                f"--seq-len {opts.seq_len} is longer than the model's {self.config.max_position_embeddings} "
                f"positions; use --seq-len {self.config.max_position_embeddings} or less"
            )
        self.teacher_ref = opts.teacher or tr.source_model(ckpt, self.config, "--teacher MODEL")
        # bf16 on a CPU too, where it is native: a SmolLM2 heal step takes 4.9 s instead of 6.4 (2 cores)
        self.amp = tr.amp_dtype(opts.dtype, device, cpu_bf16=True)
        self.load_times: list[str] = []
        with timed(f"loading {ckpt}", self.load_times):
            self.model, self.tokenizer = load_model(str(ckpt), device, torch.float32)
        self.family = family_for(self.config.source_model_type)
        if self.family.residual_inputs is None:
            raise UsageError(
                f"heal: {self.config.source_model_type} teachers are not supported yet "
                "(attention and FFN read the same input: no residual stream between them to cache)"
            )
        self.model.train()
        self.model.requires_grad_(False)
        self.regions = find_regions(self.model, self.config, opts.train)
        self.top = num_positions(self.config)
        self.named = dict(self.model.named_parameters())
        self.trainable = sorted({n for r in self.regions for n in r.params})
        self.coef = self.config.aux_loss_coef if any(r.units[0][0] == "block" for r in self.regions) else 0.0
        with timed("reading the data", self.load_times):
            self._data(budget)
        with timed(f"loading the teacher {self.teacher_ref}", self.load_times):
            self.teacher = tr.load_teacher(self.teacher_ref, self.config, device, self.amp, "--teacher MODEL")
        self.work = out.parent / f"{out.name}.heal-state"
        self.cursor = {"stage": "local", "region": 0, "step": 0, "global_step": 0, "tokens": 0, "elapsed": 0.0}
        self.opt_state: dict[str, Any] | None = None

    def _data(self, budget: Budget | None) -> None:
        o = self.opts
        topts = tr.TrainOptions(
            data=o.data,
            seq_len=o.seq_len,
            batch_size=o.batch_size,
            eval_data=o.eval_data,
            eval_tokens=o.eval_tokens,
            seed=o.seed,
        )
        self.blocks, self.heldout = tr.split_data(topts, self.tokenizer, self.dist)
        if self.blocks.shape[0] == 0:
            raise UsageError(
                f"data {o.data} is shorter than one sequence of --seq-len {o.seq_len}; give more text "
                "or a smaller --seq-len"
            )
        self.step_tokens = o.batch_size * o.seq_len
        self.budget = budget or Budget(tokens=int(self.blocks.size))
        d = self.config.hidden_size
        positions = sorted({p for i, r in enumerate(self.regions) if self._owns(r) for p in self._reads(i)})
        chained = self.sequential and any(chain_head(self.regions, i) != i for i in range(len(self.regions)))
        slots = 2 if chained else 0  # StudentInputs' two memmaps
        per_block = (max(1, len(positions)) + slots) * o.seq_len * d * 2
        n = min(self.blocks.shape[0], max(1, parse_size(o.cache_size) // per_block))
        if self.budget.tokens is not None and self.regions:
            local = self.budget.tokens * o.local_share / len(self.regions)
            n = min(n, max(1, math.ceil(local / o.seq_len)) + LOCAL_EVAL_BLOCKS)
        self.local_eval = min(LOCAL_EVAL_BLOCKS, n // 5)
        # cache rows: a seeded sample of the blocks, the held-out ones first (see local_stage)
        g = torch.Generator().manual_seed(o.seed)
        self.cache_source = torch.randperm(self.blocks.shape[0], generator=g)[:n].numpy()
        self.cache_positions = positions

    @property
    def sequential(self) -> bool:
        """Stage 1 on the student's own inputs (StudentInputs): one rank only, since a region then
        waits for the regions before it."""
        return self.opts.local_inputs == "student" and self.dist.world == 1

    @cached_property
    def shared_bottom(self) -> int | None:
        """The first changed position, where stage 2's student may take the teacher's state (see
        global_losses); None where it may not: another teacher, several ranks, training that
        changed weights outside the regions (train-routers --train all or --lora), or routers'
        load-balancing terms (they average over every routed step, those below too)."""
        first = min([r.start for r in self.regions] + pruned_positions(self.config), default=0)
        prov = self.config.mom_provenance
        source = prov[0].get("source") if prov else None
        elsewhere = any(
            r.get("command") == "train-routers"
            and (r.get("args", {}).get("train") == "all" or r.get("args", {}).get("lora"))
            for r in prov
        )
        if first == 0 or self.dist.active or self.coef or elsewhere or source is None:
            return None
        return first if _same_model(self.teacher_ref, source) else None

    @cached_property
    def trainable_count(self) -> int:
        return sum(self.named[n].numel() for n in self.trainable)

    @cached_property
    def bottom_tap(self) -> nn.Module:
        """The teacher's module that reads the residual stream at shared_bottom (see global_losses)."""
        return residual_taps(self.teacher, self.family)[self.shared_bottom]

    def _reads(self, i: int) -> tuple[int, ...]:
        """The cached positions region i reads: its end, and its start unless it takes the student's."""
        r = self.regions[i]
        return (r.end,) if self.sequential and chain_head(self.regions, i) != i else (r.start, r.end)

    def _owns(self, region: Region) -> bool:
        return self.regions.index(region) % self.dist.world == self.dist.rank

    # ------------------------------------------------------------------- state

    def fingerprint(self) -> dict[str, Any]:
        from mom_cli.io import tokencache

        o = self.opts
        data = o.data if o.data.startswith("hf:") else tokencache.cache_path(o.data, self.tokenizer).name
        return {
            "checkpoint": str(self.ckpt.resolve()),
            "data": data,
            "teacher": self.teacher_ref,
            "budget": str(self.budget),
            "train": o.train,
            "local_share": o.local_share,
            "local_inputs": o.local_inputs,
            "seq_len": o.seq_len,
            "batch_size": o.batch_size,
            "lr": o.lr,
            "retrieval_loss": o.retrieval_loss,
            "global_lr": o.global_lr,
            "schedule": o.schedule,
            "weight_decay": o.weight_decay,
            "seed": o.seed,
            "dtype": str(self.amp),
            "ranks": self.dist.world,
            "regions": [r.name for r in self.regions],
        }

    def prepare_state_dir(self, force: bool) -> None:
        tr.prepare_state_dir(self.work, "healing", self.opts.resume, force, self.dist, self.load_state)

    def save_state(self, opts: list[torch.optim.Optimizer]) -> None:
        if not self.dist.main:
            return
        state = {
            "cursor": dict(self.cursor),
            "fingerprint": self.fingerprint(),
            "params": {n: self.named[n].detach().cpu().clone() for n in self.trainable},
            "buffers": {n: b.detach().cpu().clone() for n, b in self.model.named_buffers()},
            "opt": [o.state_dict() for o in opts],
            "regions": [r.report() for r in self.regions],
            "rng": tr.rng_state(),
        }
        tr.save_state_file(self.work / STATE_FILE, state)

    def load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MomError(f"cannot read the healing state {path}: {e}; start over with --force") from e
        saved, now = state["fingerprint"], self.fingerprint()
        diff = [f"{k} ({saved.get(k)} saved, {now[k]} now)" for k in now if saved.get(k) != now[k]]
        if diff:
            raise UsageError(
                f"--resume: the saved run differs in {', '.join(diff[:3])}; run with its options, "
                "or --force without --resume to start over"
            )
        with torch.no_grad():
            for n, v in state["params"].items():
                self.named[n].copy_(v)
            buffers = dict(self.model.named_buffers())
            for n, v in state["buffers"].items():
                buffers[n].copy_(v)
        for r, saved_r in zip(self.regions, state["regions"]):
            r.steps, r.tokens = saved_r["steps"], saved_r["tokens"]
            r.error_before, r.error_after = saved_r["error_before"], saved_r["error_after"]
        self.cursor = state["cursor"]
        self.opt_state = state["opt"]
        tr.restore_rng(state["rng"])
        log(f"resuming {self.work} at step {self.cursor['global_step']} ({self.cursor['stage']} stage)")

    # ------------------------------------------------------------------- pieces

    def autocast(self):
        if self.amp == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.amp)

    def optimizers(self, names: list[str], lr: float) -> list[torch.optim.Optimizer]:
        """AdamW for dense parameters, RowSparseAdam for PEER expert tables (only retrieved rows move)."""
        dense = [(n, self.named[n]) for n in names if tr.group_of(n) != "peer_experts" or self.opts.train == "all"]
        rows = [self.named[n] for n in names if tr.group_of(n) == "peer_experts" and self.opts.train != "all"]
        for n in names:
            self.named[n].requires_grad_(True)
        opts: list[torch.optim.Optimizer] = []
        if dense:
            opts.append(optim.adamw(dense, lr, self.opts.weight_decay, self.device))
        if rows:
            opts.append(optim.RowSparseAdam(rows, lr=lr, weight_decay=self.opts.weight_decay))
        if self.opt_state is not None:  # resuming inside this stage or region
            for o, sd in zip(opts, self.opt_state):
                o.load_state_dict(sd)
            self.opt_state = None
        return opts

    def step(
        self, opts: list[torch.optim.Optimizer], params: list[nn.Parameter], loss: torch.Tensor, lr: float
    ) -> None:
        loss.backward()
        if self.opts.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.opts.max_grad_norm)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr
            o.step()
            o.zero_grad(set_to_none=True)

    def lr(self, peak: float, progress: float) -> float:
        """The schedule of train-routers over the fraction of this stage's budget spent."""
        return peak * optim.schedule(self.opts.schedule, 50, 1000)(min(999, int(progress * 1000)))

    @torch.no_grad()
    def perplexity(self, model: nn.Module) -> float | None:
        if self.heldout is None or not self.dist.main:
            return None
        from mom_cli.analysis.evaluate import perplexity

        was = model.training
        model.eval()
        try:
            with self.autocast():
                loss, _ = perplexity(
                    model, torch.from_numpy(self.heldout.astype(np.int64)), self.opts.batch_size, self.device
                )
        finally:
            model.train(was)
        return math.exp(loss)


# ----------------------------------------------------------------------------- stages


class Clock:
    """The budget spent so far, in the budget's unit (tokens, or seconds including earlier runs).

    Wall time counts from the end of the held-out perplexities before healing: it includes the
    teacher cache passes, both stages, the regions' errors and state saves; it excludes loading the
    checkpoint, data and teacher, those perplexities, the `--eval-every` ones, and the final
    perplexity and output (all logged with their times), so a run takes about budget + load +
    its evaluations."""

    def __init__(self, run: Heal) -> None:
        self.run, self.t0 = run, time.perf_counter() - run.cursor["elapsed"]

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation along the way) out of the time spent."""
        self.t0 += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spent(self) -> float:
        c = self.run.cursor
        return c["tokens"] if self.run.budget.tokens is not None else self.elapsed()

    @property
    def total(self) -> float:
        b = self.run.budget
        return float(b.tokens if b.tokens is not None else b.seconds)


class Feeder:
    """The cache rows each step of a region reads, filling the cache on demand (see local_stage)."""

    def __init__(self, run: Heal, cache: TeacherCache, key: dict[str, Any]) -> None:
        self.run, self.cache, self.key = run, cache, key
        self.student = StudentInputs(run, cache) if run.sequential else None
        self.student_seconds = 0.0  # carrying new rows to the student's inputs: counted with the teacher's
        self.n_eval, b = run.local_eval, run.opts.batch_size
        # too little data to hold any out: the error is measured on the first training rows
        self.eval_rows = torch.arange(self.n_eval or min(cache.shape[0], b))
        self.least = self.n_eval + min(b, cache.shape[0] - self.n_eval)  # one batch at least, whatever the time
        self.allowance = math.inf  # seconds of teacher passes this region may bring the total to

    def grow(self, upto: int) -> None:
        r = self.run
        self.cache.grow(upto, r.teacher, r.family, r.blocks, r.opts.batch_size, r.device, self.key, r.autocast)
        if self.student is not None:
            t0 = time.perf_counter()
            self.student.extend()
            self.student_seconds += time.perf_counter() - t0

    def inputs(self, region: Region, rows: torch.Tensor) -> torch.Tensor:
        """What `region` learns from: the student's state at its start (see StudentInputs) or the teacher's."""
        s = self.student
        if s is not None and s.region is not None and self.run.regions[s.region] is region:
            return s.read(rows)
        return self.cache.read(region.start, rows, self.run.device)

    def start(self) -> None:
        """A token budget fills every row now; a time budget only the held-out ones."""
        self.grow(self.cache.shape[0] if self.run.budget.tokens is not None else len(self.eval_rows))

    def rows(self, step: int) -> torch.Tensor:
        """Step s reads training rows s*B..(s+1)*B-1 in cache order, modulo the rows it may have."""
        c, b = self.cache, self.run.opts.batch_size
        want = self.n_eval + (step + 1) * b
        if c.filled < min(want, c.shape[0]):
            self.grow(self.affordable(max(want, c.filled + FILL_BATCHES * b)))
        have = max(1, c.filled - self.n_eval)
        return torch.from_numpy(self.n_eval + (step * b + np.arange(b)) % have)

    def affordable(self, upto: int) -> int:
        """`upto`, or fewer rows where the teacher's seconds per row so far would pass the allowance
        (which the seconds spent carrying new rows to the student's inputs use up too)."""
        c = self.cache
        if not math.isfinite(self.allowance) or c.filled == 0 or c.fill_seconds <= 0:
            return upto
        more = int((self.allowance - c.fill_seconds - self.student_seconds) / (c.fill_seconds / c.filled))
        b = self.run.opts.batch_size
        return min(upto, max(self.least, c.filled + more // b * b))  # whole micro-batches per pass


def local_stage(run: Heal, metrics: tr.Metrics, clock: Clock, bar: Any, task: Any) -> None:
    """Stage 1: each region of this rank learns its cached output, one region after another.

    The cache rows are a seeded sample of the data blocks, the LOCAL_EVAL_BLOCKS held-out rows first.
    A token budget fills every row (sized to what the regions will read) before the first step, so
    every step is fixed and `resume` is bit-exact. A time budget fills on demand: the held-out rows
    first, then, whenever a step reaches rows not yet filled, one teacher pass over the next
    FILL_BATCHES micro-batches (every region's positions at once). Later regions re-read the rows
    already filled and fill more only if they go further. So that the teacher does not eat the
    students' time, a region may fill rows only while the teacher's total seconds (its measured
    seconds per row times the rows) stay within FILL_SHARE of the time stage 1 will have had when
    the region ends; past that the region's steps wrap around the rows it has (another epoch).
    Fast students thus see each row about once; slow ones never wait for rows they would not read.
    """
    o, c = run.opts, run.cursor
    if c["stage"] != "local":
        return
    c.setdefault("local_start", clock.spent())
    mine = [r for r in run.regions if run._owns(r)]
    cache = TeacherCache(
        run.work / f"cache-rank{run.dist.rank}",
        run.cache_positions,
        run.cache_source,
        o.seq_len,
        run.config.hidden_size,
    )
    feeder = Feeder(run, cache, {"fingerprint": run.fingerprint()})
    if mine:
        cache.open(feeder.key)
        feeder.start()
    stage_end = clock.total * o.local_share
    for i, region in enumerate(run.regions):
        if i < c["region"]:
            continue
        if region in mine:
            _train_region(run, region, feeder, metrics, clock, stage_end, bar, task)
            if run.stopped:
                return
        c.update(region=i + 1, step=0)
        if o.save_every:
            run.save_state([])
    if mine:
        log(f"teacher cache: {cache.filled} of {cache.shape[0]} rows filled in {cache.fill_seconds:.1f} s")
    _share_regions(run)
    c.update(stage="global", step=0)


@torch.no_grad()
def refit_outputs(run: Heal, region: Region, feeder: Feeder) -> bool:
    """Before a converted PEER layer trains, its expert output vectors v_i are refitted in closed
    form to the region's first cached rows: with retrieval and activations fixed the layer is
    linear in them, f(x) = sum_i A_i(x) v_i with A_i(x) = (its gate weights) a_i(x), so the best
    V is a ridge regression, min ||W (A V - (y - b))||^2 + r ||V - V0||^2, each token weighted as
    the next norm sees it (as_seen). The surviving experts take
    over, on average, what the ones left out used to add.

    Why: gradient steps move V slowly (the layer's error barely falls in hundreds of steps), and
    the system is N x N. Measured on SmolLM2 layer 12 at h*k = 50% (the README's `mom heal` run):
    relative error 0.236 -> 0.177 from the refit alone (on the teacher's inputs). Only for a region
    that is one PEER layer whose experts train (its input is then what Feeder.inputs gives, its
    target output the cached end minus that input), with N up to REFIT_MAX_EXPERTS; True when it
    refitted.
    """
    from mom_cli.modeling.modeling_mom import PeerFfnModule

    block = run.model.model.blocks[region.block]
    if len(region.units) != 1 or region.units[0][0] != "ffn":
        return False
    module = block.ffn[str(region.units[0][1])]
    name = f"model.blocks.{region.block}.ffn.{region.units[0][1]}.peer.w_out"  # find_regions' naming
    if type(module) is not PeerFfnModule or name not in region.params:
        return False
    layer = module.peer
    if layer.n_experts > REFIT_MAX_EXPERTS:
        return False
    was = module.training
    module.eval()  # BatchNorm on its running statistics, which the batches would otherwise move
    try:

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for step in range(REFIT_BATCHES):
                rows = feeder.rows(step)
                x = feeder.inputs(region, rows).flatten(0, 1)
                end = feeder.cache.read(region.end, rows, run.device).float().flatten(0, 1)
                yield module.norm(x), end - x, token_scale(end)[:, 0]

        ridge_refit(layer, batches())
    finally:
        module.train(was)
    return True


@torch.no_grad()
def ridge_refit(layer: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Set a PEER layer's output vectors to min ||W (A V - (y - b))||^2 + r ||V - V0||^2 over the
    batches (h, y, w) of its inputs, target outputs and per-token weights (the diagonal of W), A
    the (tokens, N) retrieved activations."""
    from mom_cli.modeling.peer import expert_weights

    n = layer.n_experts
    gram = torch.zeros(n, n, device=layer.w_out.device)
    rhs = torch.zeros(n, layer.d_model, device=layer.w_out.device)
    for h, y, w in batches:
        scores, idx = layer.retrieve(h)
        a = expert_weights(idx.flatten(1), layer.gate_weights(scores).flatten(1).float(), n)
        a = a * layer.activations(h).float() * w[:, None].float()
        y = (y.float() if layer.b_out is None else y.float() - layer.b_out.float()) * w[:, None].float()
        gram += a.T @ a
        rhs += a.T @ y
    ridge = REFIT_RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    v = torch.linalg.solve(gram + ridge * torch.eye(n, device=gram.device), rhs + ridge * layer.w_out.float())
    layer.w_out.copy_(v.to(layer.w_out.dtype))


class Retrieval:
    """The retrieval term of a region's PEER layers: while the region runs (a context), each
    layer's input is kept; `loss()` is then, per layer, convert-peer's calibration loss on it (a
    contribution-weighted classification of each expert as among the token's h*k largest
    contributions or not, peer_calibrate.retrieval_loss), with the contributions of the current
    experts.

    Why: a converted layer's gate is `none`, so the output error's gradient reaches only the
    scores of experts already retrieved and says nothing of those missed, where the error is.
    Measured on SmolLM2 layer 12 at h*k = 50% (the README's `mom heal --budget 5m` run): the
    output error alone took the relative error from 0.236 to 0.214; with this term, to 0.199.

    Each layer's expert owners and score scale are measured on the region's first batch and kept
    in the cursor, so a resumed run uses the same ones.
    """

    def __init__(self, model: nn.Module, region: Region, cursor: dict[str, Any]) -> None:
        prefixes = sorted(
            {n.rsplit(".peer.", 1)[0] + ".peer" for n in region.params if tr.group_of(n) == "peer_retrieval"}
        )
        modules = dict(model.named_modules())
        self.layers = {n: modules[n] for n in prefixes if n in modules}
        self.setup = cursor.setdefault("retrieval", {})
        self.inputs: dict[str, torch.Tensor] = {}
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor, Any]] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> Retrieval:
        self.inputs = {}
        for name, layer in self.layers.items():
            keep = lambda mod, args, name=name: self.inputs.__setitem__(name, args[0])  # noqa: E731
            self._hooks.append(layer.register_forward_pre_hook(keep))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def loss(self) -> torch.Tensor:
        from mom_cli.surgery.peer_calibrate import _init_log_beta, _owner_table, expert_owners, retrieval_loss
        from mom_cli.surgery.peer_init import contributions

        terms = []
        for name, x in self.inputs.items():
            layer = self.layers[name]
            x = x.detach().reshape(-1, layer.d_model).to(layer.w_out.dtype)
            with _frozen_statistics(layer):
                if name not in self.setup:
                    with torch.no_grad():
                        owner = expert_owners(layer, x)
                        self.setup[name] = {"owner": owner.tolist(), "log_beta": float(_init_log_beta(layer, x))}
                if name not in self._tables:  # the kept setup as tensors, once per region
                    owner = torch.tensor(self.setup[name]["owner"], device=x.device)
                    beta = torch.tensor(self.setup[name]["log_beta"], device=x.device)
                    self._tables[name] = (owner, beta, _owner_table(owner, layer.heads))
                owner, log_beta, table = self._tables[name]
                terms.append(retrieval_loss(layer, x, contributions(layer, x), owner, log_beta, table))
        return torch.stack(terms).mean()


@contextmanager
def _frozen_statistics(layer: nn.Module) -> Iterator[None]:
    """The query BatchNorm normalises with the batch's statistics, as in the region's own forward,
    without counting this second pass over the same batch in its running statistics."""
    bn = getattr(layer, "query_bn", None)
    if bn is None:
        yield
        return
    momentum, bn.momentum = bn.momentum, 0.0
    try:
        yield
    finally:
        bn.momentum = momentum


def _train_region(
    run: Heal,
    region: Region,
    feeder: Feeder,
    metrics: tr.Metrics,
    clock: Clock,
    stage_end: float,
    bar: Any,
    task: Any,
) -> None:
    o, c = run.opts, run.cursor
    left = len(run.regions) - run.regions.index(region)
    # This region's share of what stage 1 has left; a token budget fixes it in advance.
    if run.budget.tokens is not None:
        share = stage_end / len(run.regions)
        steps = max(1, math.ceil(share / run.step_tokens))
        done_before = run.regions.index(region) * steps * run.step_tokens
        end = lambda: c["step"] >= steps  # noqa: E731
        progress = lambda: c["step"] / steps  # noqa: E731
    else:
        if c["step"] == 0:
            c["region_start"] = clock.spent()
            c["region_end"] = c["region_start"] + max(0.0, stage_end - c["region_start"]) / left
        start, region_end = c["region_start"], c["region_end"]
        feeder.allowance = FILL_SHARE * (region_end - c["local_start"])
        end = lambda: clock.spent() >= region_end  # noqa: E731
        progress = lambda: (clock.spent() - start) / max(1e-9, region_end - start)  # noqa: E731
        done_before = None
    if feeder.student is not None:  # inside the region's time: it is part of what the region costs
        i = run.regions.index(region)
        with timed(f"{region.name}: the student's inputs") if chain_head(run.regions, i) != i else nullcontext():
            feeder.student.prepare(i)
    if c["step"] == 0:
        region.error_before = _region_error(run, region, feeder)
        if refit_outputs(run, region, feeder):
            log(
                f"{region.name}: output vectors refitted, {region.metric} {region.error_before:.4g} -> {_region_error(run, region, feeder):.4g}"
            )
    params = [run.named[n] for n in region.params]
    opts = run.optimizers(region.params, o.lr)
    log(
        f"{region.name} ({region.cause}): {sum(p.numel() for p in params):,} parameters, {region.metric} {region.error_before:.4g}"
    )
    retrieval = Retrieval(run.model, region, c) if o.retrieval_loss > 0 else None
    retrieval = retrieval if retrieval is not None and retrieval.layers else None
    while not end():
        rows = feeder.rows(c["step"])
        t0 = time.perf_counter()  # the student's time: a teacher pass above logs its own
        x, target = feeder.inputs(region, rows), feeder.cache.read(region.end, rows, run.device)
        with run.autocast(), retrieval or nullcontext():
            y, aux = run_region(run.model, region, x)
            loss = region_loss(run.model, region, run.top, y, target)
            if aux and run.coef:
                loss = loss + run.coef * torch.stack(aux).mean()
        if retrieval is not None and retrieval.inputs:
            # scaled by the output loss, so the weight means the same whatever that loss's size
            loss = loss + o.retrieval_loss * loss.detach() * retrieval.loss()
        lr = run.lr(o.lr, progress())
        run.step(opts, params, loss, lr)
        value = loss.item()  # one device sync per step
        if not math.isfinite(value):
            raise MomError(f"the loss of {region.name} became {value}; lower --lr")
        tokens = rows.numel() * o.seq_len
        c["step"] += 1
        c["global_step"] += 1
        c["tokens"] = (done_before + c["step"] * run.step_tokens) if done_before is not None else c["tokens"] + tokens
        region.steps, region.tokens = c["step"], c["step"] * run.step_tokens
        tps = tokens / (time.perf_counter() - t0)
        metrics.write(
            {
                "step": c["global_step"],
                "tokens": c["tokens"],
                "stage": "local",
                "region": region.name,
                "loss": value,
                "lr": lr,
                "tokens_per_s": tps,
            }
        )
        bar.update(task, completed=min(clock.total, clock.spent()), loss=f"{value:.4g}", tps=f"{tps:.0f}")
        if _checkpoint(run, opts, clock, metrics):
            return
    for p in params:
        p.requires_grad_(False)
    region.error_after = _region_error(run, region, feeder)
    log(f"{region.name}: {region.metric} {region.error_before:.4g} -> {region.error_after:.4g} in {region.steps} steps")


@torch.no_grad()
def _region_error(run: Heal, region: Region, feeder: Feeder) -> float:
    """The region's error (see Region.metric) on the cached blocks kept out of stage 1."""
    was = run.model.training
    run.model.eval()
    try:
        rows = feeder.eval_rows
        x, t = feeder.inputs(region, rows), feeder.cache.read(region.end, rows, run.device)
        with run.autocast():
            y, _ = run_region(run.model, region, x)
            if region.metric == "KL":
                return float(region_loss(run.model, region, run.top, y, t))
        return relative_error(y, x, t)
    finally:
        run.model.train(was)


def _share_regions(run: Heal) -> None:
    """Under torchrun, each region's owner sends its trained parameters to every rank."""
    if not run.dist.active:
        return
    import torch.distributed as dist

    for i, r in enumerate(run.regions):
        for n in r.params:
            p = run.named[n]
            buf = p.detach().to(run.device).contiguous()
            dist.broadcast(buf, src=i % run.dist.world)
            with torch.no_grad():
                p.copy_(buf)


def global_stage(
    run: Heal, metrics: tr.Metrics, clock: Clock, bar: Any, task: Any
) -> tuple[float | None, float | None]:
    """Stage 2: end-to-end KL to the teacher of every region's parameters together."""
    o, c, d = run.opts, run.cursor, run.dist
    first = last = None
    if c["stage"] != "global" or not run.trainable:
        return first, last
    params = [run.named[n] for n in run.trainable]
    opts = run.optimizers(run.trainable, o.global_lr)
    model = distributed.wrap(d, run.model, run.device, "ddp")
    batches = tr.Batches(run.blocks, o.batch_size, 1, d, o.seed)
    stage_start = clock.total * o.local_share
    step_tokens = run.step_tokens * d.world
    if run.budget.tokens is not None:
        steps = max(1, math.ceil((clock.total - stage_start) / step_tokens))
        start_tokens = c["tokens"] - c["step"] * step_tokens
        end = lambda: c["step"] >= steps  # noqa: E731
        progress = lambda: c["step"] / steps  # noqa: E731
    else:
        start_s = c.setdefault("global_start", clock.spent())
        end = lambda: clock.spent() >= clock.total  # noqa: E731
        progress = lambda: (clock.spent() - start_s) / max(1e-9, clock.total - start_s)  # noqa: E731
        start_tokens = None
    while not end():
        t0 = time.perf_counter()
        if c["step"] * batches.global_batch <= len(run.blocks) < (c["step"] + 1) * batches.global_batch:
            _warn_second_pass(run)  # this step reads the first block of the second pass
        x = next(batches.micro_batches(c["step"])).to(run.device)
        with run.autocast():
            parts = global_losses(run, model, x)
        lr = run.lr(o.global_lr, progress())
        run.step(opts, params, parts["loss"], lr)
        m = dict(
            zip(
                ("loss", "kl", "lm_loss"),
                distributed.mean(
                    d, torch.stack([parts["loss"].detach().float(), parts["kl"].float(), parts["lm_loss"].float()])
                ).tolist(),
            )
        )
        if not math.isfinite(m["loss"]):
            raise MomError(f"the loss became {m['loss']} in the global stage; lower --global-lr")
        c["step"] += 1
        c["global_step"] += 1
        c["tokens"] = start_tokens + c["step"] * step_tokens if start_tokens is not None else c["tokens"] + step_tokens
        first = m["kl"] if first is None else first
        last = m["kl"]
        tps = step_tokens / (time.perf_counter() - t0)
        metrics.write(
            {
                "step": c["global_step"],
                "tokens": c["tokens"],
                "stage": "global",
                "loss": m["loss"],
                "kl": m["kl"],
                "lm_loss": m["lm_loss"],
                "lr": lr,
                "tokens_per_s": tps,
            }
        )
        bar.update(task, completed=min(clock.total, clock.spent()), loss=f"{m['kl']:.4g}", tps=f"{tps:.0f}")
        if _checkpoint(run, opts, clock, metrics):
            break
    for p in params:
        p.requires_grad_(False)
    return first, last


def _warn_second_pass(run: Heal) -> None:
    """Stage 2 is about to read DATA again: once it fits the text rather than the teacher (on an
    H200, SmolLM2 at half depth got worse on held-out text from its second pass over 0.79M tokens),
    more passes make it worse, so say so where the user can act on it."""
    if run.dist.main:
        tokens = run.blocks.size
        warn(
            f"heal: the end-to-end stage starts a second pass over DATA ({tokens:,} tokens for "
            f"{run.trainable_count:,} trainable parameters); past one pass it may fit "
            "the text rather than the teacher: give more data, or a smaller --budget (--eval-every shows the curve)"
        )


def global_losses(run: Heal, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage 2's objective on one micro-batch. Below the first region the student is its source
    model, so where the teacher is that source (and on one rank: DDP needs its own forward) the
    student starts from the teacher's state there (student_from) rather than recomputing it: a
    third of SmolLM2's layers for PEER layers 10-19."""
    p = run.shared_bottom
    if p is None:
        return tr.step_losses(model, run.teacher, x, run.coef)
    seen: dict[str, torch.Tensor] = {}

    def keep(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault("h", _stream(args, kwargs))

    hook = run.bottom_tap.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            target = run.teacher(input_ids=x, use_cache=False).logits
    finally:
        hook.remove()
    logits, aux = student_from(run.model, p, seen["h"].to(torch.float32))
    return tr.objective(logits, target, x, torch.stack(aux).mean() if aux else None, run.coef)


def _checkpoint(run: Heal, opts: list[torch.optim.Optimizer], clock: Clock, metrics: tr.Metrics) -> bool:
    """Evaluate every `eval_every` steps and save every `save_every`; True when the run must stop
    here (`stop_after`)."""
    c = run.cursor
    if run.opts.eval_every and c["global_step"] % run.opts.eval_every == 0:
        _evaluate(run, clock, metrics)
    c["elapsed"] = clock.elapsed()
    if run.opts.save_every and c["global_step"] % run.opts.save_every == 0:
        run.save_state(opts)
    run.stopped = c["global_step"] == run.opts.stop_after
    return run.stopped


def _evaluate(run: Heal, clock: Clock, metrics: tr.Metrics) -> None:
    """One point of the held-out curve, outside the time budget (a step's RNG and state untouched)."""
    t0 = time.perf_counter()
    ppl = run.perplexity(run.model)
    clock.pause(time.perf_counter() - t0)
    if ppl is None:
        return
    c = run.cursor
    metrics.write({"step": c["global_step"], "tokens": c["tokens"], "eval_loss": math.log(ppl), "eval_ppl": ppl})
    log(f"step {c['global_step']}, {c['tokens']:,} tokens ({c['stage']}): held-out perplexity {ppl:.4g}")


# ----------------------------------------------------------------------------- the command


def heal(ckpt: Path, out: Path, opts: HealOptions, force: bool = False) -> HealResult:
    """Heal `ckpt` per `opts` and write the result to `out` (see the module docstring)."""
    from mom_cli.io.atomic import check_output
    from mom_cli.io.loading import pick_device

    ckpt, out = Path(ckpt), Path(out)
    budget = check_options(opts)
    check_output(out, force)
    d = distributed.from_env()
    if not d.main:
        console.QUIET = True
    device = distributed.init(d, pick_device(opts.device))
    try:
        torch.manual_seed(opts.seed)
        run = Heal(ckpt, out, opts, budget, d, device)
        run.stopped = False
        run.prepare_state_dir(force)
        return _run(run, force)
    finally:
        distributed.shutdown(d)


def _run(run: Heal, force: bool) -> HealResult:
    c = run.cursor
    metrics = tr.Metrics(run.work, run.dist.main, c["global_step"], METRICS_FILE)
    n = run.trainable_count
    log(
        f"heal {run.ckpt}: {len(run.regions)} region(s), {n:,} parameters, budget {run.budget}, teacher "
        f"{run.teacher_ref}, {run.dist.world} process(es) on {run.device}, autocast {run.amp}"
    )
    for r in run.regions:
        log(f"  {r.name}: {r.cause}, {len(r.params)} tensors")
    if run.opts.local_inputs == "student" and not run.sequential:
        log("stage 1: each region on the teacher's inputs, so that the ranks train their regions at once")
    log("; ".join(run.load_times))
    if not run.regions:
        log("nothing to heal: every block follows its source layer by layer and nothing was converted or pruned")
    fresh = c["global_step"] == 0 and c["stage"] == "local" and c["region"] == 0
    with timed("the teacher's held-out perplexity"):
        teacher_ppl = run.perplexity(run.teacher)
    with timed("the held-out perplexity before healing"):
        before = run.perplexity(run.model) if fresh else None
    if before is not None:
        metrics.write({"step": 0, "tokens": 0, "eval_loss": math.log(before), "eval_ppl": before})
    clock = Clock(run)
    start_tokens, local_t0 = c["tokens"], clock.elapsed()
    with tr.progress_bar("healing") as bar:
        task = bar.add_task("healing", total=clock.total, completed=min(clock.total, clock.spent()), loss="-", tps="-")
        local_stage(run, metrics, clock, bar, task)
        local_s, local_tokens = clock.elapsed() - local_t0, c["tokens"] - start_tokens
        first = last = None
        if not run.stopped:
            first, last = global_stage(run, metrics, clock, bar, task)
    global_s = clock.elapsed() - local_t0 - local_s
    result = HealResult(
        None,
        run.teacher_ref,
        str(run.budget),
        [r.report() for r in run.regions],
        n,
        local_tokens,
        local_s,
        c["step"] if c["stage"] == "global" else 0,
        c["tokens"] - start_tokens - local_tokens,
        global_s,
        first,
        last,
        teacher_ppl,
        before,
        None,
        0 if run.heldout is None else int(run.heldout.size) - run.heldout.shape[0],
        run.dist.main,
    )
    if run.stopped:
        metrics.close()
        return result
    run.model.eval()
    result.eval_ppl_after = run.perplexity(run.model)
    if result.eval_ppl_after is not None:
        metrics.write(
            {
                "step": c["global_step"],
                "tokens": c["tokens"],
                "eval_loss": math.log(result.eval_ppl_after),
                "eval_ppl": result.eval_ppl_after,
            }
        )
    metrics.close()
    if run.dist.main:
        result.curve = read_curve(run.work / METRICS_FILE)
        write_output(run, result, force)
        result.path = run.out
    distributed.barrier(run.dist)
    return result


def read_curve(metrics_file: Path) -> list[tuple[int, float]]:
    """The held-out points of a run's metrics (before, every `eval_every` steps, after)."""
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if '"eval_ppl"' in x]
    return [(r["tokens"], r["eval_ppl"]) for r in rows]


def write_output(run: Heal, result: HealResult, force: bool) -> None:
    """The healed model as a normal MoM checkpoint, with provenance and heal_metrics.jsonl."""
    from mom_cli.io import provenance
    from mom_cli.io.atomic import atomic_dir
    from mom_cli.io.checkpoint import copy_extras, write_checkpoint
    from mom_cli.modeling.configuration_mom import MomConfig

    args = {k: v for k, v in asdict(run.opts).items() if k != "stop_after"}
    args.update(
        teacher=run.teacher_ref,
        budget=str(run.budget),
        regions=[r.name for r in run.regions],
        ranks=run.dist.world,
        eval_ppl_before=result.eval_ppl_before,
        eval_ppl_after=result.eval_ppl_after,
    )
    new = MomConfig.from_dict(run.config.to_dict())
    new.mom_provenance = [*run.config.mom_provenance, provenance.record("heal", args, str(run.ckpt))]
    weights = {k: v.detach() for k, v in run.model.state_dict().items()}
    with atomic_dir(run.out, force) as tmp:
        write_checkpoint(tmp, new, tr.planned_weights(run.ckpt, new, weights), lambda dst: copy_extras(run.ckpt, dst))
        shutil.copy2(run.work / METRICS_FILE, tmp / METRICS_FILE)
    if not run.opts.keep_state:
        shutil.rmtree(run.work, ignore_errors=True)
