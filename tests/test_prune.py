"""`mom prune`: removals are exact where they should be, follow the scores, and give checkpoints
that load, generate with the cache and export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import mom_cli
import mom_cli.io.provenance
from mom_cli.analysis import routing_stats
from mom_cli.cli.argv import optional_values
from mom_cli.errors import UsageError
from mom_cli.io.loading import load_model, load_tokenizer
from mom_cli.surgery.export import export
from mom_cli.surgery.prune import (
    Measurer,
    ModuleRef,
    PruneOptions,
    keep_counts,
    lowest,
    prune,
    remove_modules,
)
from tests.helpers import decomposed, ids, max_diff

SHARD = 2 * 10**9
REC = mom_cli.io.provenance.record("test", {}, "test")
CALIB = dict(calib_tokens=512, seq_len=64, batch_size=4)


def opts(text_file: Path, **kw) -> PruneOptions:
    return PruneOptions(data=str(text_file), **{**CALIB, **kw})


def zero_out(ckpt: Path, out: Path, mha_slot: int, ffn_slot: int) -> Path:
    """A copy of `ckpt` where one MHA and one FFN module output exactly zero."""
    model = mom_cli.load(ckpt)
    block = model.model.blocks[0]
    with torch.no_grad():
        for lin in (
            block.mha[str(mha_slot)].o_proj,
            getattr(block.ffn[str(ffn_slot)], "down_proj", None) or block.ffn[str(ffn_slot)].fc_out,
        ):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    model.save_pretrained(out)
    for f in ckpt.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out


@torch.no_grad()
def test_removing_zero_output_modules_changes_no_logits(family_dir, tmp_path, text_file):
    ckpt = zero_out(decomposed(family_dir, tmp_path / "mom"), tmp_path / "zeroed", mha_slot=2, ffn_slot=1)
    zeroed = {ModuleRef("mha", 0, 2, 2), ModuleRef("ffn", 0, 1, 1)}
    # Their measured loss increase is exactly zero, and they are the ones removed.
    report = prune(ckpt, tmp_path / "pruned", opts(text_file, metric="loss", keep_mha="3", keep_ffn="3"))
    assert all(abs(report.plan.scores[r]) < 1e-6 for r in zeroed)
    out = remove_modules(ckpt, tmp_path / "exact", sorted(zeroed), REC)
    assert out.blocks[0]["mha"][2] is None and out.blocks[0]["ffn"][1] is None
    before, after = mom_cli.load(ckpt).eval(), mom_cli.load(tmp_path / "exact").eval()
    assert "model.blocks.0.mha.2.q_proj.weight" not in after.state_dict()
    x = ids()
    assert max_diff(before(x).logits, after(x).logits) <= 1e-5


@pytest.mark.parametrize("metric", ["loss", "cosine", "block-influence", "usage"])
def test_removals_follow_the_scores(llama_dir, tmp_path, text_file, metric):
    ckpt = decomposed(llama_dir, tmp_path / "mom", depth=4, top_k=2)
    model = mom_cli.load(ckpt).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # learned-looking routers, so the scores differ between modules
        for b in model.model.blocks:
            for r in (b.mha_router, b.ffn_router):
                r.head.weight.normal_(0, 0.5)
    model.save_pretrained(ckpt)
    if metric == "usage":
        rec = model.model.recorder = mom_cli.RoutingRecorder()
        with torch.no_grad():
            model(ids(4, 32), use_cache=False)
        routing_stats.save(ckpt, rec.stats, 4 * 32)
    report = prune(ckpt, tmp_path / "out", opts(text_file, metric=metric, keep_mha="50%", keep_ffn="3"))
    scores, removed = report.plan.scores, report.plan.removed
    assert sorted(removed) == sorted(lowest(scores, {"mha": 2, "ffn": 1}))
    for kind, n in (("mha", 2), ("ffn", 1)):
        gone = [scores[r] for r in removed if r.kind == kind]
        kept = [s for r, s in scores.items() if r.kind == kind and r not in removed]
        assert len(gone) == n and max(gone) <= min(kept)
    assert len(set(scores.values())) > 2, "scores should tell modules apart"
    if metric == "usage":  # shares of each pool's routing mass; SKIP holds the rest
        for kind in ("mha", "ffn"):
            assert 0 < sum(s for r, s in scores.items() if r.kind == kind) <= 1 + 1e-9


@torch.no_grad()
def test_greedy_never_worse_than_its_one_shot_ranking(gpt2_dir, tmp_path, text_file):
    ckpt = decomposed(gpt2_dir, tmp_path / "mom")
    o = opts(text_file, keep_mha="1", keep_ffn="3", greedy_width=2)
    one_shot = prune(ckpt, tmp_path / "loss", PruneOptions(**{**o.__dict__, "metric": "loss"}))
    greedy = prune(ckpt, tmp_path / "greedy", PruneOptions(**{**o.__dict__, "metric": "greedy"}))
    model, _ = load_model(str(ckpt))
    from transformers import AutoTokenizer

    from mom_cli.io.text import blocks, token_stream

    calib = blocks(token_stream(str(text_file), AutoTokenizer.from_pretrained(ckpt), 512), 64)
    m = Measurer(model, calib, 4, "cpu")
    assert m.loss(greedy.plan.removed) <= m.loss(one_shot.plan.removed) + 1e-9
    assert greedy.plan.trace[-1] == pytest.approx(m.loss(greedy.plan.removed), abs=1e-9)
    assert len(greedy.plan.trace) == 5  # 3 MHA + 1 FFN removed


@torch.no_grad()
def test_pruned_checkpoint_generates_with_cache_and_exports(llama_dir, tmp_path, text_file):
    ckpt = decomposed(llama_dir, tmp_path / "mom")
    attn_only = remove_modules(ckpt, tmp_path / "attn", [ModuleRef("mha", 0, 1, 1)], REC)
    assert attn_only.blocks[0]["mha"] == [0, None, 2, 3]
    model = mom_cli.load(tmp_path / "attn").eval()
    prompt = ids(2, 6)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    x = ids()
    out, kind = export(tmp_path / "attn", tmp_path / "attn-hf", "hf", None, SHARD, False)
    assert kind == "remote-code"
    assert max_diff(model(x).logits, mom_cli.load(out).eval()(x).logits) <= 1e-5

    # Both modules of layer 2 gone: still a plain stack, written in the family's own format.
    remove_modules(ckpt, tmp_path / "layer", [ModuleRef("mha", 0, 2, 2), ModuleRef("ffn", 0, 2, 2)], REC)
    out, kind = export(tmp_path / "layer", tmp_path / "layer-hf", "hf", None, SHARD, False)
    assert kind == "standard"
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.num_hidden_layers == 3
    pruned = mom_cli.load(tmp_path / "layer").eval()
    assert max_diff(pruned(x).logits, plain(x).logits) <= 1e-5
    assert torch.equal(
        pruned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
        plain.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
    )


def test_keep_forms_parse():
    assert optional_values(["x", "--keep-ffn"]) == ["x", "--keep-ffn", "all"]
    assert optional_values(["-", "--keep-ffn", "--data", "d"]) == ["-", "--keep-ffn", "all", "--data", "d"]
    assert optional_values(["--keep-ffn", "10", "x"]) == ["--keep-ffn", "10", "x"]
    assert optional_values(["--keep-mha", "25%", "--keep-ffn", "ckpt"]) == [
        "--keep-mha",
        "25%",
        "--keep-ffn",
        "all",
        "ckpt",
    ]
    assert keep_counts(None, None, 30, 30) == (15, 30)  # default: half the attention, every FFN
    assert keep_counts(None, "all", 30, 30) == (15, 30)  # --keep-ffn alone: prune attention only
    assert keep_counts(None, "10", 30, 30) == (30, 10)  # --keep-ffn N alone: prune FFN only
    assert keep_counts("25%", "90%", 30, 30) == (8, 27)
    for bad, pattern in (
        ("31", "more MHA modules than the 30"),
        ("0", "keep at least 1"),
        ("0%", "keep at least 1"),
        ("ten", "give a count"),
    ):
        with pytest.raises(UsageError, match=pattern):
            keep_counts(bad, None, 30, 30)


def test_bad_inputs(gpt2_dir, tmp_path, text_file):
    ckpt = decomposed(gpt2_dir, tmp_path / "mom")
    with pytest.raises(UsageError, match="routing statistics"):
        prune(ckpt, tmp_path / "a", opts(text_file, metric="usage"))
    with pytest.raises(UsageError, match="fewer than --calib-tokens"):
        prune(ckpt, tmp_path / "b", opts(text_file, calib_tokens=10**7))
    with pytest.raises(UsageError, match="unknown --metric"):
        prune(ckpt, tmp_path / "c", opts(text_file, metric="magnitude"))
    with pytest.raises(UsageError, match="more FFN modules"):
        prune(ckpt, tmp_path / "d", opts(text_file, keep_ffn="5"))
    with pytest.raises(UsageError, match="already pruned"):
        remove_modules(ckpt, tmp_path / "e", [ModuleRef("mha", 0, 9, 9)], REC)
    assert not any(
        p.name.startswith((".a", ".b", ".c", ".d", ".e", "a", "b", "c", "d", "e")) for p in tmp_path.iterdir()
    )


def test_cli_pipe_with_flag_form(gpt2_dir, tmp_path, text_file):
    ckpt = decomposed(gpt2_dir, tmp_path / "mom")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mom_cli",
            "prune",
            "-",
            "--keep-ffn",
            "--metric",
            "cosine",
            "--data",
            str(text_file),
            "--calib-tokens",
            "256",
            "--seq-len",
            "32",
            "--plot",
            str(tmp_path / "p.png"),
            "--json",
        ],
        input=f"{ckpt}\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    out = Path(result["path"])
    assert out == tmp_path / "mom-pruned" and (out / "config.json").exists()
    assert [m["removed"] for m in result["modules"] if m["kind"] == "ffn"] == []  # FFN not even scored
    assert sum(m["removed"] for m in result["modules"]) == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mom_provenance"][-1]["command"] == "prune"
    assert sum(o is None for o in cfg["blocks"][0]["mha"]) == 2

    from PIL import Image

    with Image.open(tmp_path / "p.png") as img:
        assert img.size[0] > 600 and img.size[1] > 300
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mom_cli",
            "prune",
            str(ckpt),
            "--keep-mha",
            "9",
            "--data",
            str(text_file),
            "-o",
            str(tmp_path / "never"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "more MHA modules than the 4" in bad.stderr
    assert not (tmp_path / "never").exists()


def _learned_routers(ckpt: Path) -> None:
    model = mom_cli.load(ckpt).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # routers that send tokens to different modules at different steps
        for b in model.model.blocks:
            for r in (b.mha_router, b.ffn_router):
                r.head.weight.normal_(0, 0.5)
    model.save_pretrained(ckpt)


@torch.no_grad()
def test_streamed_measurements_equal_the_model_in_memory(llama_dir, tmp_path, text_file):
    from transformers import AutoTokenizer

    from mom_cli.io.text import blocks, token_stream
    from mom_cli.surgery.prune import make_plan, pooled_modules
    from mom_cli.surgery.sequential import StreamedMeasurer

    ckpt = decomposed(llama_dir, tmp_path / "mom", bottom=1, top=1, pool_size=2, depth=3, top_k=2)
    _learned_routers(ckpt)
    calib = blocks(token_stream(str(text_file), AutoTokenizer.from_pretrained(ckpt), 384), 64)
    model, _ = load_model(str(ckpt))
    memory, streamed = Measurer(model, calib, 4, "cpu"), StreamedMeasurer(ckpt, calib, 4, "cpu")
    refs = pooled_modules(model.config)
    sets = [(), *[(r,) for r in refs], tuple(refs[:2]), (refs[1], refs[-1])]
    assert streamed.losses(sets) == pytest.approx(memory.losses(sets), abs=1e-6)
    streamed.rebase([refs[0]])  # later measurements resume from the states with refs[0] removed
    assert streamed.losses([(refs[0], r) for r in refs[1:]]) == pytest.approx(
        memory.losses([(refs[0], r) for r in refs[1:]]), abs=1e-6
    )
    for metric in ("greedy", "loss", "cosine", "block-influence"):
        a = make_plan(metric, Measurer(model, calib, 4, "cpu"), refs, {"mha": 2, "ffn": 1}, None, 2, True)
        b = make_plan(metric, StreamedMeasurer(ckpt, calib, 4, "cpu"), refs, {"mha": 2, "ffn": 1}, None, 2, True)
        assert b.removed == a.removed, metric
        assert [b.scores[r] for r in refs] == pytest.approx([a.scores[r] for r in refs], abs=1e-6)
        assert b.trace == pytest.approx(a.trace, abs=1e-6)


@torch.no_grad()
def test_a_bfloat16_checkpoint_stays_bfloat16(llama_dir, tmp_path, text_file, capsys):
    from mom_cli.surgery.sequential import StreamedMeasurer

    ckpt = decomposed(llama_dir, tmp_path / "mom")
    bf16 = decompose_bf16(llama_dir, tmp_path / "bf16")
    report = prune(bf16, tmp_path / "out", opts(text_file, metric="loss", keep_mha="3"))
    from mom_cli.io.checkpoint import read_mom

    _, reader = read_mom(tmp_path / "out")
    assert {reader.dtype(k) for k in reader.keys()} == {torch.bfloat16}
    calib = report.plan.trace[0]
    model, _ = load_model(str(bf16))  # the stored dtype, as every command loads it by default
    assert model.dtype == torch.bfloat16
    from mom_cli.io.text import calibration_split

    blocks_, _ = calibration_split(load_tokenizer(bf16), str(text_file), 512, 64)
    assert calib == pytest.approx(Measurer(model, blocks_, 4, "cpu").loss(), abs=1e-6)
    f32 = StreamedMeasurer(bf16, blocks_, 4, "cpu", torch.float32).loss()
    assert abs(f32 - calib) > 1e-6  # computed in bf16, not silently upcast
    assert StreamedMeasurer(ckpt, blocks_, 4, "cpu").model.model.norm.weight.dtype == torch.float32
    from mom_cli.cli.app import main

    capsys.readouterr()
    assert main(["eval", str(bf16), "--data", str(text_file), "--seq-len", "64", "--max-tokens", "512", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(calib, abs=1e-6)  # the same bf16 numbers


def decompose_bf16(src: Path, out: Path) -> Path:
    from mom_cli.surgery.decompose import PlanOptions, decompose

    return decompose(str(src), out, PlanOptions(), dtype=torch.bfloat16)


def test_default_calibration_is_sized_to_the_model():
    from mom_cli.surgery.prune import default_calib_tokens

    assert default_calib_tokens(4.2e8, 512) == 2048  # SmolLM2-135M's FLOPs per token
    assert default_calib_tokens(1.4e10, 128) == 256  # 7B: the floor
    assert default_calib_tokens(1.4e10, 512) == 512  # at least one sequence
    assert default_calib_tokens(1e6, 512) == 8192  # a tiny model: the ceiling
