"""Model families: how a source architecture's tensors map to and from MoM modules.

Each family is one small file defining a `Family`. Adding a family is adding a file and one line
in `_registry`. A family answers:
  - which source configs it takes (`model_types`), which config fields it understands
    (`understood`: any other field set to a non-default value is refused), and the `MomConfig`
    fields they imply (`mom_kwargs`: sizes and the runtime's family quirks);
  - one table per layer and one for the globals: `Entry`s pairing source tensors with MoM
    tensors. The same table is read source -> modules by `mom decompose` and modules -> source
    by `mom export --format hf` (a MoM that is still a plain stack of layers), so a mapping is
    written once.
Module keys in a layer table start with "mha." or "ffn." (the modules of source layer i).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mom_cli.errors import UsageError

Transform = Callable[[list[torch.Tensor]], torch.Tensor]
Many = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class Derived:
    """A tensor derived from named tensors of another checkpoint (read lazily, on demand)."""

    keys: tuple[str, ...]
    fn: Transform | None = None  # None: the single key's tensor as it is

    def build(self, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        tensors = [get(k) for k in self.keys]
        return tensors[0] if self.fn is None else self.fn(tensors)


@dataclass(frozen=True)
class Entry:
    """Source tensors <-> MoM tensors. `to_mom` makes every MoM tensor from all the source ones
    and `to_source` inverts it exactly (pure reshuffles: split/concatenate, transpose, stack)."""

    source: tuple[str, ...]
    mom: tuple[str, ...]
    to_mom: Many | None = None  # None: one tensor, as it is
    to_source: Many | None = None


def same(source: str, mom: str) -> Entry:
    return Entry((source,), (mom,))


def transposed(source: str, mom: str) -> Entry:
    """GPT-2's Conv1D stores (in, out); a Linear stores (out, in)."""
    t = lambda ts: [ts[0].t().contiguous()]
    return Entry((source,), (mom,), t, t)


def split_rows(source: str, mom: tuple[str, ...], sizes: list[int]) -> Entry:
    """A fused projection (Phi-3's qkv_proj, gate_up_proj) <-> its parts, stacked by rows."""
    return Entry(
        (source,),
        mom,
        lambda ts: [p.contiguous() for p in ts[0].split(sizes, dim=0)],
        lambda ts: [torch.cat(ts, dim=0)],
    )


def _pick(fn: Many | None, j: int) -> Transform | None:
    return None if fn is None else (lambda ts: fn(ts)[j])


def derive_mom(entries: list[Entry], prefix: str = "") -> dict[str, Derived]:
    return {prefix + m: Derived(e.source, _pick(e.to_mom, j)) for e in entries for j, m in enumerate(e.mom)}


def derive_source(entries: list[Entry], rename: Callable[[str], str] = lambda k: k) -> dict[str, Derived]:
    return {
        s: Derived(tuple(rename(m) for m in e.mom), _pick(e.to_source, j))
        for e in entries
        for j, s in enumerate(e.source)
    }


class Family:
    """Base of every family: the table readers, the config check and the config round trip."""

    name: str
    model_types: tuple[str, ...]
    understood: frozenset[str]
    layers_field = "num_hidden_layers"
    optional_prefix = ""  # a prefix some checkpoints of the family omit (the hub's `gpt2` files)
    # The transformers model's decoder layers, and in each layer the modules whose input is the
    # residual stream before attention and before the FFN, and the final norm (module paths): `mom
    # heal` caches the teacher's residual stream there. None where there is no such point (GPT-NeoX's
    # parallel residual has no residual stream between attention and FFN).
    residual_inputs: tuple[str, str, str, str] | None = (
        "model.layers",
        "input_layernorm",
        "post_attention_layernorm",
        "model.norm",
    )

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        raise NotImplementedError

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        raise NotImplementedError

    def globals(self, mom_cfg: Any) -> list[Entry]:
        raise NotImplementedError

    def num_layers(self, cfg: Any) -> int:
        return getattr(cfg, self.layers_field)

    def modules_from_source(self, i: int, mom_cfg: Any, kind: str) -> dict[str, Derived]:
        """MHA (kind "mha") or FFN ("ffn") module i's tensors, keyed inside the module."""
        entries = [e for e in self.layer(i, mom_cfg) if e.mom[0].startswith(kind + ".")]
        return {k.removeprefix(kind + "."): r for k, r in derive_mom(entries).items()}

    def globals_from_source(self, mom_cfg: Any) -> dict[str, Derived]:
        return derive_mom(self.globals(mom_cfg))

    def layer_to_source(self, i: int, mha: str, ffn: str, mom_cfg: Any) -> dict[str, Derived]:
        """Source layer i's tensors from the MoM modules at prefixes `mha` and `ffn`."""
        rename = lambda k: (mha if k.startswith("mha.") else ffn) + k[4:]
        return derive_source(self.layer(i, mom_cfg), rename)

    def globals_to_source(self, mom_cfg: Any) -> dict[str, Derived]:
        return derive_source(self.globals(mom_cfg))

    def source_config(self, mom_cfg: Any, origins: list[int]) -> dict[str, Any]:
        """The source config for a plain stack of the source layers `origins` (in order): the
        per-layer fields follow each layer's origin."""
        cfg = dict(mom_cfg.source_config)
        cfg[self.layers_field] = len(origins)
        if cfg.get("layer_types"):
            cfg["layer_types"] = [mom_cfg.attention_types[o] for o in origins]
        return cfg

    def plain_stack_ok(self, mom_cfg: Any, origins: list[int]) -> bool:
        """Whether the source format can hold these layers in this order (else: remote code)."""
        return True


# Fields of every config that do not change the function of a causal LM at inference.
IGNORED = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "_model_name_or_path",
        "_commit_hash",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "use_cache",
        "initializer_range",
        "tie_word_embeddings",
        "id2label",
        "label2id",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "problem_type",
        "chunk_size_feed_forward",
        "tokenizer_class",
        "task_specific_params",
        "prefix",
        "finetuning_task",
        "is_encoder_decoder",
        "vocab_size",
        "max_position_embeddings",
        "_attn_implementation_autoset",
        "output_router_logits",
        "router_aux_loss_coef",
        "classifier_dropout",
        "cache_implementation",  # a generation setting: mom's cache masks windows itself
        "auto_map",  # remote code the hub ships for old transformers; mom reads with the native class
    }
)


def _ignored(field: str, value: Any) -> bool:
    if field == "quantization_config":  # a GGUF source is dequantised on reading; others are refused
        method = (value or {}).get("quant_method")
        return getattr(method, "value", method) == "gguf"
    # Special tokens' ids (unk, mask, cls, ... as GGUF metadata sets them) name tokens; they compute nothing.
    if field.endswith(("_token_id", "_token_ids")):
        return True
    return field in IGNORED or "dropout" in field or field.endswith("pdrop") or field.startswith("summary_")


def check_supported(family: Family, cfg: Any) -> None:
    """Refuse a source whose config sets a field the family does not understand."""
    try:
        default = type(cfg)().to_dict()
    except (TypeError, ValueError):  # a config class that needs arguments: compare against nothing
        default = {}
    for field, value in cfg.to_dict().items():
        if field in family.understood or _ignored(field, value):
            continue
        if field not in default or default[field] != value:
            raise UsageError(f"{cfg.model_type}: {field}={value} is not supported yet")


def _registry() -> dict[str, Family]:
    from mom_cli.families.gemma import GEMMA
    from mom_cli.families.gpt2 import GPT2
    from mom_cli.families.gpt_neox import GPT_NEOX
    from mom_cli.families.granite import GRANITE
    from mom_cli.families.llama import LLAMA
    from mom_cli.families.moe import MOE
    from mom_cli.families.olmo2 import OLMO2
    from mom_cli.families.phi3 import PHI3

    return {f.name: f for f in (GPT2, LLAMA, GEMMA, PHI3, OLMO2, GRANITE, GPT_NEOX, MOE)}


def supported_model_types() -> list[str]:
    return sorted(t for f in _registry().values() for t in f.model_types)


def family_for(model_type: str) -> Family:
    for fam in _registry().values():
        if model_type in fam.model_types:
            return fam
    raise UsageError(f"unsupported model family {model_type!r}: mom supports {', '.join(supported_model_types())}")


def family_named(name: str) -> Family:
    return _registry()[name]
