"""`mom prune`: measure which MHA and FFN modules of a MoM are redundant, and remove them.

Removing a module sends its slot to SKIP: tokens that chose it add nothing at that step (in a
plain stack, the layer loses its attention or its FFN). The pool shrinks on disk; the routers stay
as they are, so the pruned checkpoint computes exactly what was measured here.

Metrics score every pooled module; the lowest scores go first.
    cosine           LLM-Drop: 1 - cos(X, X + Module(X)), averaged over the tokens that chose it
    block-influence  ShortGPT: 1 - cos(step input, step output), given to both modules of the step
    usage            the router's selection mass, recorded by `train-routers`
    loss             calibration loss increase when the module alone is removed
    greedy           remove the least harmful module, re-measure, repeat (first round = `loss`)

Plans are measured on calibration text, then checked on held-out text (`--eval-data`, or the text
that follows the calibration tokens in DATA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from mom_cli.console import log, progress
from mom_cli.errors import UsageError
from mom_cli.io.atomic import releases_locks
from mom_cli.io.text import check_seq_len
from mom_cli.modeling.configuration_mom import MomConfig

METRICS = ("greedy", "loss", "cosine", "block-influence", "usage")
KINDS = ("mha", "ffn")
GREEDY_MAX_PASSES = 400  # the default metric is greedy when it needs at most this many passes


@dataclass(frozen=True, order=True)
class ModuleRef:
    """One pooled module: its pool (kind, block), its router slot, and the source layer it came from."""

    kind: str
    block: int
    slot: int
    origin: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.block}.{self.slot}"


def pooled_modules(config: MomConfig) -> list[ModuleRef]:
    return [
        ModuleRef(kind, b, slot, origin)
        for kind in KINDS
        for b, spec in enumerate(config.blocks)
        for slot, origin in enumerate(spec[kind])
        if origin is not None
    ]


# ----------------------------------------------------------------------------- how many to keep


def parse_keep(value: str | None, total: int, kind: str) -> int:
    """'all', 'N' or 'P%' -> how many of the `total` modules of one kind to keep."""
    flag = f"--keep-{kind}"
    if value is None or value == "all":
        return total
    text = value.strip()
    try:
        keep = round(total * float(text[:-1]) / 100) if text.endswith("%") else int(text)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: give a count (10) or a share (50%)") from None
    if keep > total:
        raise UsageError(
            f"{flag} {value} asks for more {kind.upper()} modules than the {total} the checkpoint has; use at most {total}"
        )
    if keep < 1:
        raise UsageError(f"{flag} {value} would remove every {kind.upper()} module; keep at least 1 (or 1%)")
    return keep


def keep_counts(keep_mha: str | None, keep_ffn: str | None, n_mha: int, n_ffn: int) -> tuple[int, int]:
    """Unset `--keep-mha` means 50% unless `--keep-ffn` was given a value (then: prune only FFN)."""
    if keep_mha is None:
        keep_mha = "50%" if keep_ffn in (None, "all") else "all"
    if n_mha == 0 and keep_mha == "50%":
        keep_mha = "all"
    return parse_keep(keep_mha, n_mha, "mha"), parse_keep(keep_ffn, n_ffn, "ffn")


# ----------------------------------------------------------------------------- measuring


def switch_off(model: Any, off: Iterable[ModuleRef]) -> None:
    """Route the given modules' tokens to SKIP (on top of what the checkpoint already pruned)."""
    per_block: dict[int, dict[str, set[int]]] = {}
    for ref in off:
        per_block.setdefault(ref.block, {"mha": set(), "ffn": set()})[ref.kind].add(ref.slot)
    for b, block in enumerate(model.model.blocks):
        sel = per_block.get(b, {"mha": set(), "ffn": set()})
        block.set_removed(sel["mha"], sel["ffn"])


@dataclass
class Measurer:
    """Mean next-token loss of a model held in memory on fixed token blocks, with modules switched off.

    `prune` itself streams the checkpoint (`sequential.StreamedMeasurer`, the same interface and
    numbers); this one measures a model already loaded.
    """

    model: Any
    batches: torch.Tensor  # (n, seq_len)
    batch_size: int
    device: str
    passes: int = 0
    _seen: dict[frozenset, float] = field(default_factory=dict)  # the same set is measured once

    def loss(self, off: Iterable[ModuleRef] = ()) -> float:
        key = frozenset(off)
        if key not in self._seen:
            self._seen[key] = self._measure(key)
        return self._seen[key]

    def losses(self, offs: list[Iterable[ModuleRef]]) -> list[float]:
        return [self.loss(off) for off in offs]

    def rebase(self, off: Iterable[ModuleRef]) -> None:
        """Nothing to keep: every measurement reruns the whole model."""

    def probe(self, recorder: Any) -> None:
        """One full pass with `recorder` seeing every routed step."""
        inner = self.model.model
        inner.recorder = recorder
        try:
            self._measure(frozenset())  # a real pass, even when the loss itself is known
        finally:
            inner.recorder = None

    @torch.inference_mode()
    def _measure(self, off: frozenset) -> float:
        from mom_cli.analysis.evaluate import heldout_loss

        switch_off(self.model, off)
        loss, _ = heldout_loss(self.model, self.batches, self.batch_size, self.device)
        switch_off(self.model, ())
        self.passes += 1
        return loss


class _CosineProbe:
    """A routing recorder that scores modules by how little they turn the residual stream.

    `cosine`: 1 - cos(x_in, x_out) of each module's own update, per token, attributed to the module
    the token chose (by routing weight). `block-influence`: the same over a whole step (MHA then
    FFN), attributed to both modules the token chose at that step.
    """

    def __init__(self, whole_step: bool) -> None:
        self.whole_step = whole_step
        self.sum: dict[tuple[str, int, int], float] = {}
        self.mass: dict[tuple[str, int, int], float] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None

    def record(self, block: int, kind: str, step: int, r: Any, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        if not self.whole_step:
            self._add(block, kind, r, x_in, x_out)
        elif kind == "mha":
            self._pending = (r, x_in)
        else:
            r_mha, start = self._pending
            self._add(block, "mha", r_mha, start, x_out)
            self._add(block, "ffn", r, start, x_out)

    def _add(self, block: int, kind: str, r: Any, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        change = 1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (tokens,)
        w = r.weight.float()  # (tokens, K)
        sums = torch.zeros(r.n_modules, dtype=torch.float64, device=w.device)
        sums.index_add_(0, r.idx.flatten(), (w * change[:, None]).flatten().double())
        mass = torch.zeros_like(sums).index_add_(0, r.idx.flatten(), w.flatten().double())
        sums, mass = sums.tolist(), mass.tolist()  # one host copy each, not one per slot
        for slot in range(r.n_modules - 1):  # SKIP (last) is not a module
            key = (kind, block, slot)
            self.sum[key] = self.sum.get(key, 0.0) + sums[slot]
            self.mass[key] = self.mass.get(key, 0.0) + mass[slot]

    def scores(self, refs: list[ModuleRef]) -> dict[ModuleRef, float]:
        # A module no token chose turns nothing: score 0 (removed first).
        return {
            ref: self.sum.get(k, 0.0) / self.mass[k] if self.mass.get(k := (ref.kind, ref.block, ref.slot)) else 0.0
            for ref in refs
        }


@torch.inference_mode()
def probe_scores(measurer: Measurer, refs: list[ModuleRef], whole_step: bool) -> dict[ModuleRef, float]:
    """One pass over the calibration text with the cosine probe attached."""
    probe = _CosineProbe(whole_step)
    measurer.probe(probe)
    return probe.scores(refs)


def usage_scores(stats: dict, refs: list[ModuleRef]) -> dict[ModuleRef, float]:
    """Share of its pool's routing mass each module received, over every recorded step."""
    out = {}
    for ref in refs:
        rows = [mass for (b, kind, _), (_, mass) in stats.items() if b == ref.block and kind == ref.kind]
        total = sum(float(m.sum()) for m in rows)
        out[ref] = sum(float(m[ref.slot]) for m in rows if ref.slot < len(m)) / total if total else 0.0
    return out


def loss_scores(
    measurer: Any,
    refs: list[ModuleRef],
    base: float,
    off: tuple[ModuleRef, ...] = (),
    label: str = "removing one module at a time",
) -> dict[ModuleRef, float]:
    """Calibration loss increase when each module is removed (on top of `off`), measured together."""
    log(f"{label}: {len(refs)} candidates")
    losses = measurer.losses([(*off, ref) for ref in refs])
    return {ref: loss - base for ref, loss in zip(refs, losses)}


# ----------------------------------------------------------------------------- plans


@dataclass
class PrunePlan:
    metric: str
    scores: dict[ModuleRef, float]
    removed: list[ModuleRef]  # in the order they were chosen
    trace: list[float] = field(default_factory=list)  # calibration loss after 0, 1, 2, ... removals
    note: str = ""


def lowest(scores: dict[ModuleRef, float], n_remove: dict[str, int]) -> list[ModuleRef]:
    """The n lowest-scored modules of each kind, lowest first (ties: pool order)."""
    ranked = sorted(scores, key=lambda r: (scores[r], r.block, r.slot))
    out: list[ModuleRef] = []
    for kind in KINDS:
        out += [r for r in ranked if r.kind == kind][: n_remove.get(kind, 0)]
    return sorted(out, key=lambda r: (scores[r], r.kind, r.block, r.slot))


def greedy_passes(n: dict[str, int], n_remove: dict[str, int], width: int) -> int:
    """Loss passes greedy needs: one full round, then `width` candidates per later round."""
    total = sum(n.values())
    rounds = sum(n_remove.values())
    return 1 + total + max(rounds - 1, 0) * width + 1  # + base and the one-shot check


def greedy_plan(
    measurer: Any,
    refs: list[ModuleRef],
    n_remove: dict[str, int],
    base: float,
    width: int,
    first: dict[ModuleRef, float] | None = None,
) -> PrunePlan:
    """Remove the least harmful module, re-measure the best-ranked candidates, repeat.

    The first round is the one-shot `loss` ranking. Later rounds re-measure the `width` candidates
    ranked best so far (everything else keeps its last score). If the one-shot ranking's removal
    set ends lower on the calibration text than the greedy path, it is used instead: greedy never
    does worse than the ranking it started from. `first`: that ranking, when already measured.
    """
    first = first if first is not None else loss_scores(measurer, refs, base, label="greedy: round 1")
    scores = dict(first)
    need = dict(n_remove)
    removed: list[ModuleRef] = []
    trace = [base]
    with progress() as bar:
        task = bar.add_task("greedy: removing", total=sum(need.values()))
        while sum(need.values()):
            open_ = [r for r in refs if r not in removed and need.get(r.kind, 0) > 0]
            fresh = set(open_) if not removed else set()

            def measure(batch: list[ModuleRef]) -> None:
                for ref, loss in zip(batch, measurer.losses([(*removed, ref) for ref in batch])):
                    scores[ref] = loss - trace[-1]
                    fresh.add(ref)

            measure(sorted(open_, key=lambda r: scores[r])[: width if removed else 0])
            # Lazy greedy: a stale score that looks best is re-measured before it is trusted.
            while (best := min(open_, key=lambda r: (scores[r], r.block, r.slot))) not in fresh:
                measure([best])
            removed.append(best)
            if sum(need.values()) > 1:  # the next round starts from this one's states
                measurer.rebase(removed)
            need[best.kind] -= 1
            trace.append(trace[-1] + scores[best])
            bar.advance(task)
    one_shot = lowest(first, n_remove)
    one_shot_loss = measurer.loss(one_shot)
    if one_shot_loss < trace[-1]:
        note = f"the one-shot loss ranking ended lower ({one_shot_loss:.4f} < {trace[-1]:.4f}) and was kept"
        return PrunePlan("greedy", first, one_shot, trace_of(measurer, one_shot, base), note)
    return PrunePlan("greedy", scores, removed, trace)


def trace_of(measurer: Any, order: list[ModuleRef], base: float) -> list[float]:
    """Calibration loss after removing the first 0, 1, ..., n modules of `order`."""
    return [base, *measurer.losses([order[:i] for i in range(1, len(order) + 1)])]


def make_plan(
    metric: str,
    measurer: Any,
    refs: list[ModuleRef],
    n_remove: dict[str, int],
    stats: dict | None,
    width: int,
    want_trace: bool,
) -> PrunePlan:
    candidates = [r for r in refs if n_remove.get(r.kind, 0) > 0]
    base = measurer.loss()
    if metric == "greedy":
        return greedy_plan(measurer, candidates, n_remove, base, width)
    if metric == "loss":
        scores = loss_scores(measurer, candidates, base)
    elif metric in ("cosine", "block-influence"):
        scores = probe_scores(measurer, candidates, whole_step=metric == "block-influence")
    else:
        scores = usage_scores(stats or {}, candidates)
    removed = lowest(scores, n_remove)
    trace = trace_of(measurer, removed, base) if want_trace else [base]
    return PrunePlan(metric, scores, removed, trace)


def pick_metric(metric: str | None, stats: dict | None, n: dict[str, int], n_remove: dict[str, int], width: int) -> str:
    if metric is None:
        passes = greedy_passes({k: v for k, v in n.items() if n_remove.get(k)}, n_remove, width)
        metric = "greedy" if passes <= GREEDY_MAX_PASSES else "loss"
        log(f"metric: {metric} ({passes} calibration passes for greedy; it is the default up to {GREEDY_MAX_PASSES})")
    if metric not in METRICS:
        raise UsageError(f"unknown --metric {metric!r}: use one of {', '.join(METRICS)}")
    if metric == "usage" and stats is None:
        raise UsageError(
            "--metric usage needs routing statistics, and this checkpoint has none; "
            "run `mom train-routers` on it first, or choose another --metric"
        )
    return metric


# ----------------------------------------------------------------------------- the command


@dataclass
class PruneOptions:
    data: str
    keep_mha: str | None = None
    keep_ffn: str | None = None
    metric: str | None = None
    calib_tokens: int | None = None  # default: sized to the model (`default_calib_tokens`)
    seq_len: int = 512
    batch_size: int = 4
    eval_data: str | None = None
    eval_tokens: int | None = None  # default: as many as calibration
    device: str = "cpu"
    greedy_width: int = 8
    plot: Path | None = None
    dtype: torch.dtype | None = None  # None: as stored


CALIB_FLOPS = 1e12  # default calibration: about this many FLOPs per pass (2,048 tokens on a 135M model)


def default_calib_tokens(flops_per_token: float, seq_len: int) -> int:
    """A power of two between 256 and 8,192 tokens that keeps one pass near CALIB_FLOPS, and at least one sequence."""
    tokens = 2 ** max(0, math.floor(math.log2(max(CALIB_FLOPS / max(flops_per_token, 1.0), 1.0))))
    return max(min(max(tokens, 256), 8192), seq_len)


@dataclass
class PruneReport:
    path: Path
    plan: PrunePlan
    calib_ppl: tuple[float, float]
    heldout_ppl: tuple[float, float] | None
    params: tuple[int, int]
    active_params: tuple[int, int]
    flops: tuple[int, int]
    passes: int

    def as_dict(self) -> dict[str, Any]:
        removed = set(self.plan.removed)
        return {
            "path": str(self.path),
            "metric": self.plan.metric,
            "modules": [
                {
                    "module": r.name,
                    "kind": r.kind,
                    "block": r.block,
                    "slot": r.slot,
                    "origin": r.origin,
                    "score": s,
                    "removed": r in removed,
                }
                for r, s in sorted(self.plan.scores.items())
            ],
            "removed": [r.name for r in self.plan.removed],
            "calibration_perplexity": {"before": self.calib_ppl[0], "after": self.calib_ppl[1]},
            "heldout_perplexity": None
            if self.heldout_ppl is None
            else {"before": self.heldout_ppl[0], "after": self.heldout_ppl[1]},
            "params_total": {"before": self.params[0], "after": self.params[1]},
            "params_active_per_token": {"before": self.active_params[0], "after": self.active_params[1]},
            "flops_per_token": {"before": self.flops[0], "after": self.flops[1]},
            "calibration_passes": self.passes,
            "trace_loss": self.plan.trace,
            "note": self.plan.note,
        }


def pruned_config(config: MomConfig, removed: Iterable[ModuleRef], record: dict[str, Any]) -> MomConfig:
    new = MomConfig.from_dict(config.to_dict())
    for ref in removed:
        pool = new.blocks[ref.block][ref.kind] if ref.block < len(new.blocks) else []
        if ref.slot >= len(pool) or pool[ref.slot] is None:
            raise UsageError(f"module {ref.name} is not in the checkpoint (already pruned?)")
        pool[ref.slot] = None
        if ref.kind == "ffn":
            new.peer.pop(f"{ref.block}.{ref.slot}", None)  # a removed PEER module leaves no layer behind
    new.mom_provenance = [*config.mom_provenance, record]
    return new


def remove_modules(
    ckpt: Path, out: Path, removed: Iterable[ModuleRef], record: dict[str, Any], force: bool = False
) -> MomConfig:
    """Write `ckpt` without the `removed` modules: their slots become None, their weights go."""
    from mom_cli.io.atomic import atomic_dir
    from mom_cli.io.checkpoint import copy_extras, copy_plan, read_mom, write_checkpoint

    config, reader = read_mom(ckpt)
    new = pruned_config(config, removed, record)
    with atomic_dir(out, force) as tmp, progress() as bar:
        tensors = copy_plan(reader, new, None)
        task = bar.add_task("writing tensors", total=len(tensors))
        write_checkpoint(tmp, new, tensors, lambda d: copy_extras(ckpt, d), on_tensor=lambda t: bar.advance(task))
    return new


@releases_locks
def prune(ckpt: Path, out: Path, opts: PruneOptions, force: bool = False) -> PruneReport:
    from mom_cli.analysis.info import summary
    from mom_cli.analysis.routing_stats import load as load_stats
    from mom_cli.io import provenance
    from mom_cli.io.atomic import check_output
    from mom_cli.io.checkpoint import read_mom
    from mom_cli.io.loading import load_tokenizer
    from mom_cli.io.text import calibration_split
    from mom_cli.surgery.sequential import StreamedMeasurer

    check_output(out, force)  # fail before measuring for minutes
    if opts.plot is not None:
        from mom_cli.analysis.plots import check_target

        check_target(opts.plot)
    if opts.seq_len < 2 or opts.batch_size < 1 or (opts.calib_tokens or 2) < 2 or opts.greedy_width < 1:
        raise UsageError("--seq-len and --calib-tokens must be >= 2, --batch-size and --greedy-width >= 1")
    config, reader = read_mom(ckpt)
    before = summary(config, get=reader.get)
    calib_tokens = opts.calib_tokens or default_calib_tokens(before["flops_per_token"], opts.seq_len)
    refs = pooled_modules(config)
    n = {kind: sum(r.kind == kind for r in refs) for kind in KINDS}
    keep_mha, keep_ffn = keep_counts(opts.keep_mha, opts.keep_ffn, n["mha"], n["ffn"])
    n_remove = {"mha": n["mha"] - keep_mha, "ffn": n["ffn"] - keep_ffn}
    stats = load_stats(ckpt)
    metric = pick_metric(opts.metric, stats[0] if stats else None, n, n_remove, opts.greedy_width)
    check_seq_len(opts.seq_len, config.max_position_embeddings)

    tokenizer = load_tokenizer(ckpt)
    calib, heldout = calibration_split(
        tokenizer, opts.data, calib_tokens, opts.seq_len, opts.eval_data, opts.eval_tokens
    )
    log(
        f"prune {ckpt}: {n['mha']} MHA + {n['ffn']} FFN modules, removing {n_remove['mha']} MHA and "
        f"{n_remove['ffn']} FFN by {metric}, on {calib.numel()} calibration tokens"
    )
    measurer = StreamedMeasurer(ckpt, calib, opts.batch_size, opts.device, opts.dtype)
    plan = make_plan(
        metric, measurer, refs, n_remove, stats[0] if stats else None, opts.greedy_width, opts.plot is not None
    )
    calib_after = measurer.loss(plan.removed)
    held = None
    if heldout is not None:
        del measurer.states  # the calibration states are no longer needed
        check = StreamedMeasurer(ckpt, heldout, opts.batch_size, opts.device, opts.dtype)
        held = (math.exp(check.loss()), math.exp(check.loss(plan.removed)))

    record = provenance.record(
        "prune",
        {
            "metric": metric,
            "keep_mha": keep_mha,
            "keep_ffn": keep_ffn,
            "data": opts.data,
            "calib_tokens": calib.numel(),
            "removed": [r.name for r in plan.removed],
            "scores": {r.name: s for r, s in sorted(plan.scores.items())},
        },
        str(ckpt),
    )
    new = remove_modules(ckpt, out, plan.removed, record, force)
    after = summary(new, get=reader.get)
    report = PruneReport(
        out,
        plan,
        (math.exp(plan.trace[0]), math.exp(calib_after)),
        held,
        (before["params_total"], after["params_total"]),
        (before["params_active_per_token"], after["params_active_per_token"]),
        (before["flops_per_token"], after["flops_per_token"]),
        measurer.passes,
    )
    if opts.plot is not None:
        from mom_cli.analysis.plots import plot_prune

        plot_prune(report.as_dict(), opts.plot)
    return report
