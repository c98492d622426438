"""The Llama family: Llama, SmolLM2/3, TinyLlama, Mistral, Qwen2, Qwen3 (RMSNorm, RoPE, SwiGLU,
GQA; Qwen3's per-head q/k norms, SmolLM3's layers without RoPE, sliding windows).

Its helpers also serve the families whose layers are Llama's with a twist (Gemma, OLMo 2, Granite,
Phi-3, the MoE family).
"""

from __future__ import annotations

from typing import Any

from mom_cli.families import Entry, Family, same

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# What every Llama-like config says about sizes, RoPE and sliding windows.
LLAMA_FIELDS = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "rope_parameters",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
    }
)


def attention_layout(cfg: Any) -> dict[str, Any]:
    """Per-layer attention kinds: the source's `layer_types`, or one window for every layer (Mistral)."""
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if not types and window is not None:
        types = ["sliding_attention"] * cfg.num_hidden_layers
    return dict(attention_types=list(types) if types else None, attention_window=window)


def llama_kwargs(cfg: Any, keys: set[str], **quirks: Any) -> dict[str, Any]:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    has = lambda k: any(key.endswith(f"layers.0.{k}") for key in keys)  # biases differ: Qwen2 has qkv only
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        hidden_act=getattr(cfg, "hidden_activation", None) or cfg.hidden_act,
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
        **attention_layout(cfg),
        **quirks,
    )


def biased(source: str, mom: str, weight: bool, bias: bool) -> list[Entry]:
    return ([same(source + ".weight", mom + ".weight")] if weight else []) + (
        [same(source + ".bias", mom + ".bias")] if bias else []
    )


def attention_entries(p: str, cfg: Any) -> list[Entry]:
    """q/k/v/o (and their biases, and q/k norms) of `{p}self_attn.` <-> the MHA module."""
    out = [e for proj in _ATTN[:3] for e in biased(f"{p}self_attn.{proj}", f"mha.{proj}", True, cfg.qkv_bias)]
    out += biased(f"{p}self_attn.o_proj", "mha.o_proj", True, cfg.o_bias)
    if cfg.qk_norm:
        out += [
            same(f"{p}self_attn.q_norm.weight", "mha.q_norm.weight"),
            same(f"{p}self_attn.k_norm.weight", "mha.k_norm.weight"),
        ]
    return out


def mlp_entries(p: str, cfg: Any) -> list[Entry]:
    return [e for proj in _MLP for e in biased(f"{p}mlp.{proj}", f"ffn.{proj}", True, cfg.mlp_bias)]


def norm_entries(p: str, names: dict[str, str]) -> list[Entry]:
    """Source norm name -> the module norm it becomes ("mha.norm", "mha.post_norm", "ffn.norm", ...)."""
    return [same(f"{p}{src}.weight", f"{mom}.weight") for src, mom in names.items()]


LLAMA_NORMS = {"input_layernorm": "mha.norm", "post_attention_layernorm": "ffn.norm"}


def llama_globals(cfg: Any) -> list[Entry]:
    out = [
        same("model.embed_tokens.weight", "model.embed_tokens.weight"),
        same("model.norm.weight", "model.norm.weight"),
    ]
    return out if cfg.tie_word_embeddings else out + [same("lm_head.weight", "lm_head.weight")]


class _Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    understood = LLAMA_FIELDS | {"no_rope_layers", "no_rope_layer_interval"}

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]:
        qk = "head" if any(k.endswith("layers.0.self_attn.q_norm.weight") for k in keys) else None  # Qwen3
        rope_layers = getattr(cfg, "no_rope_layers", None)  # SmolLM3: 1 = this layer uses RoPE
        return llama_kwargs(cfg, keys, qk_norm=qk, rope_layers=rope_layers)

    def layer(self, i: int, mom_cfg: Any) -> list[Entry]:
        p = f"model.layers.{i}."
        return norm_entries(p, LLAMA_NORMS) + attention_entries(p, mom_cfg) + mlp_entries(p, mom_cfg)

    def globals(self, mom_cfg: Any) -> list[Entry]:
        return llama_globals(mom_cfg)

    def source_config(self, mom_cfg: Any, origins: list[int]) -> dict[str, Any]:
        cfg = super().source_config(mom_cfg, origins)
        if cfg.get("no_rope_layers"):
            cfg["no_rope_layers"] = [mom_cfg.rope_layers[o] for o in origins]
        return cfg


LLAMA = _Llama()
