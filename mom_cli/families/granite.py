"""Granite: Llama's layers with four multipliers: embeddings, each sublayer's residual
contribution, the attention scores (instead of head_dim ** -0.5), and the logits (a divisor)."""

from __future__ import annotations

from typing import Any

from mom_cli.families import Entry, Family
from mom_cli.families.llama import (
    LLAMA_FIELDS,
    LLAMA_NORMS,
    attention_entries,
    llama_globals,
    llama_kwargs,
    mlp_entries,
    norm_entries,
)


class _Granite(Family):
    name = "granite"
    model_types = ("granite",)
    understood = LLAMA_FIELDS | {
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "logits_scaling",
    }

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        return llama_kwargs(
            cfg,
            keys,
            embed_scale=cfg.embedding_multiplier,
            residual_multiplier=cfg.residual_multiplier,
            attn_scale=cfg.attention_multiplier,
            logits_divisor=cfg.logits_scaling,
        )

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        p = f"model.layers.{i}."
        return norm_entries(p, LLAMA_NORMS) + attention_entries(p, mom_cfg) + mlp_entries(p, mom_cfg)

    def globals(self, mom_cfg: Any) -> list[Entry]:
        return llama_globals(mom_cfg)


GRANITE = _Granite()
