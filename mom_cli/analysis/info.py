"""`mom info`: what a MoM checkpoint is: its plan, pools, parameters, FLOPs per token, history.

Counting works on the config alone (a meta-device model), so it is instant for any size.
"Active" parameters are those one token can touch: every plain layer, and per routed step the
top-K modules of each pool (at most; SKIP lowers it) and both routers. Given the router weights,
constant (identity-style) routers are counted exactly, so pruned steps cost nothing.
A PEER FFN module touches its query network, BatchNorm and sub-keys, and only the h*k experts it
retrieves, not all N (`peer_costs`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from mom_cli.io.checkpoint import meta_model, router_key
from mom_cli.modeling.configuration_mom import MomConfig

TensorGetter = Callable[[str], torch.Tensor]


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def peer_costs(kw: dict[str, Any]) -> dict[str, int]:
    """Parameters (total, active per token) and multiply-adds per token of a PEER layer, from its
    `PeerLayer.config_dict()`.

    Active: the query network and its BatchNorm, the sub-keys (every token scores all of them),
    the output bias, and the rows of the h*k retrieved experts (at most N). Multiply-adds per head:
    retrieval scores sqrt(N) sub-keys per half, re-scores the k' = min(k, sqrt N) chosen ones and
    sums k'^2 candidate pairs (counted as one each): O((sqrt N + k^2) d_key), never O(N); then each
    retrieved expert costs 2 (3 when gated) dot products of width d.
    """
    d, n, h, k, dk = kw["d_model"], kw["n_experts"], kw["heads"], kw["topk"], kw["key_dim"]
    gated, bias = bool(kw["gated"]), bool(kw["in_bias"])
    n_sub, kk = math.isqrt(n), min(kw["topk"], math.isqrt(n))
    expert = (2 + gated) * d + bias * (1 + gated)  # w_in, w_out, [w_gate] rows and their biases
    query = h * dk * (d + 1) + (2 * h * dk if kw["query_bn"] else 0)
    keys = (1 if kw["shared_keys"] else h) * n_sub * dk  # two halves of sqrt(N) x d_key/2
    out_bias = d if kw["out_bias"] else 0
    retrieval = h * ((n_sub + kk) * dk + kk * kk)
    return {
        "params_total": query + keys + n * expert + out_bias,
        "params_active": query + keys + min(h * k, n) * expert + out_bias,
        "macs": h * dk * d + retrieval + h * k * (2 + gated) * d,
    }


def _module_cost(module: Any) -> tuple[int, int]:
    """(active parameters, multiply-adds) of one call of a pooled module on one token."""
    moe = getattr(module, "moe", None)
    if moe is not None:  # a sparse MoE block: its router on every token, top_k of its experts
        experts = _count(moe.experts)
        n = _count(module) - experts + experts * moe.gate.top_k // moe.gate.num_experts
        return n, n
    peer = getattr(module, "peer", None)
    if peer is None:
        n = _count(module)
        return n, n
    c = peer_costs(peer.config_dict())
    norm = _count(module.norm)
    return norm + c["params_active"], norm + c["macs"]


def _peer_rows(block_id: int, spec: dict, block: Any, cost: dict[int, tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per PEER module of a block: its shape, parameters and FLOPs per call."""
    rows = []
    for slot, module in block.ffn.items():
        if getattr(module, "peer", None) is None:
            continue
        kw = module.peer.config_dict()
        rows.append(
            {
                "module": f"{block_id}.{slot}",
                "origin": spec["ffn"][int(slot)],
                **{
                    key: kw[key] for key in ("n_experts", "heads", "topk", "key_dim", "gate", "query_bn", "shared_keys")
                },
                "params_total": _count(module),
                "params_active_per_token": cost[int(slot)][0],
                "flops_per_call": 2 * cost[int(slot)][1],
            }
        )
    return rows


def _constant_picks(get: TensorGetter | None, block: int, kind: str, k: int) -> list[list[int]] | None:
    """For a router with a zero head, the slots each step picks (the same for every token)."""
    from mom_cli.modeling.modeling_mom import Router

    if get is None:
        return None
    return Router.constant_picks(
        get(router_key(block, kind, "head.weight")), get(router_key(block, kind, "step_bias")), k
    )


def _pool_cost(
    spec: dict, kind: str, k: int, picks: list[list[int]] | None, cost: dict[int, tuple[int, int]]
) -> tuple[int, float, int]:
    """(active parameters, multiply-adds per token, steps that call any module) of one pool.

    `cost`: (active parameters, multiply-adds) per live slot. Learned routing is counted at most:
    the largest modules a token could choose.
    """
    live = {m for m, origin in enumerate(spec[kind]) if origin is not None}
    h = spec["steps"]
    if picks is not None:  # constant routing: exactly what runs
        chosen = [[m for m in step if m in live] for step in picks]
        flat = [m for step in chosen for m in step]
        return (
            sum(cost[m][0] for m in set(flat)),
            float(sum(cost[m][1] for m in flat)),
            sum(1 for step in chosen if step),
        )
    share = len(live) / max(len(spec[kind]), 1)  # learned routing: removed slots' tokens SKIP
    largest = sorted((cost[m][0] for m in live), reverse=True)[: h * k]
    return sum(largest), h * k * share * max((cost[m][1] for m in live), default=0), h if live else 0


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
    router_macs = 0  # both routers run at every step (a GRU cell and head, or the MLP): ~1 multiply-add per weight
    blocks, peer_modules = [], []
    for i, (spec, block) in enumerate(zip(config.blocks, m.blocks)):
        routers = _count(block.mha_router) + _count(block.ffn_router)
        k, h = config.router_top_k, spec["steps"]
        mha_cost = {int(s): _module_cost(x) for s, x in block.mha.items()}
        ffn_cost = {int(s): _module_cost(x) for s, x in block.ffn.items()}
        mha_active, mha_macs, mha_steps = _pool_cost(spec, "mha", k, _constant_picks(get, i, "mha", k), mha_cost)
        ffn_active, ffn_macs, _ = _pool_cost(spec, "ffn", k, _constant_picks(get, i, "ffn", k), ffn_cost)
        active += mha_active + ffn_active + routers
        matmul += mha_macs + ffn_macs + h * routers
        router_macs += h * routers
        attn_calls += mha_steps
        peer_modules += _peer_rows(i, spec, block, ffn_cost)
        blocks.append(
            {
                "block": i,
                "mha_modules": len(block.mha),
                "ffn_modules": len(block.ffn),
                "skip": config.skip,
                "steps": h,
                "top_k": k,
                "mha_origins": spec["mha"],
                "ffn_origins": spec["ffn"],
                "router": config.router,
                "router_params": routers,
            }
        )
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
        "flops_per_token": int(2 * matmul + attn_flops),  # routers included
        "router_flops_per_token": int(2 * router_macs),
        "flops_seq_len": seq_len,
        "peer": config.peer,
        "peer_modules": peer_modules,
        "verification": next((r.get("verify") for r in config.mom_provenance if r.get("command") == "decompose"), None),
        "provenance": config.mom_provenance,
    }
