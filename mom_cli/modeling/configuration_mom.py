"""`MomConfig`: a Mixture-of-Modules model (arXiv 2407.06677) as a `transformers` config.

This file, with `modeling_mom.py`, is copied verbatim into `trust_remote_code` exports, so it
imports nothing from `mom_cli`.

The stack, bottom to top:
    embeddings -> `bottom_layers` plain layers -> `blocks` -> `top_layers` plain layers -> norm -> head
A block owns an MHA pool, an FFN pool and SKIP, and runs `steps` (H) routed steps over them.
Every module remembers the source layer it came from (its "origin"), which is what lets
`mom export --format hf` put a plain stack back together and `mom prune` name what it removed.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


class MomConfig(PreTrainedConfig):
    model_type = "mom"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        family: str = "llama",
        source_model_type: str = "llama",
        source_config: dict[str, Any] | None = None,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 2048,
        hidden_act: str = "silu",
        norm_type: str = "rmsnorm",
        norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        gated_mlp: bool = True,
        position_type: str = "rope",
        max_position_embeddings: int = 2048,
        rope_parameters: dict[str, Any] | None = None,
        rotary_embedding: str | None = None,
        pre_norm: bool = True,
        post_norm: bool = False,
        rmsnorm: str = "llama",
        qk_norm: str | None = None,
        embed_scale: float | None = None,
        residual_multiplier: float = 1.0,
        attn_scale: float | None = None,
        attn_scale_by_layer: bool = False,
        attn_softcap: float | None = None,
        final_softcap: float | None = None,
        logits_divisor: float = 1.0,
        attention_window: int | None = None,
        attention_types: list[str] | None = None,
        rope_layers: list[int] | None = None,
        parallel_residual: bool = False,
        moe_block: str | None = None,
        bottom_layers: list[int] | None = None,
        blocks: list[dict[str, Any]] | None = None,
        top_layers: list[int] | None = None,
        router_top_k: int = 1,
        skip: bool = True,
        router: str = "gru",
        router_hidden: int = 256,
        router_temperature: float = 0.2,
        aux_loss_coef: float = 0.01,
        peer: dict[str, Any] | None = None,
        mom_provenance: list[dict[str, Any]] | None = None,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        self.family = family
        self.source_model_type = source_model_type
        self.source_config = source_config or {}
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.gated_mlp = gated_mlp
        self.position_type = position_type
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters
        # Family quirks, each off by default. Per-layer ones (window, RoPE table, scale) are read
        # by a module from its origin layer, so a module keeps them wherever it is routed.
        self.rotary_embedding = rotary_embedding  # the source's rotary class (None: Llama's)
        self.pre_norm = pre_norm  # False: OLMo 2 (norm after the sublayer only)
        self.post_norm = post_norm  # norm of each module's output (OLMo 2, Gemma's sandwich)
        # RMSNorm's scale: "llama" w * x (in x's dtype), "float32" w * x in float32 (OLMo 2),
        # "unit_offset" (1 + w) * x in float32 (Gemma)
        self.rmsnorm = rmsnorm
        self.qk_norm = qk_norm  # None, "head" (per head: Qwen3, Gemma 3) or "full" (OLMo 2)
        self.embed_scale = embed_scale  # Gemma: sqrt(d); Granite: embedding_multiplier
        self.residual_multiplier = residual_multiplier  # Granite: x += m * module(x)
        self.attn_scale = attn_scale  # None: head_dim ** -0.5
        self.attn_scale_by_layer = attn_scale_by_layer  # GPT-2: scale / (origin + 1)
        self.attn_softcap = attn_softcap  # Gemma 2: cap * tanh(scores / cap)
        self.final_softcap = final_softcap
        self.logits_divisor = logits_divisor  # Granite: logits / logits_scaling
        # Not `sliding_window`/`layer_types`: transformers' caches would read those and drop keys.
        self.attention_window = attention_window
        self.attention_types = list(attention_types) if attention_types else None  # per origin layer
        self.rope_layers = list(rope_layers) if rope_layers else None  # per origin layer, 0 = no RoPE
        self.parallel_residual = parallel_residual  # GPT-NeoX: x += MHA(x) + FFN(x)
        self.moe_block = moe_block  # the source's sparse MoE block class: one FFN module each
        self.bottom_layers = list(bottom_layers or [])
        # Each block: {"mha": [origin, ...], "ffn": [origin, ...], "steps": H}
        self.blocks = [dict(b) for b in (blocks or [])]
        self.top_layers = list(top_layers or [])
        self.router_top_k = router_top_k
        self.skip = skip
        self.router = router
        self.router_hidden = router_hidden
        self.router_temperature = router_temperature
        self.aux_loss_coef = aux_loss_coef
        # PEER FFN modules: "block.slot" -> the PeerLayer's arguments (filled in by `mom convert-peer`).
        self.peer = dict(peer or {})
        self.mom_provenance = list(mom_provenance or [])
        self.use_cache = use_cache
        kwargs.pop("num_hidden_layers", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # One KV-cache layer per attention call: plain layers once, each block once per step.
        self.num_hidden_layers = self.num_attention_calls

    def attention_kind(self, origin: int | None) -> tuple[int | None, str | None, float]:
        """(window, RoPE table, score scale) of the attention of source layer `origin`."""
        kind = self.attention_types[origin] if self.attention_types and origin is not None else "full_attention"
        window = self.attention_window if kind == "sliding_attention" else None
        rope = None
        if self.position_type == "rope" and not (
            self.rope_layers and origin is not None and not self.rope_layers[origin]
        ):
            rope = kind if self.rope_per_type else "default"
        scale = self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale
        if self.attn_scale_by_layer and origin is not None:
            scale /= float(origin + 1)
        return window, rope, scale

    @property
    def rope_per_type(self) -> bool:
        """Gemma 3: one RoPE table per attention type ({"full_attention": {...}, ...})."""
        params = self.rope_parameters or {}
        return any(isinstance(params.get(kind), dict) for kind in ("full_attention", "sliding_attention"))

    @property
    def num_attention_calls(self) -> int:
        return len(self.bottom_layers) + sum(int(b["steps"]) for b in self.blocks) + len(self.top_layers)
