"""`mom export`: MoM checkpoints out to what other tools load.

- `hf`: a MoM that is still a plain stack of layers (identity routing, nothing replaced) is
  written back in its source family's standard format (`GPT2LMHeadModel`, `LlamaForCausalLM`),
  loadable without mom. Anything else (routed, or with PEER modules) becomes a self-contained
  `trust_remote_code` directory: the runtime's files (configuration, modeling, PEER layer) beside
  the weights, and an `auto_map` in config.json.
- `safetensors`: flat safetensors with the config as JSON in the header metadata.

Tensors stream one at a time from the memory-mapped checkpoint; the model is never held whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mom_cli.console import log, progress
from mom_cli.errors import UsageError
from mom_cli.families import Derived, family_named
from mom_cli.io.atomic import atomic_dir, atomic_file, releases_locks
from mom_cli.io.checkpoint import copy_extras, copy_plan, module_prefix, read_mom, router_key, self_describing
from mom_cli.io.provenance import model_card
from mom_cli.io.tensorio import PlannedTensor, SafetensorsReader, write_file, write_safetensors
from mom_cli.modeling.configuration_mom import MomConfig

FORMATS = ("hf", "safetensors")


def plain_layer_order(config: MomConfig, reader: SafetensorsReader) -> list[tuple[str, str]] | None:
    """(MHA prefix, FFN prefix) of each layer in order, if the MoM computes a plain stack; else None.

    A block is a plain stack when it routes top-1 with constant routers (zero head) whose step
    bias picks one slot strictly at every step. A step whose MHA and FFN both SKIP (pruned or
    chosen) is no layer at all; a step that keeps only one of the two is not a standard layer.
    """
    if config.peer:
        return None
    layers = [
        (module_prefix("bottom", i, "mha"), module_prefix("bottom", i, "ffn")) for i in range(len(config.bottom_layers))
    ]
    for b, spec in enumerate(config.blocks):
        if config.router_top_k != 1:
            return None
        picks = {kind: _constant_choice(reader, b, kind, spec[kind]) for kind in ("mha", "ffn")}
        if picks["mha"] is None or picks["ffn"] is None:
            return None
        for mha, ffn in zip(picks["mha"], picks["ffn"]):
            if mha is None and ffn is None:
                continue
            if mha is None or ffn is None:
                return None
            layers.append((module_prefix("blocks", b, "mha", mha), module_prefix("blocks", b, "ffn", ffn)))
    layers += [(module_prefix("top", i, "mha"), module_prefix("top", i, "ffn")) for i in range(len(config.top_layers))]
    return layers


def layer_origins(config: MomConfig, layers: list[tuple[str, str]]) -> list[int]:
    """The source layer each plain layer's MHA module came from (its attention kind follows it)."""
    out = []
    for mha, _ in layers:
        parts = mha.split(".")  # model.bottom.i. / model.top.i. / model.blocks.b.mha.m.
        if parts[1] == "blocks":
            out.append(config.blocks[int(parts[2])]["mha"][int(parts[4])])
        else:
            out.append((config.bottom_layers if parts[1] == "bottom" else config.top_layers)[int(parts[2])])
    return out


def _constant_choice(reader: SafetensorsReader, block: int, kind: str, origins: list) -> list[int | None] | None:
    """The live slot each step picks (None: it skips), if the router is constant and strict; else None."""
    from mom_cli.modeling.modeling_mom import Router

    bias = reader.get(router_key(block, kind, "step_bias")).float()
    picks = Router.constant_picks(reader.get(router_key(block, kind, "head.weight")), bias, 1)
    if picks is None:
        return None
    if bias.shape[-1] > 1:
        top2 = bias.topk(2, dim=-1).values
        if not bool((top2[:, 0] > top2[:, 1]).all()):
            return None  # ties: the choice is not well defined
    chosen = [step[0] for step in picks]
    return [m if m < len(origins) and origins[m] is not None else None for m in chosen]


@releases_locks
def export(
    ckpt: Path, out: Path, fmt: str, dtype: torch.dtype | None, shard_bytes: int, force: bool
) -> tuple[Path, str]:
    """Returns the output path and what was written ("standard", "remote-code" or "safetensors")."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    config, reader = read_mom(ckpt)
    if fmt == "safetensors":
        return _export_flat(config, reader, out, dtype, shard_bytes, force), "safetensors"
    layers = plain_layer_order(config, reader)
    if layers is not None and family_named(config.family).plain_stack_ok(config, layer_origins(config, layers)):
        return _export_standard(ckpt, config, reader, layers, out, dtype, shard_bytes, force), "standard"
    return _export_remote_code(ckpt, config, reader, out, dtype, shard_bytes, force), "remote-code"


def _stream(tensors: list[PlannedTensor], directory: Path, shard_bytes: int, metadata: dict | None = None) -> None:
    with progress() as bar:
        task = bar.add_task("writing tensors", total=len(tensors))
        write_safetensors(directory, tensors, shard_bytes, metadata, lambda t: bar.advance(task))


def _export_standard(ckpt, config, reader, layers, out, dtype, shard_bytes, force) -> Path:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    family = family_named(config.family)
    derived: dict[str, Derived] = dict(family.globals_to_source(config))
    for i, (mha, ffn) in enumerate(layers):
        derived.update(family.layer_to_source(i, mha, ffn, config))
    cfg_dict = family.source_config(config, layer_origins(config, layers))
    cfg_dict.pop("model_type", None)
    cfg_dict.pop(
        "quantization_config", None
    )  # a GGUF source's, made before it was dropped on reading: the weights are float
    src_cfg = AutoConfig.for_model(config.source_model_type, **cfg_dict)
    if dtype is not None:
        src_cfg.dtype = str(dtype).removeprefix("torch.")
    src_cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.source_model_type]]
    # Shapes by deriving each tensor from meta tensors: the names are the source's files' (Mixtral's
    # per-expert w1/w2/w3), which transformers converts on load to its in-memory layout.
    meta = lambda k: torch.empty(reader.shape(k), dtype=reader.dtype(k), device="meta")  # noqa: E731
    planned = [
        PlannedTensor(
            name, tuple(r.build(meta).shape), dtype or reader.dtype(r.keys[0]), lambda r=r: r.build(reader.get)
        )
        for name, r in derived.items()
    ]
    log(f"export {ckpt}: plain stack of {len(layers)} layers -> standard {config.source_model_type} format")
    with atomic_dir(out, force) as tmp:
        src_cfg.save_pretrained(tmp)
        _stream(planned, tmp, shard_bytes)
        copy_extras(ckpt, tmp)
        (tmp / "README.md").write_text(model_card(config, "nothing", src_cfg.architectures[0]))
    return out


def _export_remote_code(ckpt, config, reader, out, dtype, shard_bytes, force) -> Path:
    config = MomConfig.from_dict(config.to_dict())
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    log(f"export {ckpt}: routed MoM -> trust_remote_code directory")
    with atomic_dir(out, force) as tmp:
        self_describing(config, tmp)
        config.save_pretrained(tmp)
        _stream(copy_plan(reader, config, dtype), tmp, shard_bytes)
        copy_extras(ckpt, tmp)
        (tmp / "README.md").write_text(model_card(config, "remote-code"))
    return out


def _export_flat(config, reader, out, dtype, shard_bytes, force) -> Path:
    meta = {"mom_config": json.dumps(config.to_dict())}
    tensors = copy_plan(reader, config, dtype)
    if out.suffix == ".safetensors":
        if sum(t.nbytes for t in tensors) > shard_bytes:
            raise UsageError(f"{out} would exceed --shard-size; give a directory as -o to write shards")
        with atomic_file(out, force) as tmp, progress() as bar:
            task = bar.add_task("writing tensors", total=len(tensors))
            write_file(tmp, tensors, {"format": "pt", **meta}, lambda t: bar.advance(task))
        return out
    with atomic_dir(out, force) as tmp:
        _stream(tensors, tmp, shard_bytes, meta)
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported model directory to a Hugging Face Hub model repository (created if
    needed; the token is the one `hf auth login` saved, or HF_TOKEN). Returns the commit URL."""
    from huggingface_hub import HfApi

    from mom_cli.errors import MomError

    check_repo_id(repo_id)
    if not Path(folder).is_dir():
        raise UsageError("--push-to-hub uploads a model directory: use --format hf, or a directory as -o")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload {Path(folder).name} with mom",
        )
    except Exception as e:  # network, authentication, permissions: one line, the hub's own words
        raise MomError(
            f"pushing {folder} to the hub as {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    return str(getattr(info, "commit_url", None) or info)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UsageError(f"--push-to-hub {repo_id!r} is not a hub repository id (name or org/name)") from None
