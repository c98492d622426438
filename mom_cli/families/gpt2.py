"""GPT-2: Conv1D weights stored (in, out), a fused c_attn, learned positions, biases, tied head."""
from __future__ import annotations

from typing import Any

import torch

from mom_cli.families import Derived, same


def _prefix(keys: set[str]) -> str:
    # GPT2LMHeadModel saves "transformer.h.0...", the original hub `gpt2` files save "h.0...".
    return "transformer." if "transformer.wte.weight" in keys else ""


def _t(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].t().contiguous()


def _part(j: int, transpose: bool) -> Any:
    def fn(ts: list[torch.Tensor]) -> torch.Tensor:
        w = ts[0].chunk(3, dim=-1)[j]
        return w.t().contiguous() if transpose else w.contiguous()

    return fn


def _fuse_qkv(ts: list[torch.Tensor]) -> torch.Tensor:
    if ts[0].dim() == 1:
        return torch.cat(ts, dim=0)
    return torch.cat([t.t() for t in ts], dim=1).contiguous()


class _GPT2:
    name = "gpt2"
    # the transformers model's decoder layers, each layer's two pre-norms and the final norm
    hf_norms = ("transformer.h", "ln_1", "ln_2", "transformer.ln_f")
    model_types = ("gpt2",)

    def num_layers(self, cfg: Any) -> int:
        return cfg.n_layer

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        return dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.n_embd,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            head_dim=cfg.n_embd // cfg.n_head,
            intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
            hidden_act=cfg.activation_function,
            norm_type="layernorm",
            norm_eps=cfg.layer_norm_epsilon,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            gated_mlp=False,
            position_type="learned",
            max_position_embeddings=cfg.n_positions,
            tie_word_embeddings=True,
        )

    def mha_from_source(self, i: int, keys: set[str]) -> dict[str, Derived]:
        p = f"{_prefix(keys)}h.{i}."
        out = {"norm.weight": same(p + "ln_1.weight"), "norm.bias": same(p + "ln_1.bias")}
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{proj}.weight"] = Derived((p + "attn.c_attn.weight",), _part(j, transpose=True))
            out[f"{proj}.bias"] = Derived((p + "attn.c_attn.bias",), _part(j, transpose=False))
        out["o_proj.weight"] = Derived((p + "attn.c_proj.weight",), _t)
        out["o_proj.bias"] = same(p + "attn.c_proj.bias")
        return out

    def ffn_from_source(self, i: int, keys: set[str]) -> dict[str, Derived]:
        p = f"{_prefix(keys)}h.{i}."
        return {
            "norm.weight": same(p + "ln_2.weight"),
            "norm.bias": same(p + "ln_2.bias"),
            "fc_in.weight": Derived((p + "mlp.c_fc.weight",), _t),
            "fc_in.bias": same(p + "mlp.c_fc.bias"),
            "fc_out.weight": Derived((p + "mlp.c_proj.weight",), _t),
            "fc_out.bias": same(p + "mlp.c_proj.bias"),
        }

    def globals_from_source(self, keys: set[str], tied: bool) -> dict[str, Derived]:
        p = _prefix(keys)
        return {
            "model.embed_tokens.weight": same(p + "wte.weight"),
            "model.embed_positions.weight": same(p + "wpe.weight"),
            "model.norm.weight": same(p + "ln_f.weight"),
            "model.norm.bias": same(p + "ln_f.bias"),
        }

    def layer_to_source(self, i: int, mha: str, ffn: str, mom_cfg: Any) -> dict[str, Derived]:
        p = f"transformer.h.{i}."
        qkv = tuple(f"{mha}{proj}" for proj in ("q_proj", "k_proj", "v_proj"))
        return {
            p + "ln_1.weight": same(mha + "norm.weight"),
            p + "ln_1.bias": same(mha + "norm.bias"),
            p + "attn.c_attn.weight": Derived(tuple(k + ".weight" for k in qkv), _fuse_qkv),
            p + "attn.c_attn.bias": Derived(tuple(k + ".bias" for k in qkv), _fuse_qkv),
            p + "attn.c_proj.weight": Derived((mha + "o_proj.weight",), _t),
            p + "attn.c_proj.bias": same(mha + "o_proj.bias"),
            p + "ln_2.weight": same(ffn + "norm.weight"),
            p + "ln_2.bias": same(ffn + "norm.bias"),
            p + "mlp.c_fc.weight": Derived((ffn + "fc_in.weight",), _t),
            p + "mlp.c_fc.bias": same(ffn + "fc_in.bias"),
            p + "mlp.c_proj.weight": Derived((ffn + "fc_out.weight",), _t),
            p + "mlp.c_proj.bias": same(ffn + "fc_out.bias"),
        }

    def globals_to_source(self, mom_cfg: Any) -> dict[str, Derived]:
        return {
            "transformer.wte.weight": same("model.embed_tokens.weight"),
            "transformer.wpe.weight": same("model.embed_positions.weight"),
            "transformer.ln_f.weight": same("model.norm.weight"),
            "transformer.ln_f.bias": same("model.norm.bias"),
        }

    def source_config(self, mom_cfg: Any, n_layers: int) -> dict[str, Any]:
        cfg = dict(mom_cfg.source_config)
        cfg["n_layer"] = n_layers
        return cfg


GPT2 = _GPT2()
