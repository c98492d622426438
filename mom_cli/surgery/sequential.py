"""Calibration passes over a MoM checkpoint, one layer (or block step) at a time, for all tokens.

As in llm-compressor's sequential pipeline, the model is a meta-device skeleton: each layer's
weights are read from the checkpoint just before it runs on every calibration batch and dropped
after, so a pass holds about one layer, whatever the model's size. (Routers, norms and position
tables are small and stay resident; a pool module is read when a token is first routed to it.)

The calibration tokens' hidden states are kept at every layer boundary for the current "base" (the
modules switched off so far). A measurement that switches off more modules starts at the first
step where a token chose one of them, from the kept states, and runs only the rest of the model.
The measurements asked for together run together, so each layer is read once for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import torch
from torch import nn

from mom_cli.io.lazy import empty, fill, fill_buffers, is_empty

STATE_BUDGET = 2 * 2**30  # bytes of hidden states the measurements run together may hold


@dataclass(frozen=True)
class Unit:
    """One layer of the pass: a plain layer, or one step of a routed block."""

    layer: int  # the layer index attention uses (= position in the unrolled depth)
    plain: nn.Module | None = None
    block: int | None = None
    step: int = 0


@dataclass
class _Job:
    off: frozenset
    start: int
    recorder: Any = None
    save: bool = False  # keep its states as the new base
    states: list | None = None  # per batch: (hidden (N, d), router states)


class _FirstUse:
    """Records the first unit at which any token chose each pooled module."""

    def __init__(self, first: dict[tuple[str, int, int], int]) -> None:
        self.first, self.unit = first, 0

    def record(self, block: int, kind: str, step: int, r: Any, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        for slot in torch.unique(r.idx).tolist():
            if slot != r.skip_id:
                self.first.setdefault((kind, block, slot), self.unit)


class _FromStates:
    """The model as `heldout_loss` calls it, batch by batch: the logits of kept final states."""

    def __init__(self, model: nn.Module, states: list) -> None:
        self.model, self.states = model, iter(states)

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        h, _ = next(self.states)
        return SimpleNamespace(logits=self.model.head(self.model.model.norm(h).view(*input_ids.shape, -1)))


class _LazyPool(nn.ModuleDict):
    """A pool whose modules are read from the checkpoint when a token is first routed to them."""

    def __getitem__(self, key: str) -> nn.Module:
        module = super().__getitem__(key)
        if is_empty(module):
            self._on_use(key, module)
        return module


@dataclass
class StreamedMeasurer:
    """Mean next-token loss of a MoM checkpoint on fixed token blocks, with modules switched off.

    The same interface as `prune.Measurer` (which holds the whole model), and the same numbers:
    every batch goes through the same operations, only in layer-major order.
    """

    ckpt: Path
    batches: torch.Tensor  # (n, seq_len)
    batch_size: int
    device: str
    dtype: torch.dtype | None = None  # None: as stored
    passes: int = 0
    _seen: dict[frozenset, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mom_cli.io.checkpoint import meta_model, read_mom

        config, reader = read_mom(self.ckpt)
        self.config, self.reader, self._keys = config, reader, reader.keys()
        self.model = meta_model(config).eval()
        inner = self.model.model
        fill_buffers(self.model, self.model._init_weights, self.device)
        self._resident: list[nn.Module] = []
        for name in ("norm", "embed_positions"):
            if getattr(inner, name) is not None:
                self._fill(getattr(inner, name), f"model.{name}.")
        self.units: list[Unit] = []
        layer = 0
        for plain in inner.bottom:
            self.units.append(Unit(layer, plain=plain))
            layer += 1
        for b, block in enumerate(inner.blocks):
            self._fill(block.mha_router, f"model.blocks.{b}.mha_router.")
            self._fill(block.ffn_router, f"model.blocks.{b}.ffn_router.")
            for kind in ("mha", "ffn"):
                pool = getattr(block, kind)
                pool.__class__ = _LazyPool
                pool._on_use = self._pool_loader(f"model.blocks.{b}.{kind}.")
            self.units += [Unit(layer + h, block=b, step=h) for h in range(block.steps)]
            layer += block.steps
        for plain in inner.top:
            self.units.append(Unit(layer, plain=plain))
            layer += 1
        self._plain_prefix = {
            id(m): f"model.{where}.{i}." for where in ("bottom", "top") for i, m in enumerate(getattr(inner, where))
        }
        self._embed()
        self.base_off: frozenset = frozenset()
        self.first_use: dict[tuple[str, int, int], int] = {}
        self.rebase(frozenset())

    # ------------------------------------------------------------------ weights

    def _get(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self.reader.get(name)

    def _fill(self, module: nn.Module, prefix: str) -> None:
        fill(module, prefix, self._get, self._keys.__contains__, self.model._init_weights, self.dtype, self.device)

    def _pool_loader(self, prefix: str):
        def load(key: str, module: nn.Module) -> None:
            self._fill(module, f"{prefix}{key}.")
            self._resident.append(module)

        return load

    def _drop_resident(self) -> None:
        for m in self._resident:
            empty(m)
        self._resident = []

    # ------------------------------------------------------------------ the pass

    @torch.inference_mode()
    def _embed(self) -> None:
        """States at unit 0 (the embedded tokens) and each batch's step context."""
        inner = self.model.model
        self._fill(inner.embed_tokens, "model.embed_tokens.")
        self.ctx, first = [], []
        for i in range(0, self.batches.shape[0], self.batch_size):
            x = self.batches[i : i + self.batch_size].to(self.device)
            b, t = x.shape
            pos = torch.arange(t, device=x.device)[None].expand(b, -1)
            h = inner.add_positions(inner.embed_tokens(x), pos)
            self.ctx.append(inner.context(h, pos))
            first.append((h.reshape(b * t, -1), (None, None)))
        empty(inner.embed_tokens)
        self.states: list[list | None] = [first] + [None] * len(self.units)

    def _run_unit(self, unit: Unit, state: tuple, ctx: Any, recorder: Any) -> tuple:
        h, rs = state
        if unit.plain is not None:
            return unit.plain(h, ctx, unit.layer), (None, None)
        block = self.model.model.blocks[unit.block]
        rs = (None, None) if unit.step == 0 else rs
        return block.step(h, ctx, unit.layer - unit.step, unit.step, rs, recorder, unit.block)

    @torch.inference_mode()
    def _run(self, jobs: list[_Job]) -> list[float]:
        from mom_cli.console import progress
        from mom_cli.surgery.prune import switch_off

        first = min(j.start for j in jobs)
        with progress() as bar:
            task = bar.add_task(
                f"{len(jobs)} pass{'es' * (len(jobs) > 1)}, layer by layer", total=len(self.units) - first
            )
            for u in range(first, len(self.units)):
                self._run_layer(u, jobs, switch_off)
                bar.advance(task)
        switch_off(self.model, ())
        for j in jobs:
            if j.save:
                self.states[len(self.units)] = j.states
        self.passes += len(jobs)
        return self._head([j.states for j in jobs])

    def _run_layer(self, u: int, jobs: list[_Job], switch_off: Any) -> None:
        """Unit u for every job that has started, its weights read once for all of them."""
        unit = self.units[u]
        if unit.plain is not None:
            self._fill(unit.plain, self._plain_prefix[id(unit.plain)])
        for j in jobs:
            if j.start > u:
                continue
            if j.start == u:
                j.states = list(self.states[u])
            if j.save:
                self.states[u] = j.states
            if isinstance(j.recorder, _FirstUse):
                j.recorder.unit = u
            switch_off(self.model, j.off)
            j.states = [self._run_unit(unit, s, c, j.recorder) for s, c in zip(j.states, self.ctx)]
        if unit.plain is not None:
            empty(unit.plain)
        self._drop_resident()

    def _head(self, runs: list[list]) -> list[float]:
        from mom_cli.analysis.evaluate import heldout_loss

        self._fill(self.model.lm_head, "lm_head.")
        out = [
            heldout_loss(_FromStates(self.model, states), self.batches, self.batch_size, self.device)[0]
            for states in runs
        ]
        empty(self.model.lm_head)
        return out

    # ------------------------------------------------------------------ measuring

    def _start(self, off: frozenset) -> int | None:
        """Where a pass with `off` switched off parts from the base's: None if it never does."""
        if not off >= self.base_off:
            return 0
        uses = [self.first_use.get((r.kind, r.block, r.slot)) for r in off - self.base_off]
        uses = [u for u in uses if u is not None]
        return min(uses) if uses else None

    def rebase(self, off: Iterable) -> None:
        """Keep the states of a pass with `off` switched off, for the measurements that follow."""
        off = frozenset(off)
        start = self._start(off) if self.states[-1] is not None else 0
        if start is not None:
            self.first_use = {k: u for k, u in self.first_use.items() if u < start}
            job = _Job(off, start, recorder=_FirstUse(self.first_use), save=True)
            self._seen[off] = self._run([job])[0]
        elif off not in self._seen:
            self._seen[off] = self._seen[self.base_off]
        self.base_off = off

    def loss(self, off: Iterable = ()) -> float:
        return self.losses([frozenset(off)])[0]

    def losses(self, offs: list[Iterable]) -> list[float]:
        """The losses of several sets, the new ones measured together."""
        offs = [frozenset(o) for o in offs]
        todo: list[_Job] = []
        for off in dict.fromkeys(offs):
            if off in self._seen:
                continue
            start = self._start(off)
            if start is None:  # no token ever reaches what it removes
                self._seen[off] = self._seen[self.base_off]
            else:
                todo.append(_Job(off, start))
        per_job = max(1, self.batches.numel() * self.config.hidden_size * 4 * 2)
        chunk = max(1, STATE_BUDGET // per_job)
        for i in range(0, len(todo), chunk):
            group = todo[i : i + chunk]
            for job, loss in zip(group, self._run(group)):
                self._seen[job.off] = loss
        return [self._seen[o] for o in offs]

    def probe(self, recorder: Any) -> None:
        """One full pass (nothing switched off) with `recorder` seeing every routed step."""
        self._run([_Job(frozenset(), 0, recorder=recorder)])
