"""Training and healing under bfloat16 autocast, as they run on a GPU (`--dtype auto` is bf16
there): float32 weights, bf16 matmuls, in the grouped dispatch, the per-module dispatch (PEER
modules in the pool) and the losses. On `pytest --device cuda` they run on the GPU."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mom_cli
from mom_cli.io.tensorio import SafetensorsReader
from mom_cli.surgery.convert_peer import ConvertOptions, convert_peer
from mom_cli.surgery.decompose import PlanOptions, decompose
from mom_cli.training import distributed
from mom_cli.training.heal import HealOptions, heal
from mom_cli.training.train import Run, TrainOptions, kl_to_teacher, train
from tests.helpers import decomposed

SMALL = dict(seq_len=32, batch_size=2, dtype="bf16")


@pytest.fixture(scope="module")
def work(tmp_path_factory, models_dir) -> Path:
    """A routed top-2 Llama MoM with two PEER layers (source: the tiny Llama), and the text."""
    root = tmp_path_factory.mktemp("device")
    decomposed(models_dir / "llama", root / "exact")
    convert_peer(root / "exact", root / "peer", ConvertOptions(layers="1,2", heads=2, topk=16))
    decomposed(models_dir / "llama", root / "c2", depth=2, top_k=2)
    shutil.copy(models_dir / "text.txt", root / "text.txt")
    return root


def test_train_routers_everything_in_bf16_autocast(work, device):
    r = train(
        work / "c2",
        work / "c2-trained",
        TrainOptions(data=str(work / "text.txt"), train="all", steps=12, lr=3e-3, device=device, **SMALL),
    )
    assert math.isfinite(r.loss_first) and r.loss_last < r.loss_first
    mom_cli.load(r.path)  # a float32 checkpoint again


def test_heal_in_bf16_autocast_lowers_each_regions_error(work, models_dir, device):
    r = heal(
        work / "peer",
        work / "peer-healed",
        HealOptions(
            data=str(work / "text.txt"), budget="12k", local_share=0.7, lr=3e-3, global_lr=1e-3, device=device, **SMALL
        ),
    )
    assert len(r.regions) == 2 and r.global_steps > 0
    for reg in r.regions:
        assert reg["error_after"] < 0.95 * reg["error_before"], reg
    # The tiny model's perplexity barely moves (the surgery costs it 0.1%, less than bf16 rounds
    # off on a GPU), so the whole model's check is its distance to the teacher, in float32.
    teacher = AutoModelForCausalLM.from_pretrained(models_dir / "llama", dtype=torch.float32)
    text = (work / "text.txt").read_text()
    x = AutoTokenizer.from_pretrained(models_dir / "llama")(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        want = teacher(x).logits
        kl = [kl_to_teacher(mom_cli.load(c)(input_ids=x).logits, want).item() for c in (work / "peer", r.path)]
    assert kl[1] < 0.9 * kl[0], kl


def test_train_routers_keeps_frozen_bf16_weights_as_stored(work, models_dir, device):
    """A bf16 checkpoint trains its routers under bf16 autocast without a float32 copy of the
    model: frozen tensors come back bit for bit, in bf16; the routers train in float32."""
    src = decompose(str(models_dir / "llama"), work / "c2-bf16", PlanOptions(depth=2, top_k=2), dtype=torch.bfloat16)
    run = Run(
        src,
        work / "unused",
        TrainOptions(data=str(work / "text.txt"), steps=1, device=device, **SMALL),
        distributed.Dist(0, 1, 0),
        device,
    )
    dtypes = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16} and {p.dtype for _, p in run.dense} == {torch.float32}
    out = train(
        src, work / "c2-bf16-trained", TrainOptions(data=str(work / "text.txt"), steps=3, device=device, **SMALL)
    )
    before, after = SafetensorsReader(src), SafetensorsReader(out.path)
    changed = {k for k in before.keys() if not torch.equal(before.get(k), after.get(k))}
    assert changed and all("_router." in k for k in changed), changed
    assert after.dtype("model.blocks.0.mha.0.q_proj.weight") == torch.bfloat16
