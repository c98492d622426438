"""Export round trips: standard format without mom, trust_remote_code in a fresh Python, flat safetensors."""

from __future__ import annotations

import ast
import json

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import mom_cli
from mom_cli.surgery.export import export
from tests.helpers import decomposed, ids, max_diff, remote_code_check

SHARD = 2 * 10**9


@torch.no_grad()
def test_identity_exports_standard_format(family_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    out, kind = export(decomposed(family_dir, tmp_path / "mom"), tmp_path / "hf", "hf", None, SHARD, False)
    assert kind == "standard"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ref.config.model_type and "auto_map" not in cfg
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    x = ids()
    assert max_diff(ref(x).logits, back(x).logits) <= 1e-5


def test_routed_mom_exports_remote_code_loadable_without_mom(llama_dir, tmp_path):
    ckpt = decomposed(llama_dir, tmp_path / "mom", depth=2, top_k=2)
    out, kind = export(ckpt, tmp_path / "rc", "hf", None, SHARD, False)
    assert kind == "remote-code" and (out / "modeling_mom.py").exists()
    x = ids(1, 10)
    with torch.no_grad():
        expect = mom_cli.load(ckpt).eval()(x).logits
    diff, module, length = remote_code_check(
        out,
        x,
        expect,
        tmp_path,
        """
        g = m.generate(x[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        print(type(m).__module__, g.shape[1])
        """,
    )
    assert "mom_cli" not in module and float(diff) <= 1e-5 and int(length) == 9


CONVERSION_NAMES = (
    "peer_from_dense",
    "peer_from_ffn",
    "from_ffn",
    "_kmeans",
    "_assign_cells",
    "grid_size",
    "calibrate_query_bn",
    "oracle_mass_fraction",
    "usage_stats",
    "neuron_activations",
)


def test_remote_code_export_carries_only_the_runtime(llama_dir, tmp_path):
    out, kind = export(
        decomposed(llama_dir, tmp_path / "mom", depth=2, top_k=2), tmp_path / "rc", "hf", None, SHARD, False
    )
    code = sorted(p.name for p in out.glob("*.py"))
    assert kind == "remote-code" and code == ["configuration_mom.py", "modeling_mom.py", "peer.py", "segment_kernel.py"]
    for name in code:
        text = (out / name).read_text()
        assert not [w for w in CONVERSION_NAMES if w in text], name
        tree = ast.parse(text)
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.split(".")[0] == "mom_cli"], name


def test_flat_safetensors_carries_config_and_shards(gpt2_dir, tmp_path):
    ckpt = decomposed(gpt2_dir, tmp_path / "mom")
    out, _ = export(ckpt, tmp_path / "flat.safetensors", "safetensors", torch.float16, SHARD, False)
    with safe_open(str(out), "pt") as f:
        cfg = json.loads(f.metadata()["mom_config"])
        assert cfg["model_type"] == "mom" and f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    sharded, _ = export(ckpt, tmp_path / "flat-dir", "safetensors", None, 100_000, False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@torch.no_grad()
def test_sharded_checkpoint_loads(gpt2_dir, tmp_path):
    from mom_cli.surgery.decompose import PlanOptions, decompose

    ckpt = decompose(str(gpt2_dir), tmp_path / "mom", PlanOptions(), shard_bytes=200_000)
    assert (ckpt / "model.safetensors.index.json").exists()
    ref = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    x = ids()
    assert max_diff(ref(x).logits, mom_cli.load(ckpt)(x).logits) <= 1e-4
    out, kind = export(ckpt, tmp_path / "hf", "hf", torch.bfloat16, 200_000, False)
    back = AutoModelForCausalLM.from_pretrained(out)
    assert kind == "standard" and back.dtype == torch.bfloat16


def test_model_card_and_provenance(gpt2_dir, tmp_path):
    ckpt = decomposed(gpt2_dir, tmp_path / "mom", depth=2)
    card = (ckpt / "README.md").read_text()
    assert "decompose" in card and "Provenance" in card
    prov = mom_cli.load(ckpt).config.mom_provenance
    assert prov[0]["command"] == "decompose" and prov[0]["args"]["depth"] == 2 and prov[0]["mom_version"]
