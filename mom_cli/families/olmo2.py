"""OLMo 2: Llama's layers with the norm after each sublayer instead of before (x += norm(f(x))),
and q/k norms over all heads at once."""

from __future__ import annotations

from typing import Any

from mom_cli.families import Entry, Family
from mom_cli.families.llama import (
    LLAMA_FIELDS,
    attention_entries,
    llama_globals,
    llama_kwargs,
    mlp_entries,
    norm_entries,
)

_NORMS = {"post_attention_layernorm": "mha.post_norm", "post_feedforward_layernorm": "ffn.post_norm"}


class _Olmo2(Family):
    name = "olmo2"
    model_types = ("olmo2",)
    residual_inputs = ("model.layers", "self_attn", "mlp", "model.norm")  # no pre-norms: the sublayers' inputs
    understood = LLAMA_FIELDS

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        return llama_kwargs(cfg, keys, pre_norm=False, post_norm=True, qk_norm="full", rmsnorm="float32")

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        p = f"model.layers.{i}."
        return norm_entries(p, _NORMS) + attention_entries(p, mom_cfg) + mlp_entries(p, mom_cfg)

    def globals(self, mom_cfg: Any) -> list[Entry]:
        return llama_globals(mom_cfg)


OLMO2 = _Olmo2()
