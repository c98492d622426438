"""Gemma 2 and Gemma 3 (text): Llama's layers with sandwich norms (pre and post each sublayer),
(1 + w) RMSNorm, embeddings scaled by sqrt(d), GeGLU, attention scaled by query_pre_attn_scalar,
alternating sliding-window and global layers; Gemma 2 soft-caps attention scores and final
logits; Gemma 3 has per-head q/k norms and a RoPE base per attention type."""

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

_NORMS = {
    "input_layernorm": "mha.norm",
    "post_attention_layernorm": "mha.post_norm",
    "pre_feedforward_layernorm": "ffn.norm",
    "post_feedforward_layernorm": "ffn.post_norm",
}
_ROTARY = {"gemma2": "Gemma2RotaryEmbedding", "gemma3_text": "Gemma3RotaryEmbedding"}


class _Gemma(Family):
    name = "gemma"
    model_types = ("gemma2", "gemma3_text")
    residual_inputs = ("model.layers", "input_layernorm", "pre_feedforward_layernorm", "model.norm")
    understood = LLAMA_FIELDS | {
        "hidden_activation",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "_sliding_window_pattern",
        "sliding_window_pattern",
    }

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        return llama_kwargs(
            cfg,
            keys,
            rotary_embedding=_ROTARY[cfg.model_type],
            post_norm=True,
            rmsnorm="unit_offset",
            qk_norm="head" if cfg.model_type == "gemma3_text" else None,
            embed_scale=cfg.hidden_size**0.5,
            attn_scale=cfg.query_pre_attn_scalar**-0.5,
            attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
            final_softcap=getattr(cfg, "final_logit_softcapping", None),
        )

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        p = f"model.layers.{i}."
        return norm_entries(p, _NORMS) + attention_entries(p, mom_cfg) + mlp_entries(p, mom_cfg)

    def globals(self, mom_cfg: Any) -> list[Entry]:
        return llama_globals(mom_cfg)


GEMMA = _Gemma()
