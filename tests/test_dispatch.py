"""The grouped dispatch (one segment matmul per projection per step) against the reference that
runs each module on its own tokens, one after another: logits and gradients, in float32."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import mom_cli
from mom_cli.modeling import modeling_mom, segment_kernel
from mom_cli.modeling.modeling_mom import MomForCausalLM, PackedGroups, segment_mm
from mom_cli.surgery.convert_peer import ConvertOptions, convert_peer
from tests.helpers import decomposed, ids, max_diff


def _spread_routers(model: torch.nn.Module, seed: int = 0) -> None:
    """Random router heads: tokens spread over the modules and SKIP, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.model.blocks:
            for router in (block.mha_router, block.ffn_router):
                router.head.weight.copy_(torch.randn(router.head.weight.shape, generator=g))


def _run(model: torch.nn.Module, dispatch: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eval logits, then one training step's gradients (loss with the aux term), under `dispatch`."""
    model.model.dispatch = dispatch
    model.eval()
    with torch.no_grad():
        logits = model(x, use_cache=False).logits
    model.train()
    model.zero_grad()
    model(x, labels=x, use_cache=False).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, grads


def _assert_same(model: torch.nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}  # a training step moves BatchNorm statistics
    ref_logits, ref_grads = _run(model, "modules", x)
    model.load_state_dict(state)
    logits, grads = _run(model, "grouped", x)
    assert max_diff(ref_logits, logits) / max(ref_logits.abs().max().item(), 1.0) <= tol
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    worst = max(max_diff(ref_grads[n], grads[n]) / max(ref_grads[n].abs().max().item(), 1.0) for n in grads)
    assert worst <= tol


def _skip_share(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The share of routing choices that went to SKIP, so a test knows SKIP was exercised."""
    model.eval()
    model.model.recorder = rec = mom_cli.RoutingRecorder()
    with torch.no_grad():
        model(x, use_cache=False)
    model.model.recorder = None
    counts = [c for c, _ in rec.stats.values()]
    return sum(c[-1].item() for c in counts) / sum(c.sum().item() for c in counts)


@pytest.fixture(scope="module")
def routed(models_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dispatch")
    return {
        "llama-top1": decomposed(models_dir / "llama", root / "l1", depth=3, top_k=1),
        "llama-top2": decomposed(models_dir / "llama", root / "l2", depth=2, top_k=2),
        "gpt2-top2": decomposed(models_dir / "gpt2", root / "g2", depth=3, top_k=2, router="mlp"),
    }


@pytest.mark.parametrize("name", ["llama-top1", "llama-top2", "gpt2-top2"])
def test_grouped_dispatch_equals_per_module_reference(routed, name):
    model = mom_cli.load(routed[name])
    _spread_routers(model)
    x = ids(2, 16)
    assert _skip_share(model, x) > 0  # SKIP is among the choices
    block = model.model.blocks[0]
    with torch.no_grad():  # both pools are stacked: the grouped path is the one compared
        assert all(
            len(block._stacked(kind, {}).slots) == len(pool) for kind, pool in (("mha", block.mha), ("ffn", block.ffn))
        )
    _assert_same(model, x)


@pytest.mark.parametrize("name", ["llama-top1", "llama-top2", "gpt2-top2"])
def test_stacked_path_of_the_gpu_equals_the_reference_in_float32(routed, name, monkeypatch):
    """The path a GPU takes (stacked weights with a zero group for SKIP, torch._grouped_mm, no
    packing), run on the CPU in float32 where the comparison is tight."""
    monkeypatch.setattr(PackedGroups, "packable", staticmethod(lambda w: False))
    model = mom_cli.load(routed[name])
    _spread_routers(model, seed=2)
    x = ids(2, 16)
    assert _skip_share(model, x) > 0
    with torch.no_grad():
        stack = model.model.blocks[0]._stacked("ffn", {})
    assert stack.packed_in is None and stack.zero_group and stack.w_in.shape[0] == len(stack.slots) + 1
    assert not stack.w_in[-1].any() and not stack.w_out[-1].any()
    _assert_same(model, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_dispatch_on_the_device_in_each_dtype(routed, device, dtype):
    """The same comparison on `pytest --device` (on CUDA: torch._grouped_mm in bfloat16, one mm
    per group in float32). bfloat16 sums in another order than the reference, hence its tolerance."""
    model = mom_cli.load(routed["llama-top2"], dtype=dtype).to(device)
    _spread_routers(model, seed=3)
    _assert_same(model, ids(2, 16).to(device), 1e-5 if dtype == torch.float32 else 3e-2)


def test_grouped_dispatch_under_bf16_autocast_on_the_device(routed, device):
    """float32 weights under bfloat16 autocast, as `train-routers --dtype bf16` and `heal` run:
    the stacked weights are cast once per forward, as nn.Linear casts its own."""
    model = mom_cli.load(routed["llama-top2"]).to(device)
    _spread_routers(model, seed=3)
    with torch.autocast(device, dtype=torch.bfloat16):
        _assert_same(model, ids(2, 16).to(device), 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_mm_on_the_device(device, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 64, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(3, 32, 64, generator=g).to(device, dtype).requires_grad_()
    offs = torch.tensor([16, 16, 40], dtype=torch.int32, device=device)
    y = segment_mm(a, w, offs)
    ref = torch.cat([a[:16] @ w[0].T, a[16:40] @ w[2].T])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = ref.abs().max().item()
    assert max_diff(y, ref) <= tol * scale
    grad = torch.randn(40, 32, generator=g).to(device, dtype)
    ga, gw = torch.autograd.grad(y, (a, w), grad)
    ra, rw = torch.autograd.grad(ref, (a, w), grad)
    assert max_diff(ga, ra) <= tol * ra.abs().max().item() and max_diff(gw, rw) <= tol * rw.abs().max().item()


def test_routed_forward_and_training_step_capture_as_one_cuda_graph(routed, device):
    """A CUDA graph replays the routed forward and training step: in bfloat16 on CUDA, routing
    and dispatch never ask the host for a value (a capture fails on any sync), and nothing depends
    on Python state that a replay would skip. The replay runs the Triton segment matmul (used
    under capture) where Triton is installed, and eager execution torch._grouped_mm: the two are
    compared. (float32 training on CUDA computes weight gradients segment by segment, reading the
    bounds on the host: it cannot be captured.)"""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU (pytest --device cuda)")
    model = mom_cli.load(routed["llama-top2"], dtype=torch.bfloat16).to(device)
    _spread_routers(model, seed=5)
    x, y = ids(2, 16).to(device), ids(2, 16, seed=1).to(device)
    static, tol = x.clone(), 1e-2

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(static, use_cache=False).logits

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(static, labels=static, use_cache=False).loss
        loss.backward()
        return loss.detach()

    for fn, mode in ((forward, model.eval), (step, model.train)):
        mode()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        # The replay writes the gradients into the tensors the capture made (an eager step after
        # it sets new ones on the parameters): keep hold of those.
        static_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert (fn is step) == bool(static_grads)
        for inputs in (x, y):  # new inputs go into the captured tensor; the replay must route them anew
            static.copy_(inputs)
            graph.replay()
            replayed = out.clone()
            grads = {n: g.clone() for n, g in static_grads.items()}
            expected = fn()
            # Equal up to the order of atomic adds (a token's gradient summed over its K rows).
            err = max_diff(replayed, expected) / max(expected.abs().max().item(), 1.0)
            assert err <= tol, (fn.__name__, err)
            assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
            for n, g in grads.items():
                err = max_diff(g, model.get_parameter(n).grad) / max(g.abs().max().item(), 1.0)
                assert err <= tol, (n, err)


def test_pruned_and_switched_off_slots(routed):
    """Slots pruned from the checkpoint (origin None) and slots switched off for a measurement both
    send their tokens to SKIP, in either dispatch."""
    base = mom_cli.load(routed["llama-top2"])
    config = base.config
    config.blocks[0]["mha"][1] = None
    config.blocks[0]["ffn"][2] = None
    model = MomForCausalLM(config)
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert not missing
    _spread_routers(model, seed=1)
    model.model.blocks[0].set_removed({3}, {0})
    _assert_same(model, ids(2, 16))


def test_peer_modules_in_the_pool_run_one_by_one(routed, tmp_path):
    out = convert_peer(routed["llama-top2"], tmp_path / "peer", ConvertOptions(layers="0,2", heads=4, topk=8))
    model = mom_cli.load(out.path)
    assert {type(m).__name__ for m in model.model.blocks[0].ffn.values()} == {"FfnModule", "PeerFfnModule"}
    _spread_routers(model, seed=2)
    _assert_same(model, ids(2, 16))


def test_training_peer_modules_keeps_the_stack_of_the_frozen_ffns(routed, tmp_path):
    """Training only a pool's PEER modules (as heal does) keeps the frozen FFNs' stack across
    steps, and the PEER gradients equal those of a step that stacks the FFNs anew."""
    out = convert_peer(routed["llama-top2"], tmp_path / "peer", ConvertOptions(layers="0,2", heads=4, topk=8))
    x = ids(2, 16)
    grads = []
    for ffn_trains in (False, True):
        model = mom_cli.load(out.path)
        _spread_routers(model, seed=2)
        model.train()
        for n, p in model.named_parameters():
            p.requires_grad_(".peer." in n or (ffn_trains and ".ffn." in n))
        block = model.model.blocks[0]
        model(x, labels=x, use_cache=False).loss.backward()
        kept = block._stack_cache.get("ffn", (None, None))[1]
        assert (kept is None) == ffn_trains
        model(x, labels=x, use_cache=False).loss.backward()
        assert block._stack_cache.get("ffn", (None, None))[1] is kept
        grads.append({n: p.grad for n, p in model.named_parameters() if ".peer." in n and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".w_out" in n for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_cached_generation_equals_uncached_for_a_routed_model(routed):
    model = mom_cli.load(routed["llama-top2"]).eval()
    _spread_routers(model, seed=4)
    prompt = ids(1, 6)
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))
        model.model.dispatch = "modules"
        assert torch.equal(cached, model.generate(prompt, use_cache=True, **kw))


@pytest.mark.parametrize("width", [6, 64])  # 6: rows not 16-byte aligned, the per-segment fallback
def test_segment_mm_forward_and_backward(width):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(11, width, generator=g, requires_grad=True)
    w = torch.randn(4, 8, width, generator=g, requires_grad=True)
    offs = torch.tensor([3, 3, 7, 9], dtype=torch.int32)  # an empty group, and two rows past the end
    y = segment_mm(a, w, offs)
    bounds = [0, 3, 3, 7, 9]
    ref = torch.cat([a[bounds[i] : bounds[i + 1]] @ w[i].T for i in range(4)] + [a.new_zeros(2, 8)])
    assert max_diff(y, ref) <= 1e-6
    grad = torch.randn(11, 8, generator=g)
    ga, gw = torch.autograd.grad(y, (a, w), grad)
    ra, rw = torch.autograd.grad(ref, (a, w), grad)
    assert max_diff(ga, ra) <= 1e-5 and max_diff(gw, rw) <= 1e-5
    assert ga[9:].abs().max() == 0  # rows past the last group get no gradient
    if PackedGroups.packable(w):  # the CPU path: the same weights packed for oneDNN
        with torch.no_grad():
            packed = PackedGroups([[wg] for wg in w.detach()])
        assert max_diff(segment_mm(a.detach(), None, offs, packed=packed), ref) <= 1e-5
        # with autograd, each group's weight given as two parameters (as [q; k; v] are)
        parts = [[wg[:5].detach().requires_grad_(), wg[5:].detach().requires_grad_()] for wg in w]
        packed = PackedGroups(parts)
        y = segment_mm(a, None, offs, packed=packed)
        assert max_diff(y, ref) <= 1e-5
        flat = [p for ps in parts for p in ps]
        ga, *gp = torch.autograd.grad(y, (a, *flat), grad)
        assert max_diff(ga, ra) <= 1e-5
        assert max_diff(torch.stack([torch.cat(gp[2 * i : 2 * i + 2]) for i in range(4)]), rw) <= 1e-5


def stack_weight(block: torch.nn.Module) -> torch.Tensor:
    return block.ffn["0"].down_proj.weight


def test_cpu_inference_packs_the_pools_once(routed):
    """Eval on a float32 CPU model runs the packed weights, built on the first forward and kept
    until a parameter changes; autocast does not reuse them (it runs a stack in its dtype)."""
    model = mom_cli.load(routed["llama-top2"])
    _spread_routers(model)
    model.eval()
    x = ids(2, 16)
    with torch.no_grad():
        model(x, use_cache=False)
    block = model.model.blocks[0]
    stack = block._stack_cache["ffn"][1]
    assert (stack.packed_in is not None) == PackedGroups.packable(stack_weight(block))
    if stack.packed_in is not None:  # [gate; up] packed apart, so that inference fuses SwiGLU into them
        f = block.ffn["0"].up_proj.out_features
        assert stack.packed_in.widths == [f, f]
        with torch.no_grad():
            assert stack._fused_swiglu(torch.zeros(1, 1))
        assert not stack._fused_swiglu(torch.zeros(1, 1, requires_grad=True))
    with torch.no_grad():
        model(x, use_cache=False)
        assert block._stack_cache["ffn"][1] is stack
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, use_cache=False)
        assert block._stack_cache["ffn"][1] is not stack and block._stack_cache["ffn"][1].packed_in is None
        model(x, use_cache=False)  # back in float32: not the autocast's bf16 stack
        assert (block._stack_cache["ffn"][1].packed_in is not None) == PackedGroups.packable(stack_weight(block))
        block.ffn["0"].down_proj.weight.mul_(1.0)
        model(x, use_cache=False)
        assert block._stack_cache["ffn"][1] is not stack


def test_training_packs_trainable_pools_anew_and_keeps_frozen_ones(routed):
    """A training forward packs (or stacks) a pool whose weights train anew, and their gradients
    reach the modules; when only the routers train, the pools' weights are kept across steps and
    the routers' gradients equal the per-module reference's."""
    model = mom_cli.load(routed["llama-top2"])
    _spread_routers(model)
    x = ids(2, 16)
    model.train()
    model(x, labels=x, use_cache=False).loss.backward()
    block = model.model.blocks[0]
    assert "ffn" not in block._stack_cache and stack_weight(block).grad is not None
    for n, p in model.named_parameters():
        p.requires_grad_("_router." in n)
    _assert_same(model, x)
    model.train()
    model(x, labels=x, use_cache=False).loss.backward()
    kept = block._stack_cache["ffn"][1]
    assert (kept.packed_in is not None) == PackedGroups.packable(stack_weight(block))
    model(x, labels=x, use_cache=False).loss.backward()
    assert block._stack_cache["ffn"][1] is kept


def test_info_counts_the_routers_flops(routed):
    """`mom info`'s FLOPs per token include both routers at every step (about 2 per weight)."""
    from mom_cli.analysis.info import summary

    model = mom_cli.load(routed["llama-top2"])
    s = summary(model.config)
    per_step = sum(p.numel() for n, p in model.named_parameters() if "_router." in n)
    assert s["router_flops_per_token"] == 2 * model.config.blocks[0]["steps"] * per_step > 0
    assert s["flops_per_token"] > s["router_flops_per_token"]


def test_routed_forward_and_training_step_trace_without_graph_breaks(routed):
    """torch.compile sees one graph: no host reads in routing or dispatch (the segment matmul is
    an opaque custom op where torch._grouped_mm's compiled form does not apply)."""
    model = mom_cli.load(routed["llama-top2"])
    _spread_routers(model)
    x = ids(2, 16)
    with torch.no_grad():
        explained = torch._dynamo.explain(model.eval())(x, use_cache=False)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    explained = torch._dynamo.explain(model.train())(x, labels=x, use_cache=False)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_attn_implementation_eager_and_sdpa_agree_with_padding_and_skip(routed):
    """`attn_implementation` picks the kernel: transformers' sdpa (the default) or the eager
    reference, with the same masks (left padding, keys of SKIP-only tokens)."""
    model = mom_cli.load(routed["llama-top2"]).eval()
    _spread_routers(model, seed=5)
    assert model.config._attn_implementation == "sdpa"
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        sdpa = model(x, attention_mask=mask, use_cache=False).logits
        model.config._attn_implementation = "eager"
        eager = model(x, attention_mask=mask, use_cache=False).logits
    assert max_diff(sdpa[0, 3:], eager[0, 3:]) <= 1e-5 and max_diff(sdpa[1], eager[1]) <= 1e-5


def test_merged_weight_gradients_with_empty_and_skipped_groups():
    """The weight gradient of several steps at once equals the sum of each step's, with groups no
    row of a step went to, and a step whose rows all went past the groups (SKIP)."""
    from mom_cli.modeling.modeling_mom import _merged_wgrad, _merged_wgrad_device, _segment_wgrad

    g = torch.Generator().manual_seed(0)
    steps = []
    for offs in ([2, 2, 5], [0, 3, 3], [0, 0, 0]):
        a, grad = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
        steps.append((a, grad, torch.tensor(offs, dtype=torch.int32)))
    ref = sum(_segment_wgrad(grad, a, offs, 3) for a, grad, offs in steps)
    a4, g4, offs4 = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g), torch.tensor([1, 1, 3]).int()
    uneven, ref_uneven = [*steps, (a4, g4, offs4)], ref + _segment_wgrad(g4, a4, offs4, 3)
    # 300 groups, the last 297 empty: past 255 the sort keys are int64, not 8-bit
    wide = [(a, grad, torch.cat([offs, offs[-1:].expand(297)])) for a, grad, offs in steps]
    ref_wide = sum(_segment_wgrad(grad, a, offs, 300) for a, grad, offs in wide)
    for merged in (_merged_wgrad, _merged_wgrad_device):  # the CPU's, and the GPU's run on the CPU
        assert max_diff(merged(steps, 3), ref) <= 1e-5
        assert max_diff(merged(uneven, 3), ref_uneven) <= 1e-5  # steps of different row counts
        assert max_diff(merged(wide, 300), ref_wide) <= 1e-5
        assert merged(steps[2:], 3).abs().max() == 0


triton_kernel = pytest.mark.skipif(segment_kernel.triton is None, reason="Triton is not installed")


def _on_kernel_device(device: str) -> str:
    """The kernel runs on CUDA, or on the CPU in Triton's interpreter (conftest sets it without a GPU)."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CPU run of the Triton kernel needs TRITON_INTERPRET=1 before import")
    return device


@triton_kernel
@pytest.mark.parametrize(
    ("bounds", "full", "transposed"),
    [
        ([3, 3, 7, 9], False, False),  # an empty group, and rows past the last group
        ([40, 40, 70, 70, 100], True, False),  # groups of more rows than one tile
        ([5, 11], False, True),  # the weights as a transposed view (the input gradient's case)
        ([0, 1, 1], False, False),  # one routed row (cached generation)
    ],
)
def test_triton_segment_kernel_equals_per_group_matmuls(device, bounds, full, transposed):
    from mom_cli.modeling.segment_kernel import segment_mm as kernel

    device = _on_kernel_device(device)
    g = torch.Generator().manual_seed(0)
    rows, groups, n, k = (bounds[-1] if full else bounds[-1] + 2), len(bounds), 72, 40
    a = torch.randn(rows, k, generator=g)
    w = torch.randn(groups, k, n, generator=g).transpose(1, 2) if transposed else torch.randn(groups, n, k, generator=g)
    offs = torch.tensor(bounds, dtype=torch.int32)
    starts = [0, *bounds[:-1]]
    ref = torch.cat(
        [a[s:e] @ w[i].T for i, (s, e) in enumerate(zip(starts, bounds))] + [a.new_zeros(rows - bounds[-1], n)]
    )
    y = kernel(a.to(device), w.to(device), offs.to(device), full)
    assert y.shape == ref.shape and max_diff(y.cpu(), ref) <= 1e-5 * ref.abs().max().item()


@triton_kernel
@pytest.mark.parametrize("name", ["llama-top1", "llama-top2", "gpt2-top2"])
def test_grouped_dispatch_through_the_triton_kernel_equals_the_reference(routed, name, monkeypatch, device):
    """A GPU's path, the segment matmuls of the forward and of the input gradients in the Triton
    kernel, in float32 against the per-module reference: logits and gradients."""
    device = _on_kernel_device(device)
    monkeypatch.setattr(PackedGroups, "packable", staticmethod(lambda w: False))
    calls = []

    def usable(a: torch.Tensor, w: torch.Tensor) -> bool:
        calls.append(a.shape)
        return a.dtype == w.dtype == torch.float32

    monkeypatch.setattr(modeling_mom, "triton_usable", usable)
    model = mom_cli.load(routed[name]).to(device)
    _spread_routers(model, seed=2)
    _assert_same(model, ids(2, 16).to(device))
    assert calls  # the kernel was asked


def test_router_scores_through_the_padded_head_equal_the_head(routed, device):
    """On a GPU in inference, a router's M + 1 scores come from its head padded to a multiple of 8
    rows (aligned for cuBLAS): the same scores. (On the CPU both sides take the plain head.)"""
    model = mom_cli.load(routed["llama-top2"]).to(device).eval()
    _spread_routers(model)
    router = model.model.blocks[0].ffn_router
    assert router.head.weight.shape[0] % 8  # the padded case
    h = torch.randn(7, router.head.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(2):  # the second time after an in-place update: the padded copy follows it
        with torch.no_grad():
            got = router._scores(h, router.step_bias[1], 1)
            ref = torch.nn.functional.linear(h, router.head.weight, router.step_bias[1])
            router.head.weight.mul_(-2.0)
        assert got.shape == ref.shape and max_diff(got, ref) <= 1e-5 * ref.abs().max().item()


@triton_kernel
def test_a_failing_triton_kernel_falls_back_to_torch(monkeypatch):
    """Triton that cannot build or launch (no C compiler, an unsupported GPU): one warning, then
    torch's segment matmul for the rest of the process, with the same result."""
    monkeypatch.setattr(segment_kernel, "_off", None)
    monkeypatch.setattr(modeling_mom, "triton_usable", lambda a, w: segment_kernel._off is None)

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(modeling_mom, "triton_segment_mm", broken)
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(5, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    offs = torch.tensor([2, 5], dtype=torch.int32)
    with pytest.warns(UserWarning, match="Triton segment matmul failed"):
        y = segment_mm(a, w, offs)
    assert segment_kernel._off is not None and max_diff(y, torch.cat([a[:2] @ w[0].T, a[2:] @ w[1].T])) <= 1e-6
