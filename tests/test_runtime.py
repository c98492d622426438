"""The MoM runtime against transformers: exactness at identity routing, the cache, routed plans."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import mom_cli
from mom_cli.modeling.modeling_mom import Routing, route
from tests.helpers import decomposed, ids, max_diff


@torch.no_grad()
def test_identity_decomposition_matches_transformers(family_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    mom = mom_cli.load(decomposed(family_dir, tmp_path / "mom")).eval()
    x = ids()
    assert max_diff(ref(x).logits, mom(x).logits) <= 1e-4


@torch.no_grad()
def test_automodel_loads_mom_and_padding_matches(llama_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    mom = AutoModelForCausalLM.from_pretrained(decomposed(llama_dir, tmp_path / "mom")).eval()
    assert type(mom).__name__ == "MomForCausalLM"
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding
    a, b = ref(x, attention_mask=mask).logits, mom(x, attention_mask=mask).logits
    assert max_diff(a[0, 4:], b[0, 4:]) <= 1e-4 and max_diff(a[1], b[1]) <= 1e-4


@torch.no_grad()
def test_plain_bottom_top_and_several_blocks_stay_exact(gpt2_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    mom = mom_cli.load(decomposed(gpt2_dir, tmp_path / "mom", bottom=1, top=1, pool_size=1)).eval()
    assert len(mom.model.blocks) == 2 and len(mom.model.bottom) == 1
    x = ids()
    assert max_diff(ref(x).logits, mom(x).logits) <= 1e-4


@torch.no_grad()
def test_cached_generation_equals_uncached_and_transformers(family_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    mom = mom_cli.load(decomposed(family_dir, tmp_path / "mom")).eval()
    prompt = ids(1, 6)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = mom.generate(prompt, use_cache=True, **kw)
    assert torch.equal(cached, mom.generate(prompt, use_cache=False, **kw))
    assert torch.equal(cached, ref.generate(prompt, **kw))


def _perturb_routers(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.model.blocks:
            for router in (block.mha_router, block.ffn_router):
                router.head.weight.copy_(torch.randn(router.head.weight.shape, generator=g))


@torch.no_grad()
@pytest.mark.parametrize("plan", [dict(depth=2, top_k=2), dict(depth=6, top_k=3, router="mlp"), dict(depth=3, top_k=1)])
def test_routed_plans_cache_matches_full_forward(family_dir, tmp_path, plan):
    """Trained-like routers (random heads): SKIP chosen, modules mixed; the cache must stay exact."""
    mom = mom_cli.load(decomposed(family_dir, tmp_path / "mom", **plan)).eval()
    _perturb_routers(mom)
    x = ids(2, 16)
    full = mom(x, use_cache=False).logits
    out = mom(x[:, :10], use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(10, 16):
        out = mom(x[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    assert max_diff(full, torch.cat(steps, dim=1)) <= 1e-4
    assert torch.isfinite(full).all()


def test_skip_tokens_contribute_no_keys():
    """A token routed only to SKIP must not change what other tokens attend to."""
    from mom_cli.modeling.configuration_mom import MomConfig
    from mom_cli.modeling.modeling_mom import Attention, StepContext

    cfg = MomConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, position_type="learned")
    attn = Attention(cfg)
    q, k, v = (torch.randn(4, 8) for _ in range(3))
    ctx = StepContext(batch=1, seq=4, past=0, cache=None, rope={}, pad_mask=None, device=torch.device("cpu"))
    valid = torch.tensor([True, False, True, True])
    with_skip = attn(q, k, v, ctx, 0, valid, track_valid=True)
    k2, v2 = k.clone(), v.clone()
    k2[1], v2[1] = 100.0, 100.0  # whatever the skipped key holds, nobody sees it
    assert torch.allclose(with_skip[[0, 2, 3]], attn(q, k2, v2, ctx, 0, valid, True)[[0, 2, 3]])
    plain = attn(q, k, v, ctx, 0, None, True)
    assert not torch.allclose(with_skip[2:], plain[2:])


def test_route_weights_are_renormalised_softmax_and_groups_cover_tokens():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 0.0, 4.0]])
    r: Routing = route(logits, k=2, temperature=0.5, skip_id=2)
    full = torch.softmax(logits / 0.5, -1)
    expect = full.gather(1, r.idx) / full.gather(1, r.idx).sum(-1, keepdim=True)
    assert torch.allclose(r.weight, expect)
    seen = sorted((int(t), m) for m, (tok, _) in r.groups.items() for t in tok)
    assert seen == sorted((i, int(m)) for i in range(3) for m in r.idx[i])


def test_dispatch_runs_each_module_only_on_its_tokens(llama_dir, tmp_path):
    mom = mom_cli.load(decomposed(llama_dir, tmp_path / "mom", depth=2, top_k=1)).eval()
    _perturb_routers(mom, seed=3)
    mom.model.dispatch = "modules"  # the grouped dispatch never calls a module's forward
    seen: list[int] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
        for m in mom.model.blocks[0].ffn.values()
    ]
    x = ids(1, 20)
    with torch.no_grad():
        mom(x, use_cache=False)
    for h in hooks:
        h.remove()
    assert seen and sum(seen) <= 2 * 20


def test_aux_loss_and_recorder(gpt2_dir, tmp_path):
    mom = mom_cli.load(decomposed(gpt2_dir, tmp_path / "mom", depth=2, top_k=2))
    mom.train()
    _perturb_routers(mom)
    x = ids(2, 8)
    out = mom(x, labels=x, use_cache=False)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    out.loss.backward()
    router = mom.model.blocks[0].mha_router
    assert router.head.weight.grad is not None and router.head.weight.grad.abs().sum() > 0
    mom.eval()
    mom.model.recorder = rec = mom_cli.RoutingRecorder()
    with torch.no_grad():
        mom(x, use_cache=False)
    counts, mass = rec.stats[(0, "ffn", 1)]
    assert counts.sum().item() == 2 * x.numel() and abs(mass.sum().item() - x.numel()) < 1e-4
