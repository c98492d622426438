"""`mom decompose` verifies each layer against the source's own transformers layer before it reports
success, and a mis-mapped tensor fails it."""
from __future__ import annotations

import json

import pytest
import torch

from mom_cli.cli.app import main
from mom_cli.errors import MomError
from mom_cli.families import Derived, family_for
from mom_cli.surgery.decompose import PlanOptions, decompose


def verdict(ckpt) -> dict:
    return json.loads((ckpt / "config.json").read_text())["mom_provenance"][-1]["verify"]


@pytest.mark.parametrize("plan", [{}, {"bottom": 1, "top": 1, "pool_size": 1}, {"depth": 2, "top_k": 2}])
def test_exact_decompositions_pass_layer_by_layer(family_dir, tmp_path, plan):
    out = decompose(str(family_dir), tmp_path / "mom", PlanOptions(**plan))
    v = verdict(out)
    assert v["method"] == "per-layer" and v["tokens"] > 1
    assert 0 <= v["max_abs_diff"] <= 1e-5 and v["max_rel_diff"] <= v["tolerance"] == 1e-4


def test_a_cast_is_verified_with_the_cast_tolerance(llama_dir, tmp_path):
    v = verdict(decompose(str(llama_dir), tmp_path / "mom", PlanOptions(), dtype=torch.bfloat16))
    assert v["method"] == "per-layer" and v["tolerance"] > 1e-3
    assert 0 < v["max_rel_diff"] <= v["tolerance"]  # bf16 weights do differ, within rounding


def swapped(family, method: str, a: str, b: str, layer: int):
    """The family's mapping with tensors `a` and `b` of one layer's module exchanged."""
    original = getattr(family, method)

    def mapping(i: int, keys: set[str]) -> dict[str, Derived]:
        out = dict(original(i, keys))
        if i == layer:
            out[a], out[b] = out[b], out[a]
        return out

    return mapping


@pytest.mark.parametrize("method,a,b", [
    ("mha_from_source", "k_proj.weight", "v_proj.weight"),
    ("ffn_from_source", "gate_proj.weight", "up_proj.weight"),
])
def test_a_mis_mapped_tensor_fails_and_writes_nothing(llama_dir, tmp_path, monkeypatch, capsys, method, a, b):
    family = family_for("llama")
    monkeypatch.setattr(family, method, swapped(family, method, a, b, layer=2))
    with pytest.raises(MomError, match=r"verification failed at layer 2 \(modules model\.blocks\.0\."):
        decompose(str(llama_dir), tmp_path / "mom", PlanOptions())
    assert not (tmp_path / "mom").exists()
    # Through the CLI: exit 1 and one line naming the layer and the difference.
    assert main(["decompose", str(llama_dir), "-o", str(tmp_path / "cli")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mom: error:")]
    assert len(err) == 1 and "layer 2" in err[0] and "max |Δ|" in err[0]
    # --no-verify writes it, and says it was not verified.
    assert main(["decompose", str(llama_dir), "-o", str(tmp_path / "unverified"), "--no-verify"]) == 0
    assert verdict(tmp_path / "unverified") == {"method": "skipped", "note": "--no-verify"}


def test_gpt2_mis_mapped_norm_fails(gpt2_dir, tmp_path, monkeypatch):
    family = family_for("gpt2")
    monkeypatch.setattr(family, "ffn_from_source", swapped(family, "ffn_from_source", "norm.weight", "fc_out.bias", 0))
    with pytest.raises(MomError, match=r"verification failed at layer 0"):
        decompose(str(gpt2_dir), tmp_path / "mom", PlanOptions())


def test_mis_mapped_head_fails(llama_dir, tmp_path, monkeypatch):
    family = family_for("llama")
    original = family.globals_from_source

    def mapping(keys: set[str], tied: bool) -> dict[str, Derived]:
        out = dict(original(keys, tied))
        out["lm_head.weight"] = Derived(("lm_head.weight",), lambda ts: ts[0].flip(0))
        return out

    monkeypatch.setattr(family, "globals_from_source", mapping)
    with pytest.raises(MomError, match="verification failed at the final norm and head"):
        decompose(str(llama_dir), tmp_path / "mom", PlanOptions())


def test_info_shows_the_verification(gpt2_dir, tmp_path, capsys):
    out = decompose(str(gpt2_dir), tmp_path / "mom", PlanOptions())
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verification"]["method"] == "per-layer" and info["verification"]["max_abs_diff"] <= 1e-5


def test_a_source_that_cannot_run_layer_by_layer_is_checked_whole(llama_dir, tmp_path, monkeypatch):
    from mom_cli.surgery import verify

    def refuse(base, n):
        raise verify._NotStandalone("layers renamed at load")

    monkeypatch.setattr(verify, "_layer_list", refuse)
    v = verdict(decompose(str(llama_dir), tmp_path / "mom", PlanOptions()))
    assert v["method"] == "full-model" and v["max_abs_diff"] <= 1e-4 and "renamed" in v["note"]
    family = family_for("llama")
    monkeypatch.setattr(family, "mha_from_source", swapped(family, "mha_from_source", "k_proj.weight", "v_proj.weight", 1))
    with pytest.raises(MomError, match="verification failed at the logits"):
        decompose(str(llama_dir), tmp_path / "bad", PlanOptions())
    # A plan that is not the source's function cannot be checked whole: said, not failed.
    monkeypatch.undo()
    monkeypatch.setattr(verify, "_layer_list", refuse)
    v = verdict(decompose(str(llama_dir), tmp_path / "k2", PlanOptions(top_k=2)))
    assert v["method"] == "skipped" and "not verified" in v["note"]
