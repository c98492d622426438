"""Sparse MoE families: Mixtral and Qwen3-MoE. Attention as Llama's (Qwen3-MoE adds per-head q/k
norms); each layer's sparse MoE block becomes one FFN module of the pool, run by the family's own
`transformers` block (its top-k router over its experts). The files store one tensor per expert
and projection; the block holds them stacked (gate and up fused), so the table stacks and splits."""

from __future__ import annotations

from typing import Any

import torch

from mom_cli.families import Entry, Family, same
from mom_cli.families.llama import (
    LLAMA_FIELDS,
    LLAMA_NORMS,
    attention_entries,
    llama_globals,
    llama_kwargs,
    norm_entries,
)

# model_type -> (MoE block class, its prefix in a layer, expert projection names: gate, up, down)
_LAYOUT = {
    "mixtral": ("MixtralSparseMoeBlock", "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock", "mlp", ("gate_proj", "up_proj", "down_proj")),
}


def _gate_up(n: int) -> tuple[Any, Any]:
    def stack(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack([torch.cat([g, u], dim=0) for g, u in zip(ts[:n], ts[n:])])]

    def unstack(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        gates, ups = zip(*(e.chunk(2, dim=0) for e in ts[0].unbind(0)))
        return [t.contiguous() for t in (*gates, *ups)]

    return stack, unstack


def _stack(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.stack(ts)]


def _unstack(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.contiguous() for t in ts[0].unbind(0)]


class _Moe(Family):
    name = "moe"
    model_types = tuple(_LAYOUT)
    understood = LLAMA_FIELDS | {
        "num_local_experts",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "router_jitter_noise",  # training-time noise only
    }

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        qk = "head" if any(k.endswith("layers.0.self_attn.q_norm.weight") for k in keys) else None
        return llama_kwargs(cfg, keys, qk_norm=qk, moe_block=_LAYOUT[cfg.model_type][0])

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        _, block, (gate, up, down) = _LAYOUT[mom_cfg.source_model_type]
        n = mom_cfg.source_config["num_local_experts"]  # Qwen3-MoE's num_experts, saved under this name
        p = f"model.layers.{i}."
        e = f"{p}{block}.experts."
        stack, unstack = _gate_up(n)
        return (
            norm_entries(p, LLAMA_NORMS)
            + attention_entries(p, mom_cfg)
            + [
                same(f"{p}{block}.gate.weight", "ffn.moe.gate.weight"),
                Entry(
                    tuple(f"{e}{j}.{proj}.weight" for proj in (gate, up) for j in range(n)),
                    ("ffn.moe.experts.gate_up_proj",),
                    stack,
                    unstack,
                ),
                Entry(
                    tuple(f"{e}{j}.{down}.weight" for j in range(n)), ("ffn.moe.experts.down_proj",), _stack, _unstack
                ),
            ]
        )

    def globals(self, mom_cfg: Any) -> list[Entry]:
        return llama_globals(mom_cfg)


MOE = _Moe()
