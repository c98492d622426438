"""Calibration of converted PEER layers (mom_cli/peer_calibrate.py): it lowers the output error,
trains only the retrieval, restores the caller's flags, is deterministic; the oracle helper is
exact. CPU, float32, tiny layers."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.activations import ACT2FN

from mom_cli.surgery.peer_calibrate import calibrate, is_retrieval_param, oracle_ffn, relative_error, restat_query_bn
from mom_cli.surgery.peer_init import peer_from_dense

D, D_FF, N = 32, 128, 144  # N = 12^2 >= d_ff


def swiglu(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        w_in=torch.randn(D_FF, D, generator=g) / D**0.5,
        b_in=None,
        w_gate=torch.randn(D_FF, D, generator=g) / D**0.5,
        w_out=torch.randn(D_FF, D, generator=g) / D_FF**0.5,
        out_bias=None,
    )


def gpt2(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        w_in=torch.randn(D_FF, D, generator=g) / D**0.5,
        b_in=0.5 * torch.randn(D_FF, generator=g),
        w_gate=None,
        w_out=torch.randn(D_FF, D, generator=g) / D_FF**0.5,
        out_bias=0.1 * torch.randn(D, generator=g),
    )


def dense(ffn: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if ffn["w_gate"] is not None:
        return (ACT2FN["silu"](x @ ffn["w_gate"].t()) * (x @ ffn["w_in"].t())) @ ffn["w_out"]
    return ACT2FN["gelu_new"](x @ ffn["w_in"].t() + ffn["b_in"]) @ ffn["w_out"] + ffn["out_bias"]


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    """Anisotropic inputs (a few strong directions), like real residual streams after a norm."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.3, D)
    return torch.randn(n, D, generator=g) * scale + 0.2


@pytest.fixture(scope="module")
def case():
    ffn = swiglu()
    x = inputs(2048)  # = CHECK_TOKENS: the before/after errors are then on all of x
    layer = peer_from_dense(**ffn, n_experts=N, heads=2, topk=16, key_dim=32, calib_x=x)
    return ffn, x, dense(ffn, x), layer


def test_calibration_lowers_error_and_trains_only_retrieval(case):
    ffn, x, y, layer0 = case
    layer = copy.deepcopy(layer0)
    layer.w_in.requires_grad_(False)  # the caller's flags, mixed on purpose: restored as they were
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    steps_seen = []
    res = calibrate(layer, x, y, steps=60, batch_tokens=512, seed=0, on_step=lambda s, l: steps_seen.append(s))

    assert res.steps == 60 and steps_seen == list(range(60))
    assert res.loss_before == pytest.approx(relative_error(layer0, x, y), rel=1e-5)
    assert res.loss_after == pytest.approx(relative_error(layer, x, y), rel=1e-5)
    assert res.loss_after < 0.95 * res.loss_before, res
    after = layer.state_dict()
    for name, t in before.items():  # experts bit for bit; retrieval moved
        if is_retrieval_param(name) and t.is_floating_point() and "running" not in name:
            continue
        if name.startswith("query_bn."):  # BatchNorm statistics are refreshed (same function)
            continue
        assert torch.equal(after[name], t), name
    assert not torch.equal(after["query.weight"], before["query.weight"])
    assert not torch.equal(after["sub_keys"], before["sub_keys"])
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == flags
    assert layer.training == layer0.training
    assert all(p.grad is None for p in layer.parameters())


def test_calibration_is_deterministic(case):
    _, x, y, layer0 = case
    a, b = copy.deepcopy(layer0), copy.deepcopy(layer0)
    ra = calibrate(a, x, y, steps=8, batch_tokens=256, seed=3)
    rb = calibrate(b, x, y, steps=8, batch_tokens=256, seed=3)
    assert ra.loss_after == rb.loss_after
    for (n, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), n


def test_restat_query_bn_keeps_the_function(case):
    _, x, _, layer0 = case
    layer = copy.deepcopy(layer0).eval()
    with torch.no_grad():
        layer.query.weight.mul_(1.7).add_(0.05)  # the query moved away from the statistics
        ref = layer.queries(x)
        restat_query_bn(layer, x)
        torch.testing.assert_close(layer.queries(x), ref, atol=1e-4, rtol=1e-4)
        q = layer.query(x)
        torch.testing.assert_close(layer.query_bn.running_mean, q.mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [swiglu, gpt2])
def test_oracle_with_every_neuron_is_the_dense_ffn(family):
    ffn = family()
    x = inputs(256)
    layer = peer_from_dense(**ffn, n_experts=N, heads=2, topk=16, key_dim=32, calib_x=x)
    ref = dense(ffn, x)
    torch.testing.assert_close(oracle_ffn(layer, x, D_FF), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(oracle_ffn(layer, x.view(4, 64, D), N, chunk=100), ref.view(4, 64, D), atol=1e-5, rtol=0)
    # fewer neurons: exactly each token's top-m contributions |a_i| ||v_i||, summed
    m = 10
    a = (
        ACT2FN["silu"](x @ ffn["w_gate"].t()) * (x @ ffn["w_in"].t())
        if ffn["w_gate"] is not None
        else ACT2FN["gelu_new"](x @ ffn["w_in"].t() + ffn["b_in"])
    )
    keep = (a.abs() * ffn["w_out"].norm(dim=1)).topk(m, dim=1).indices
    want = torch.zeros_like(a).scatter(1, keep, a.gather(1, keep)) @ ffn["w_out"]
    if ffn["out_bias"] is not None:
        want = want + ffn["out_bias"]
    torch.testing.assert_close(oracle_ffn(layer, x, m), want, atol=1e-5, rtol=0)
