"""MoM checkpoints on disk: a `transformers` model directory with `model_type: "mom"`.

    config.json              MomConfig: family, sizes, routing plan, PEER layers, provenance, auto_map
    model.safetensors        weights (sharded with model.safetensors.index.json above a size)
    configuration_mom.py, modeling_mom.py, peer.py, segment_kernel.py   the runtime, for trust_remote_code loads
    tokenizer files, generation_config.json   copied from the source
    README.md                model card with the provenance

The runtime files make every checkpoint self-describing: `lm_eval`, `pipeline(...)` or
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` load it without `mom`.
`mom` itself never runs them: it loads with its own installed classes (trust_remote_code=False).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mom_cli.errors import MomError, UsageError, one_line
from mom_cli.io.provenance import model_card
from mom_cli.io.tensorio import FLOAT_DTYPES, PlannedTensor, SafetensorsReader, write_safetensors
from mom_cli.modeling.configuration_mom import MomConfig

DEFAULT_SHARD = 2 * 10**9
# The runtime's files; modeling_mom.py imports the others relatively, and nothing from mom_cli.
RUNTIME_FILES = ("configuration_mom.py", "modeling_mom.py", "peer.py", "segment_kernel.py")
AUTO_MAP = {"AutoConfig": "configuration_mom.MomConfig", "AutoModelForCausalLM": "modeling_mom.MomForCausalLM"}


def self_describing(config: MomConfig, directory: Path) -> None:
    """Name the runtime in `config` (auto_map, architectures) and copy its files into `directory`."""
    import shutil

    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MomForCausalLM"]
    runtime = Path(__file__).resolve().parent.parent / "modeling"
    for name in RUNTIME_FILES:
        shutil.copy2(runtime / name, Path(directory) / name)


def module_prefix(part: str, index: int, kind: str, slot: int | None = None) -> str:
    """Where a module's weights live in the state dict: `module_prefix("bottom", 0, "mha")` is
    "model.bottom.0.mha.", `module_prefix("blocks", 1, "ffn", 3)` "model.blocks.1.ffn.3." (slot 3 of
    block 1's FFN pool). part: "bottom", "blocks" or "top"; kind: "mha" or "ffn"."""
    prefix = f"model.{part}.{index}.{kind}."
    return prefix if slot is None else f"{prefix}{slot}."


def router_key(block: int, kind: str, name: str) -> str:
    """A router tensor's state-dict name: `router_key(0, "ffn", "step_bias")` is "model.blocks.0.ffn_router.step_bias"."""
    return f"model.blocks.{block}.{kind}_router.{name}"


def meta_model(config: MomConfig) -> torch.nn.Module:
    """The model's parameter names and shapes, without allocating any weights."""
    from mom_cli.modeling.modeling_mom import MomForCausalLM

    with torch.device("meta"):
        return MomForCausalLM(config)


def param_shapes(config: MomConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint stores (tied head excluded), in module order."""
    return {k: shape for k, (shape, _) in param_specs(config).items()}


def param_specs(config: MomConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every tensor a checkpoint stores: (shape, whether it is floating point), in module order."""
    try:
        model = meta_model(config)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as e:
        raise MomError(f"the MoM config describes no valid model: {one_line(e, 160)}") from e
    specs = {k: (tuple(v.shape), v.dtype.is_floating_point) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        specs.pop("lm_head.weight", None)
    return specs


def verify_tensors(path: Path, config: MomConfig, reader: SafetensorsReader) -> None:
    """Every tensor the config implies is stored, with its shape and a fitting dtype (read from the
    headers only): a checkpoint with a missing or damaged tensor is refused, never re-initialised."""
    keys = reader.keys()
    for name, (shape, floating) in param_specs(config).items():
        if name not in keys:
            raise MomError(
                f"{path} lacks tensor {name}, which its config implies; the checkpoint is incomplete or damaged"
            )
        try:
            got, dtype = tuple(reader.shape(name)), reader.dtype_name(name)
        except MomError:
            raise
        except Exception as e:
            raise MomError(f"cannot read the header of tensor {name} in {path}: {one_line(e, 120)}") from e
        if got != shape:
            raise MomError(f"tensor {name} in {path} has shape {list(got)}, but the config implies {list(shape)}")
        if floating != (dtype in FLOAT_DTYPES):
            raise MomError(
                f"tensor {name} in {path} is stored as {dtype}, which is not a "
                f"{'floating' if floating else 'integer'} type as the model needs"
            )


def write_checkpoint(
    directory: Path,
    config: MomConfig,
    tensors: list[PlannedTensor],
    copy_extras: Callable[[Path], None] | None,
    shard_bytes: int = DEFAULT_SHARD,
    on_tensor: Callable[[PlannedTensor], None] = lambda t: None,
) -> None:
    expected = param_shapes(config)
    got = {t.name: t.shape for t in tensors}
    missing = [k for k in expected if k not in got]
    if missing or any(expected.get(k) != s for k, s in got.items()):
        bad = missing[:3] or [k for k, s in got.items() if expected.get(k) != s][:3]
        raise MomError(f"internal plan error: tensors {bad} do not match the MoM config")
    self_describing(config, directory)
    config.save_pretrained(directory)
    write_safetensors(directory, tensors, shard_bytes, on_tensor=on_tensor)
    if copy_extras is not None:
        copy_extras(directory)
    (directory / "README.md").write_text(model_card(config, "mom"))


def copy_extras(ckpt: Path, out: Path) -> None:
    """Tokenizer files and generation config travel with the weights (each writer makes its own card)."""
    import shutil

    from mom_cli.io.sources import TOKENIZER_FILES

    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (Path(ckpt) / name).exists():
            shutil.copy2(Path(ckpt) / name, Path(out) / name)


def read_mom(path: Path) -> tuple[MomConfig, SafetensorsReader]:
    """A MoM checkpoint's config and a lazy reader of its tensors."""
    from mom_cli.io.sources import load_config

    config = load_config(Path(path))
    if getattr(config, "model_type", None) != "mom":
        raise UsageError(
            f"{path} is not a MoM checkpoint (model_type {config.model_type!r}); run `mom decompose` on it first"
        )
    reader = SafetensorsReader(Path(path))
    verify_tensors(Path(path), config, reader)
    return config, reader


def copy_plan(reader: SafetensorsReader, config: MomConfig, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """Tensors of an existing checkpoint, read one at a time, optionally cast."""
    shapes = param_shapes(config)
    out = []
    for name, shape in shapes.items():

        def produce(name: str = name) -> torch.Tensor:
            return reader.get(name)

        out.append(PlannedTensor(name, shape, dtype or reader.dtype(name), produce))
    return out


def load(path: str | Path, **kwargs: Any):
    """Load a MoM checkpoint as a `MomForCausalLM` (a transformers PreTrainedModel)."""
    from mom_cli.modeling.modeling_mom import MomForCausalLM

    read_mom(Path(path))  # clear errors for non-MoM or corrupt directories before transformers tries
    return MomForCausalLM.from_pretrained(path, **{"trust_remote_code": False, **kwargs})
