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

    @property
    def num_attention_calls(self) -> int:
        return len(self.bottom_layers) + sum(int(b["steps"]) for b in self.blocks) + len(self.top_layers)
