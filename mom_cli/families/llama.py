"""The Llama family: Llama, SmolLM2, TinyLlama, Mistral, Qwen2 (RMSNorm, RoPE, SwiGLU, GQA)."""
from __future__ import annotations

from typing import Any

from mom_cli.families import Derived, same

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _present(prefix: str, projections: tuple[str, ...], keys: set[str]) -> dict[str, Derived]:
    """Each projection's weight and, where the source has one, its bias."""
    return {
        f"{proj}.{kind}": same(f"{prefix}{proj}.{kind}")
        for proj in projections
        for kind in ("weight", "bias")
        if f"{prefix}{proj}.{kind}" in keys
    }


class _Llama:
    name = "llama"
    # the transformers model's decoder layers, each layer's two pre-norms and the final norm
    hf_norms = ("model.layers", "input_layernorm", "post_attention_layernorm", "model.norm")
    model_types = ("llama", "mistral", "qwen2")

    def num_layers(self, cfg: Any) -> int:
        return cfg.num_hidden_layers

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        has = lambda k: f"model.layers.0.{k}" in keys  # noqa: E731  (biases differ: Qwen2 has qkv only)
        return dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            hidden_act=cfg.hidden_act,
            norm_type="rmsnorm",
            norm_eps=cfg.rms_norm_eps,
            qkv_bias=has("self_attn.q_proj.bias"),
            o_bias=has("self_attn.o_proj.bias"),
            mlp_bias=has("mlp.gate_proj.bias"),
            gated_mlp=True,
            position_type="rope",
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters=dict(cfg.rope_parameters) if getattr(cfg, "rope_parameters", None) else None,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )

    def mha_from_source(self, i: int, keys: set[str]) -> dict[str, Derived]:
        p = f"model.layers.{i}."
        return {"norm.weight": same(p + "input_layernorm.weight"), **_present(p + "self_attn.", _ATTN, keys)}

    def ffn_from_source(self, i: int, keys: set[str]) -> dict[str, Derived]:
        p = f"model.layers.{i}."
        return {"norm.weight": same(p + "post_attention_layernorm.weight"), **_present(p + "mlp.", _MLP, keys)}

    def globals_from_source(self, keys: set[str], tied: bool) -> dict[str, Derived]:
        out = {"model.embed_tokens.weight": same("model.embed_tokens.weight"), "model.norm.weight": same("model.norm.weight")}
        if not tied:
            out["lm_head.weight"] = same("lm_head.weight")
        return out

    def layer_to_source(self, i: int, mha: str, ffn: str, mom_cfg: Any) -> dict[str, Derived]:
        p = f"model.layers.{i}."
        out = {p + "input_layernorm.weight": same(mha + "norm.weight"), p + "post_attention_layernorm.weight": same(ffn + "norm.weight")}
        biases = {"q_proj": mom_cfg.qkv_bias, "k_proj": mom_cfg.qkv_bias, "v_proj": mom_cfg.qkv_bias, "o_proj": mom_cfg.o_bias}
        for proj in _ATTN:
            out[f"{p}self_attn.{proj}.weight"] = same(f"{mha}{proj}.weight")
            if biases[proj]:
                out[f"{p}self_attn.{proj}.bias"] = same(f"{mha}{proj}.bias")
        for proj in _MLP:
            out[f"{p}mlp.{proj}.weight"] = same(f"{ffn}{proj}.weight")
            if mom_cfg.mlp_bias:
                out[f"{p}mlp.{proj}.bias"] = same(f"{ffn}{proj}.bias")
        return out

    def globals_to_source(self, mom_cfg: Any) -> dict[str, Derived]:
        out = {"model.embed_tokens.weight": same("model.embed_tokens.weight"), "model.norm.weight": same("model.norm.weight")}
        if not mom_cfg.tie_word_embeddings:
            out["lm_head.weight"] = same("lm_head.weight")
        return out

    def source_config(self, mom_cfg: Any, n_layers: int) -> dict[str, Any]:
        cfg = dict(mom_cfg.source_config)
        cfg["num_hidden_layers"] = n_layers
        cfg.pop("layer_types", None)  # recomputed by transformers for the new depth
        return cfg


LLAMA = _Llama()
