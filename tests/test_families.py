"""Every family, exactly: tiny random models of each `transformers` config with its distinctive
features on (GQA, sliding windows shorter than the test sequence, soft-capping, q/k norms, tied
and untied heads, MoE with 4 experts and top-2), in float32.

For each: the decomposed MoM's logits equal the source's; cached generation equals uncached and
the source's; `mom export` writes the source's own class with identical logits; a config field
the family does not understand is refused in one line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import decomposed, max_diff
from transformers import AutoConfig, AutoModelForCausalLM

from mom_cli.errors import UsageError
from mom_cli.families import check_supported, family_for
from mom_cli.modeling.modeling_mom import MomForCausalLM
from mom_cli.surgery.export import export

VOCAB, SEQ, WINDOW = 96, 20, 6
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    num_hidden_layers=4,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
# model_type -> (config overrides, a field=value the family refuses)
FAMILIES = {
    "gpt2-unscaled": (
        "gpt2",
        dict(scale_attn_weights=False, n_embd=32, n_head=4, n_layer=4, n_positions=64),
        ("add_cross_attention", True),
    ),
    "gpt2-layer-scaled": (
        "gpt2",
        dict(scale_attn_by_inverse_layer_idx=True, n_embd=32, n_head=4, n_layer=4, n_positions=64),
        ("n_ctx", 7),
    ),
    "llama": ("llama", dict(tie_word_embeddings=False), ("pretraining_tp", 2)),
    "mistral": ("mistral", dict(sliding_window=WINDOW), ("foo_mode", "on")),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2), ("foo_mode", "on")),
    "qwen3": (
        "qwen3",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, head_dim=16),
        ("foo_mode", "on"),
    ),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0, 1, 0], tie_word_embeddings=True), ("foo_mode", "on")),
    "gemma2": (
        "gemma2",
        dict(
            sliding_window=WINDOW,
            head_dim=8,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=2.0,
        ),
        ("use_bidirectional_attention", True),
    ),
    "gemma3_text": (
        "gemma3_text",
        dict(
            sliding_window=WINDOW,
            head_dim=8,
            query_pre_attn_scalar=12,
            sliding_window_pattern=2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        ("use_bidirectional_attention", True),
    ),
    "phi3": (
        "phi3",
        dict(
            sliding_window=WINDOW,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        ("foo_mode", "on"),
    ),
    "phi3-longrope": (
        "phi3",
        dict(
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5],
                "long_factor": [2.0, 3.0],
                "original_max_position_embeddings": 16,
            },
        ),
        ("foo_mode", "on"),
    ),
    "olmo2": ("olmo2", dict(), ("foo_mode", "on")),
    "granite": (
        "granite",
        dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.3, logits_scaling=2.5),
        ("foo_mode", "on"),
    ),
    "gpt_neox": (
        "gpt_neox",
        dict(
            num_key_value_heads=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        ("foo_mode", "on"),
    ),
    "gpt_neox-serial": (
        "gpt_neox",
        dict(num_key_value_heads=None, use_parallel_residual=False, attention_bias=False),
        ("foo_mode", "on"),
    ),
    "mixtral": ("mixtral", dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2), ("foo_mode", "on")),
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            head_dim=16,
            tie_word_embeddings=True,
        ),
        ("mlp_only_layers", [1]),
    ),
}


def source_config(name: str, **extra):
    model_type, overrides, _ = FAMILIES[name]
    base = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0) if model_type == "gpt2" else SMALL
    kw = {**base, **overrides, **extra}
    return AutoConfig.for_model(model_type, **{k: v for k, v in kw.items() if v is not None})


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: root / name for name in FAMILIES}


def source_dir(sources: dict[str, Path], name: str) -> Path:
    """The tiny source model, saved by transformers (built once per module)."""
    path = sources[name]
    if not path.exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(source_config(name))
        with torch.no_grad():  # non-trivial norms and MoE routers, so a mis-mapped one cannot hide
            for pname, p in model.named_parameters():
                if "norm" in pname or "layernorm" in pname or pname.endswith("gate.weight"):
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(path)
    return path


def tokens(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy(model, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_decompose_generate_and_export_are_exact(name, sources, tmp_path):
    src_dir = source_dir(sources, name)
    src = load(src_dir)
    mom_dir = decomposed(src_dir, tmp_path / "mom")
    mom = MomForCausalLM.from_pretrained(mom_dir, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        expect = src(x).logits
        assert max_diff(mom(x).logits, expect) <= 1e-4
        prompt = x[:1, : WINDOW + 4]  # decoding runs past the window
        cached = greedy(mom, prompt, True)
        assert torch.equal(cached, greedy(mom, prompt, False))
        assert torch.equal(cached, greedy(src, prompt, True))
    out, kind = export(mom_dir, tmp_path / "hf", "hf", None, 2 * 10**9, False)
    assert kind == "standard"
    back = load(out)
    assert type(back) is type(src)
    with torch.no_grad():
        assert max_diff(back(x).logits, expect) <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_unsupported_field_is_refused_in_one_line(name):
    model_type, _, (field, value) = FAMILIES[name]
    cfg = source_config(name, **{field: value})
    with pytest.raises(UsageError) as err:
        check_supported(family_for(model_type), cfg)
    assert re.fullmatch(rf"{model_type}: {field}={re.escape(str(value))} is not supported yet", str(err.value))
    check_supported(family_for(model_type), source_config(name))  # the same config without it is taken


def _reordered(mom_dir: Path, order: list[int], out: Path) -> Path:
    """The MoM whose step h runs MHA and FFN module order[h] (constant routers, top-1)."""
    from safetensors.torch import load_file, save_file

    out = Path(shutil.copytree(mom_dir, out))
    tensors = load_file(out / "model.safetensors")
    for kind in ("mha", "ffn"):
        bias = torch.zeros_like(tensors[f"model.blocks.0.{kind}_router.step_bias"])
        bias[torch.arange(len(order)), order] = 1.0
        tensors[f"model.blocks.0.{kind}_router.step_bias"] = bias
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("name", ["gemma3_text", "qwen2", "smollm3"])
def test_a_module_keeps_its_attention_kind_wherever_it_runs(name, sources, tmp_path):
    """Routed to another step, an MHA module keeps its origin layer's window and RoPE base: the
    reordered MoM equals the source family's model with its layers (and their types) reordered,
    which export writes in the standard format."""
    mom_dir = decomposed(source_dir(sources, name), tmp_path / "mom")
    moved = _reordered(mom_dir, [2, 3, 0, 1], tmp_path / "moved")
    mom = MomForCausalLM.from_pretrained(moved, dtype=torch.float32).eval()
    out, kind = export(moved, tmp_path / "hf", "hf", None, 2 * 10**9, False)
    assert kind == "standard"
    x = tokens()
    with torch.no_grad():
        assert max_diff(mom(x).logits, load(out)(x).logits) <= 1e-4


def test_tokens_of_one_step_attend_with_their_own_modules_kind():
    """When a step's tokens chose modules of different kinds, each query row gets its module's
    window and scale: row by row, the mixed call equals the call with that row's kind for all."""
    from mom_cli.modeling.configuration_mom import MomConfig
    from mom_cli.modeling.modeling_mom import Attention, MixedKinds, StepContext

    cfg = MomConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, position_type="learned")
    attn = Attention(cfg)
    b, t = 2, 12
    q, k, v = torch.randn(b * t, 16), torch.randn(b * t, 8), torch.randn(b * t, 8)
    ctx = StepContext(batch=b, seq=t, past=0, cache=None, rope={}, pad_mask=None, device=torch.device("cpu"))
    kinds = [(3, None, 0.5), (None, None, 0.2)]
    which = torch.randint(0, 2, (b * t,), generator=torch.Generator().manual_seed(0))
    mixed = attn(q, k, v, ctx, 0, None, False, kind=MixedKinds(kinds, which))
    for j, kind in enumerate(kinds):
        rows = which == j
        assert max_diff(mixed[rows], attn(q, k, v, ctx, 0, None, False, kind=kind)[rows]) <= 1e-6


def test_convert_peer_refuses_ffn_modules_it_cannot_hold(sources, tmp_path):
    from mom_cli.modeling.configuration_mom import MomConfig
    from mom_cli.surgery.convert_peer import select_modules

    mom_dir = decomposed(source_dir(sources, "olmo2"), tmp_path / "mom")
    with pytest.raises(UsageError, match=r"convert-peer: olmo2 FFN modules \(post_norm\) are not supported yet"):
        select_modules(MomConfig.from_pretrained(mom_dir), "all")


def test_cli_refuses_an_unsupported_field_in_one_line(sources, tmp_path):
    import json

    from test_cli import assert_one_line_error, mom

    src = Path(shutil.copytree(source_dir(sources, "gemma2"), tmp_path / "src"))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "use_bidirectional_attention": True}))
    run = mom("decompose", str(src), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(run, 2, r"gemma2: use_bidirectional_attention=True is not supported yet")
    assert not (tmp_path / "out").exists()


# Fields as the hub's config.json files of Pythia-70m, Gemma-2-2b and Phi-3-mini-4k write them
# (older transformers' names included): taken, not refused.
HUB_CONFIGS = {
    "gpt_neox": {
        "hidden_act": "gelu",
        "hidden_size": 512,
        "intermediate_size": 2048,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 8,
        "num_hidden_layers": 6,
        "rotary_emb_base": 10000,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_parallel_residual": True,
        "vocab_size": 50304,
    },
    "gemma2": {
        "attn_logit_softcapping": 50.0,
        "cache_implementation": "hybrid",
        "final_logit_softcapping": 30.0,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "num_hidden_layers": 26,
    },
    "phi3": {
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"},
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "original_max_position_embeddings": 4096,
        "rope_scaling": None,
        "sliding_window": 2047,
    },
}


@pytest.mark.parametrize("model_type", HUB_CONFIGS)
def test_hub_configs_are_taken(model_type):
    check_supported(family_for(model_type), AutoConfig.for_model(model_type, **HUB_CONFIGS[model_type]))


def test_special_token_ids_from_gguf_metadata_are_taken():
    """A GGUF-read config names its unk/mask tokens (SmolLM2's sets unk_token_id=0): ids compute nothing."""
    cfg = AutoConfig.for_model("llama", unk_token_id=0, mask_token_id=3)
    check_supported(family_for("llama"), cfg)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_info_counts_top_k_of_an_moe_modules_experts(name, sources, tmp_path):
    """An MoE FFN module costs its pre-norm, its router and top_k of its E experts per token, not all E."""
    from mom_cli.analysis.info import _module_cost

    cfg = source_config(name)
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    d = cfg.hidden_size
    model = MomForCausalLM.from_pretrained(decomposed(source_dir(sources, name), tmp_path / "mom"))
    module = next(m for m in model.modules() if type(m).__name__ == "MoeFfnModule")
    want = d + n_experts * d + cfg.num_experts_per_tok * 3 * d * width  # norm, router, k gated experts
    assert _module_cost(module) == (want, want)
    assert want < sum(p.numel() for p in module.parameters())
