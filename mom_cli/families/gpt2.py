"""GPT-2: Conv1D weights stored (in, out), a fused c_attn, learned positions, biases, tied head."""

from __future__ import annotations

from typing import Any

import torch

from mom_cli.families import Entry, Family, same, transposed


def _split_qkv(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    parts = ts[0].chunk(3, dim=-1)
    return [p.t().contiguous() if p.dim() == 2 else p.contiguous() for p in parts]


def _fuse_qkv(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(ts, dim=0) if ts[0].dim() == 1 else torch.cat([t.t() for t in ts], dim=1).contiguous()]


class _GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    layers_field = "n_layer"
    residual_inputs = ("transformer.h", "ln_1", "ln_2", "transformer.ln_f")
    optional_prefix = "transformer."  # GPT2LMHeadModel saves "transformer.h.0...", the hub's `gpt2` "h.0..."
    understood = frozenset(
        {
            "n_layer",
            "n_embd",
            "n_head",
            "n_inner",
            "n_positions",
            "activation_function",
            "layer_norm_epsilon",
            "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx",
            # Upcasts and reorders the eager attention's matmul: the same function (float32 exact).
            "reorder_and_upcast_attn",
        }
    )

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
            attn_scale=None if cfg.scale_attn_weights else 1.0,
            attn_scale_by_layer=bool(cfg.scale_attn_by_inverse_layer_idx),
        )

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        p = f"transformer.h.{i}."
        qkv = ("mha.q_proj", "mha.k_proj", "mha.v_proj")
        return [
            same(p + "ln_1.weight", "mha.norm.weight"),
            same(p + "ln_1.bias", "mha.norm.bias"),
            Entry((p + "attn.c_attn.weight",), tuple(k + ".weight" for k in qkv), _split_qkv, _fuse_qkv),
            Entry((p + "attn.c_attn.bias",), tuple(k + ".bias" for k in qkv), _split_qkv, _fuse_qkv),
            transposed(p + "attn.c_proj.weight", "mha.o_proj.weight"),
            same(p + "attn.c_proj.bias", "mha.o_proj.bias"),
            same(p + "ln_2.weight", "ffn.norm.weight"),
            same(p + "ln_2.bias", "ffn.norm.bias"),
            transposed(p + "mlp.c_fc.weight", "ffn.fc_in.weight"),
            same(p + "mlp.c_fc.bias", "ffn.fc_in.bias"),
            transposed(p + "mlp.c_proj.weight", "ffn.fc_out.weight"),
            same(p + "mlp.c_proj.bias", "ffn.fc_out.bias"),
        ]

    def globals(self, mom_cfg: Any) -> list[Entry]:
        return [
            same("transformer.wte.weight", "model.embed_tokens.weight"),
            same("transformer.wpe.weight", "model.embed_positions.weight"),
            same("transformer.ln_f.weight", "model.norm.weight"),
            same("transformer.ln_f.bias", "model.norm.bias"),
        ]

    def plain_stack_ok(self, mom_cfg: Any, origins: list[int]) -> bool:
        # The scale 1/(layer+1) is by position in the stack: only the original order keeps it.
        return not mom_cfg.attn_scale_by_layer or origins == list(range(len(origins)))


GPT2 = _GPT2()
