"""`mom info`: what a MoM checkpoint is: its plan, pools, parameters, FLOPs per token, history.

Counting works on the config alone (a meta-device model), so it is instant for any size.
"Active" parameters are those one token can touch: every plain layer, and per routed step the
top-K modules of each pool (at most; SKIP lowers it) and both routers.
"""
from __future__ import annotations

from typing import Any

from .checkpoint import meta_model
from .configuration_mom import MomConfig


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(config: MomConfig, seq_len: int = 1024) -> dict[str, Any]:
    model = meta_model(config)
    m = model.model
    embed = _count(m.embed_tokens) + (_count(m.embed_positions) if m.embed_positions is not None else 0)
    head = 0 if config.tie_word_embeddings else _count(model.lm_head)
    plain = sum(_count(layer) for layer in (*m.bottom, *m.top))
    total = embed + head + plain + _count(m.norm) + sum(_count(b) for b in m.blocks)
    head_params = model.lm_head.weight.numel()
    active = plain + head_params + _count(m.norm)  # distinct parameters one token can touch
    matmul = plain + head_params  # multiply-adds per token, counting reuse across steps
    blocks = []
    for i, (spec, block) in enumerate(zip(config.blocks, m.blocks)):
        mha = max((_count(x) for x in block.mha), default=0)
        ffn = max((_count(x) for x in block.ffn), default=0)
        routers = _count(block.mha_router) + _count(block.ffn_router)
        k, h = config.router_top_k, spec["steps"]
        active += min(len(block.mha), h * k) * mha + min(len(block.ffn), h * k) * ffn + routers
        matmul += h * (k * mha + k * ffn + routers)
        blocks.append({
            "block": i, "mha_modules": len(spec["mha"]), "ffn_modules": len(spec["ffn"]), "skip": config.skip,
            "steps": h, "top_k": k, "mha_origins": spec["mha"], "ffn_origins": spec["ffn"],
            "router": config.router, "router_params": routers,
        })
    attn_calls = config.num_attention_calls
    # 2 FLOPs per multiply-add; attention scores and mixing add 4 * seq * heads * head_dim per call.
    attn_flops = 4 * seq_len * config.num_attention_heads * config.head_dim * attn_calls
    return {
        "family": config.family,
        "source_model_type": config.source_model_type,
        "hidden_size": config.hidden_size,
        "bottom_layers": config.bottom_layers,
        "top_layers": config.top_layers,
        "blocks": blocks,
        "router_temperature": config.router_temperature,
        "attention_calls_per_token": attn_calls,
        "params_total": total,
        "params_active_per_token": active,
        "flops_per_token": 2 * matmul + attn_flops,
        "flops_seq_len": seq_len,
        "peer": config.peer,
        "provenance": config.mom_provenance,
    }
