"""Phi-3 and Phi-4(-mini): Llama's layers with fused projections (qkv_proj = [q; k; v],
gate_up_proj = [gate; up]), split into the module's projections and fused back at export;
partial rotary (Phi-4-mini) through Phi-3's own rotary embedding."""

from __future__ import annotations

from typing import Any

from mom_cli.families import Entry, Family, same, split_rows
from mom_cli.families.llama import (
    LLAMA_FIELDS,
    LLAMA_NORMS,
    llama_globals,
    llama_kwargs,
    norm_entries,
)


class _Phi3(Family):
    name = "phi3"
    model_types = ("phi3",)
    understood = LLAMA_FIELDS | {"original_max_position_embeddings"}

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        kw = llama_kwargs(cfg, keys, rotary_embedding="Phi3RotaryEmbedding")
        return {**kw, "qkv_bias": False, "o_bias": False, "mlp_bias": False}  # Phi-3 has no biases

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        p = f"model.layers.{i}."
        q = mom_cfg.num_attention_heads * mom_cfg.head_dim
        kv = mom_cfg.num_key_value_heads * mom_cfg.head_dim
        f = mom_cfg.intermediate_size
        return norm_entries(p, LLAMA_NORMS) + [
            split_rows(
                p + "self_attn.qkv_proj.weight",
                ("mha.q_proj.weight", "mha.k_proj.weight", "mha.v_proj.weight"),
                [q, kv, kv],
            ),
            same(p + "self_attn.o_proj.weight", "mha.o_proj.weight"),
            split_rows(p + "mlp.gate_up_proj.weight", ("ffn.gate_proj.weight", "ffn.up_proj.weight"), [f, f]),
            same(p + "mlp.down_proj.weight", "ffn.down_proj.weight"),
        ]

    def globals(self, mom_cfg: Any) -> list[Entry]:
        return llama_globals(mom_cfg)


PHI3 = _Phi3()
