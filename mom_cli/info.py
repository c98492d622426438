"""`mom info`: what a MoM checkpoint is: its plan, pools, parameters, FLOPs per token, history.

Counting works on the config alone (a meta-device model), so it is instant for any size.
"Active" parameters are those one token can touch: every plain layer, and per routed step the
top-K modules of each pool (at most; SKIP lowers it) and both routers. Given the router weights,
constant (identity-style) routers are counted exactly, so pruned steps cost nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .checkpoint import meta_model
from .configuration_mom import MomConfig

TensorGetter = Callable[[str], torch.Tensor]


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _constant_picks(get: TensorGetter | None, block: int, kind: str, k: int) -> list[list[int]] | None:
    """For a router with a zero head, the slots each step picks (the same for every token)."""
    if get is None:
        return None
    head = get(f"model.blocks.{block}.{kind}_router.head.weight")
    if torch.count_nonzero(head):
        return None
    bias = get(f"model.blocks.{block}.{kind}_router.step_bias").float()
    return bias.topk(min(k, bias.shape[-1]), dim=-1).indices.tolist()


def _pool_cost(spec: dict, kind: str, k: int, picks: list[list[int]] | None) -> tuple[int, float, int]:
    """(distinct live modules a token can touch, module calls per token, steps that call any)."""
    live = {m for m, origin in enumerate(spec[kind]) if origin is not None}
    h = spec["steps"]
    if picks is not None:  # constant routing: exactly what runs
        chosen = [[m for m in step if m in live] for step in picks]
        flat = [m for step in chosen for m in step]
        return len(set(flat)), float(len(flat)), sum(1 for step in chosen if step)
    share = len(live) / max(len(spec[kind]), 1)  # learned routing: removed slots' tokens SKIP
    return min(len(live), h * k), h * k * share, h if live else 0


def summary(config: MomConfig, seq_len: int = 1024, get: TensorGetter | None = None) -> dict[str, Any]:
    """Plan and costs from the config; with `get` (a tensor reader), constant routers are counted exactly."""
    model = meta_model(config)
    m = model.model
    embed = _count(m.embed_tokens) + (_count(m.embed_positions) if m.embed_positions is not None else 0)
    head = 0 if config.tie_word_embeddings else _count(model.lm_head)
    plain = sum(_count(layer) for layer in (*m.bottom, *m.top))
    total = embed + head + plain + _count(m.norm) + sum(_count(b) for b in m.blocks)
    head_params = model.lm_head.weight.numel()
    active = plain + head_params + _count(m.norm)  # distinct parameters one token can touch
    matmul = plain + head_params  # multiply-adds per token, counting reuse across steps
    attn_calls = len(config.bottom_layers) + len(config.top_layers)
    blocks = []
    for i, (spec, block) in enumerate(zip(config.blocks, m.blocks)):
        mha = max((_count(x) for x in block.mha.values()), default=0)
        ffn = max((_count(x) for x in block.ffn.values()), default=0)
        routers = _count(block.mha_router) + _count(block.ffn_router)
        k, h = config.router_top_k, spec["steps"]
        mha_live, mha_calls, mha_steps = _pool_cost(spec, "mha", k, _constant_picks(get, i, "mha", k))
        ffn_live, ffn_calls, _ = _pool_cost(spec, "ffn", k, _constant_picks(get, i, "ffn", k))
        active += mha_live * mha + ffn_live * ffn + routers
        matmul += mha_calls * mha + ffn_calls * ffn + h * routers
        attn_calls += mha_steps
        blocks.append({
            "block": i, "mha_modules": len(block.mha), "ffn_modules": len(block.ffn), "skip": config.skip,
            "steps": h, "top_k": k, "mha_origins": spec["mha"], "ffn_origins": spec["ffn"],
            "router": config.router, "router_params": routers,
        })
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
        "flops_per_token": int(2 * matmul + attn_flops),
        "flops_seq_len": seq_len,
        "peer": config.peer,
        "provenance": config.mom_provenance,
    }
