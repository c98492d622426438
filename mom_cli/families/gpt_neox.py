"""GPT-NeoX / Pythia: LayerNorm with biases, a fused query_key_value interleaved per head,
partial rotary, a GELU MLP, an untied `embed_out` head, and the parallel residual
x += MHA(x) + FFN(x) (when use_parallel_residual)."""

from __future__ import annotations

from typing import Any

import torch

from mom_cli.families import Entry, Family, same


def _qkv(n_heads: int) -> tuple[Any, Any]:
    """query_key_value rows are (head, q|k|v, head_dim): per-head interleaved, unlike Phi-3's [q; k; v]."""

    def split(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        w = ts[0].view(n_heads, 3, -1, *ts[0].shape[1:])
        return [w[:, j].reshape(-1, *ts[0].shape[1:]).contiguous() for j in range(3)]

    def fuse(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        parts = [t.view(n_heads, 1, -1, *t.shape[1:]) for t in ts]
        return [torch.cat(parts, dim=1).reshape(-1, *ts[0].shape[1:]).contiguous()]

    return split, fuse


class _GPTNeoX(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    residual_inputs = None
    understood = frozenset(
        {
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "layer_norm_eps",
            "use_parallel_residual",
            "rope_parameters",
            "attention_bias",
        }
    )

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        return dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            hidden_act=cfg.hidden_act,
            norm_type="layernorm",
            norm_eps=cfg.layer_norm_eps,
            qkv_bias=cfg.attention_bias,
            o_bias=cfg.attention_bias,
            mlp_bias=True,
            gated_mlp=False,
            position_type="rope",
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters=dict(cfg.rope_parameters),
            rotary_embedding="GPTNeoXRotaryEmbedding",
            parallel_residual=cfg.use_parallel_residual,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
        )

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        p = f"gpt_neox.layers.{i}."
        split, fuse = _qkv(mom_cfg.num_attention_heads)
        qkv = ("mha.q_proj", "mha.k_proj", "mha.v_proj")
        out = [
            same(p + "input_layernorm.weight", "mha.norm.weight"),
            same(p + "input_layernorm.bias", "mha.norm.bias"),
            Entry((p + "attention.query_key_value.weight",), tuple(k + ".weight" for k in qkv), split, fuse),
            same(p + "attention.dense.weight", "mha.o_proj.weight"),
            same(p + "post_attention_layernorm.weight", "ffn.norm.weight"),
            same(p + "post_attention_layernorm.bias", "ffn.norm.bias"),
            same(p + "mlp.dense_h_to_4h.weight", "ffn.fc_in.weight"),
            same(p + "mlp.dense_h_to_4h.bias", "ffn.fc_in.bias"),
            same(p + "mlp.dense_4h_to_h.weight", "ffn.fc_out.weight"),
            same(p + "mlp.dense_4h_to_h.bias", "ffn.fc_out.bias"),
        ]
        if mom_cfg.qkv_bias:
            out += [
                Entry((p + "attention.query_key_value.bias",), tuple(k + ".bias" for k in qkv), split, fuse),
                same(p + "attention.dense.bias", "mha.o_proj.bias"),
            ]
        return out

    def globals(self, mom_cfg: Any) -> list[Entry]:
        out = [
            same("gpt_neox.embed_in.weight", "model.embed_tokens.weight"),
            same("gpt_neox.final_layer_norm.weight", "model.norm.weight"),
            same("gpt_neox.final_layer_norm.bias", "model.norm.bias"),
        ]
        return out if mom_cfg.tie_word_embeddings else out + [same("embed_out.weight", "lm_head.weight")]


GPT_NEOX = _GPTNeoX()
