"""`mom decompose`: a pretrained Transformer becomes a Mixture-of-Modules checkpoint.

Built as a plan, validated, then executed (as mergekit does): the plan is a `MomConfig` plus one
derivation per output tensor; nothing is read from the source until the plan is known to be valid,
and then tensors stream from the memory-mapped source into the output one at a time.

Layer i of the source gives MHA module i and FFN module i. The default plan puts every layer in
one block with H = M steps, top-1, and routers whose step bias picks module h at step h: the same
function as the source model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mom_cli.errors import UsageError
from mom_cli.families import Derived, Family, check_supported, family_for
from mom_cli.io.atomic import releases_locks
from mom_cli.io.checkpoint import module_prefix, router_key
from mom_cli.io.sources import Source
from mom_cli.modeling.configuration_mom import MomConfig

ROUTER_PREFERRED_BIAS = 1.0  # logit margin of the module a step starts with; / T gives the softmax margin


@dataclass
class PlanOptions:
    pool_size: int | None = None  # M: modules per pool (default: every layer between bottom and top)
    depth: int | None = None  # H: steps per block (default: M)
    top_k: int = 1
    bottom: int = 0
    top: int = 0
    router: str = "gru"
    router_hidden: int = 256
    temperature: float = 0.2
    skip: bool = True


def check_plan(cfg: Any, family: Family, opts: PlanOptions) -> tuple[int, int, int]:
    """Every plan option checked against the source config alone, before any tensor is read.
    Returns (layers n, pool size M, steps H)."""
    n = family.num_layers(cfg)
    middle = n - opts.bottom - opts.top
    if opts.bottom < 0 or opts.top < 0 or middle < 1:
        raise UsageError(
            f"impossible plan: --bottom {opts.bottom} + --top {opts.top} leave no layers of {n} for MoM blocks"
        )
    if opts.pool_size is not None and opts.pool_size < 1:
        raise UsageError(f"--pool-size must be >= 1, got {opts.pool_size}")
    if opts.depth is not None and opts.depth < 1:
        raise UsageError(f"--depth must be >= 1 (routed steps per block), got {opts.depth}")
    m = opts.pool_size or middle
    if middle % m:
        raise UsageError(
            f"impossible plan: {middle} middle layers do not split into pools of --pool-size {m}; use a divisor of {middle}"
        )
    h = opts.depth or m
    choices = m + opts.skip
    if opts.top_k < 1 or opts.top_k > choices:
        raise UsageError(
            f"impossible plan: --top-k must be between 1 and {choices} (M modules{' + SKIP' if opts.skip else ''})"
        )
    if opts.router not in ("gru", "mlp"):
        raise UsageError(f"unknown router {opts.router!r}: use gru or mlp")
    if not 1 <= opts.router_hidden <= 2**16:
        raise UsageError(f"--router-hidden must be between 1 and 65536, got {opts.router_hidden}")
    if not (math.isfinite(opts.temperature) and opts.temperature > 0):
        raise UsageError(f"--temperature must be a finite number > 0, got {opts.temperature}")
    check_supported(family, cfg)
    return n, m, h


def make_config(source: Source, family: Family, opts: PlanOptions) -> MomConfig:
    """Check the plan against the source and describe it as a MomConfig."""
    cfg = source.config
    n, m, h = check_plan(cfg, family, opts)
    keys = source.reader.keys()
    kwargs = family.mom_kwargs(cfg, keys)
    blocks = [
        {"mha": list(range(s, s + m)), "ffn": list(range(s, s + m)), "steps": h}
        for s in range(opts.bottom, n - opts.top, m)
    ]
    return MomConfig(
        family=family.name,
        source_model_type=cfg.model_type,
        source_config=cfg.to_dict(),
        bottom_layers=list(range(opts.bottom)),
        blocks=blocks,
        top_layers=list(range(n - opts.top, n)),
        router_top_k=opts.top_k,
        skip=opts.skip,
        router=opts.router,
        router_hidden=opts.router_hidden,
        router_temperature=opts.temperature,
        bos_token_id=getattr(cfg, "bos_token_id", None),
        eos_token_id=getattr(cfg, "eos_token_id", None),
        pad_token_id=getattr(cfg, "pad_token_id", None),
        **kwargs,
    )


def preferred_modules(step: int, steps: int, pool: int) -> list[int]:
    """The modules step h starts with: module h when H = M; otherwise the h-th slice of the pool."""
    if steps >= pool:
        return [step * pool // steps]
    return list(range(step * pool // steps, (step + 1) * pool // steps))


def router_tensors(config: MomConfig, block: int) -> dict[str, torch.Tensor]:
    """Fresh routers for one block: random cell (seeded), zero head, step bias = the start plan."""
    from mom_cli.modeling.modeling_mom import Router

    spec = config.blocks[block]
    out = {}
    for kind in ("mha", "ffn"):
        pool = len(spec[kind])
        torch.manual_seed(1000 * block + (kind == "ffn"))
        router = Router(config, pool + config.skip, spec["steps"])
        torch.nn.init.zeros_(router.head.weight)
        with torch.no_grad():
            router.step_bias.zero_()
            for h in range(spec["steps"]):
                router.step_bias[h, preferred_modules(h, spec["steps"], pool)] = ROUTER_PREFERRED_BIAS
        for name, t in router.state_dict().items():
            out[router_key(block, kind, name)] = t.detach().clone()
    return out


def derived_tensors(source: Source, family: Family, config: MomConfig) -> dict[str, Derived | torch.Tensor]:
    """Every output tensor: derived from source tensors, or a tensor made here (routers)."""
    keys = source.reader.keys()
    out: dict[str, Derived | torch.Tensor] = dict(family.globals_from_source(config))

    def add_layer(prefix_mha: str, prefix_ffn: str, origin_mha: int | None, origin_ffn: int | None) -> None:
        if origin_mha is not None:
            out.update({prefix_mha + k: r for k, r in family.modules_from_source(origin_mha, config, "mha").items()})
        if origin_ffn is not None:
            out.update({prefix_ffn + k: r for k, r in family.modules_from_source(origin_ffn, config, "ffn").items()})

    for i, origin in enumerate(config.bottom_layers):
        add_layer(module_prefix("bottom", i, "mha"), module_prefix("bottom", i, "ffn"), origin, origin)
    for b, spec in enumerate(config.blocks):
        for m, origin in enumerate(spec["mha"]):
            add_layer(module_prefix("blocks", b, "mha", m), "", origin, None)
        for m, origin in enumerate(spec["ffn"]):
            add_layer("", module_prefix("blocks", b, "ffn", m), None, origin)
        out.update(router_tensors(config, b))
    for i, origin in enumerate(config.top_layers):
        add_layer(module_prefix("top", i, "mha"), module_prefix("top", i, "ffn"), origin, origin)
    return {name: _resolve(r, keys, family.optional_prefix) for name, r in out.items()}


def _resolve(r: Derived | torch.Tensor, keys: set[str], optional_prefix: str) -> Derived | torch.Tensor:
    """Source keys as this checkpoint spells them: without the family's optional prefix where it omits it."""
    if isinstance(r, torch.Tensor) or not optional_prefix or all(k in keys for k in r.keys):
        return r
    return Derived(tuple(k if k in keys else k.removeprefix(optional_prefix) for k in r.keys), r.fn)


def check_plan_early(source_ref: str, opts: PlanOptions) -> None:
    """The plan against the source's config alone (a GGUF file's metadata), before any weights load."""
    from mom_cli.io.sources import source_config

    cfg = source_config(source_ref)
    check_plan(cfg, family_for(cfg.model_type), opts)


def check_source_shapes(source: Source, family: Family, config: MomConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """The config's sizes against the stored embedding (read from its header), before any router
    or tensor is allocated from them: a config that lies about d or the vocabulary fails here.
    The other tensors are checked as they are written."""
    from mom_cli.errors import MomError

    keys = source.reader.keys()
    for name, r in family.globals_from_source(config).items():
        r = _resolve(r, keys, family.optional_prefix)
        if "embed" not in name or r.fn is not None or name not in shapes or r.keys[0] not in keys:
            continue
        got = tuple(source.reader.shape(r.keys[0]))
        if got != shapes[name]:
            raise MomError(
                f"source tensor {r.keys[0]} has shape {list(got)}, but the source config implies "
                f"{list(shapes[name])}: config.json does not match the weights"
            )


def default_output(ref: str, suffix: str) -> Path:
    """`gpt2` -> ./gpt2-mom; /models/x -> /models/x-mom; org/name -> ./name-mom; a.gguf -> a-mom."""
    path = Path(ref).expanduser()
    if path.exists() and not str(path).startswith(tuple(_site_dirs())):
        stem = path.stem if path.is_file() else path.name
        return path.with_name(f"{stem}{suffix}")
    return Path.cwd() / f"{ref.rstrip('/').split('/')[-1]}{suffix}"


def _site_dirs() -> list[str]:
    import site

    return site.getsitepackages()


@releases_locks
def decompose(
    source_ref: str,
    out: Path,
    opts: PlanOptions,
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    shard_bytes: int | None = None,
    verify: bool = True,
) -> Path:
    from mom_cli.console import log, progress
    from mom_cli.errors import MomError
    from mom_cli.io import provenance
    from mom_cli.io.atomic import atomic_dir, check_output
    from mom_cli.io.checkpoint import DEFAULT_SHARD, param_shapes, write_checkpoint
    from mom_cli.io.sources import open_source
    from mom_cli.io.tensorio import PlannedTensor

    check_output(out, force)  # fail before reading a large source
    check_plan_early(source_ref, opts)
    source = open_source(source_ref, allow_pickle)
    resolved = Path(out).resolve()
    if resolved == source.path.resolve() or source.path.resolve() in resolved.parents:
        raise UsageError(f"output {out} would overwrite the source {source_ref}; choose another -o")
    family = family_for(source.config.model_type)
    config = make_config(source, family, opts)
    shapes = param_shapes(config)  # meta tensors: nothing allocated yet
    check_source_shapes(source, family, config, shapes)
    derived = derived_tensors(source, family, config)
    keys = source.reader.keys()
    absent = sorted({k for r in derived.values() if isinstance(r, Derived) for k in r.keys} - keys)
    if absent:
        raise MomError(
            f"source {source_ref} lacks tensor {absent[0]} (and {len(absent) - 1} more); the checkpoint is incomplete"
        )
    embed = next(k for r in derived.values() if isinstance(r, Derived) for k in r.keys)
    stored = source.reader.get(embed).dtype
    if not stored.is_floating_point:
        raise MomError(
            f"source tensor {embed} is stored as {str(stored).removeprefix('torch.')}, not a floating type: "
            "the file's header does not tell the truth about its dtype"
        )
    out_dtype = dtype or stored
    stored_dtype = stored
    config.mom_provenance = [provenance.record("decompose", {**asdict(opts), "dtype": str(out_dtype)}, source_ref)]
    config.dtype = str(out_dtype).removeprefix("torch.")

    def producer(name: str):
        r = derived[name]
        return (lambda: r) if isinstance(r, torch.Tensor) else (lambda: r.build(source.reader.get))

    planned = [PlannedTensor(n, s, out_dtype, producer(n)) for n, s in shapes.items()]
    log(
        f"decompose {source_ref}: {family.name} family, {len(config.blocks)} block(s), "
        f"{sum(len(b['mha']) for b in config.blocks)} MHA + {sum(len(b['ffn']) for b in config.blocks)} FFN modules"
    )
    with atomic_dir(out, force) as tmp, progress() as bar:
        task = bar.add_task("writing tensors", total=len(planned))
        write_checkpoint(
            tmp,
            config,
            planned,
            source.copy_extras,
            shard_bytes or DEFAULT_SHARD,
            on_tensor=lambda t: bar.advance(task),
        )
        record_verdict(
            tmp,
            config,
            verify_written(source, tmp, config, out_dtype == stored_dtype, out_dtype)
            if verify
            else {"method": "skipped", "note": "--no-verify"},
        )
    return out


def verify_written(
    source: Source, ckpt: Path, config: MomConfig, exact_copy: bool, dtype: torch.dtype
) -> dict[str, Any]:
    from mom_cli.surgery.verify import tolerance_for, verify

    return verify(source, ckpt, config, tolerance_for(exact_copy, dtype)).as_dict()


def record_verdict(ckpt: Path, config: MomConfig, verdict: dict[str, Any]) -> None:
    """The verification's result joins the decompose record (config and model card)."""
    from mom_cli.io.provenance import model_card

    config.mom_provenance[-1]["verify"] = verdict
    config.save_pretrained(ckpt)
    (ckpt / "README.md").write_text(model_card(config))
