"""`mom heal`: a region cut out of an exact checkpoint reproduces the teacher, the local stage lowers
each region's error, an exact checkpoint comes back unchanged, resume is bit-exact, and bad input
is one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import decomposed
from test_cli import assert_one_line_error, mom

from mom_cli.errors import UsageError
from mom_cli.io.checkpoint import load
from mom_cli.training import heal as H

SMALL = dict(seq_len=32, batch_size=2, dtype="fp32")  # `auto` would be bf16 on some CPUs: see the bf16 test


@pytest.fixture(scope="module")
def work(tmp_path_factory, models_dir) -> Path:
    """An exact Llama MoM, a PEER conversion of two of its layers, a pruned MHA module, and the text."""
    from mom_cli.surgery.convert_peer import ConvertOptions, convert_peer
    from mom_cli.surgery.prune import pooled_modules, remove_modules

    root = tmp_path_factory.mktemp("heal")
    shutil.copy(models_dir / "text.txt", root / "text.txt")
    decomposed(models_dir / "llama", root / "exact")
    convert_peer(root / "exact", root / "peer", ConvertOptions(layers="1,2", heads=2, topk=16))
    mha1 = next(r for r in pooled_modules(load(root / "exact").config) if r.kind == "mha" and r.slot == 1)
    remove_modules(
        root / "exact",
        root / "pruned",
        [mha1],
        {"command": "prune", "args": {}, "source": str(root / "exact"), "time": "", "mom_version": ""},
    )
    return root


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory, models_dir) -> Path:
    """A tiny OLMo 2 (no pre-norms: norms after each sublayer) and its exact MoM beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("heal-olmo2")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "olmo2", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "src")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models_dir / "llama" / f, root / "src" / f)
    decomposed(root / "src", root / "exact")
    return root


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load(path).state_dict().items()}


def test_budget_parses_tokens_and_durations():
    assert H.parse_budget("2M").tokens == 2_000_000 and H.parse_budget("500k").tokens == 500_000
    assert H.parse_budget("131072").tokens == 131072
    assert H.parse_budget("30m").seconds == 1800 and H.parse_budget("1.5h").seconds == 5400
    for bad in ("fast", "2x", "-3", "0", "m"):
        with pytest.raises(UsageError, match="not a number of tokens"):
            H.parse_budget(bad)


def test_regions_found_from_the_surgeries(work):
    peer = load(work / "peer")
    regions = H.find_regions(peer, peer.config, "auto")
    assert [(r.cause, r.start, r.end) for r in regions] == [("convert-peer", 3, 4), ("convert-peer", 5, 6)]
    assert all(".peer." in n for r in regions for n in r.params)
    pruned = load(work / "pruned")
    (r,) = H.find_regions(pruned, pruned.config, "auto")
    # MHA of layer 1 removed: its FFN and the next MHA learn to make up for it
    assert (r.cause, r.start, r.end) == ("prune", 2, 5)
    assert {n.split(".")[3] + n.split(".")[4] for n in r.params} == {"ffn1", "mha2"}
    exact = load(work / "exact")
    assert H.find_regions(exact, exact.config, "auto") == []


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_a_region_of_an_exact_checkpoint_reproduces_the_teacher(family, work, olmo2, models_dir, tmp_path):
    """Positions cut from the teacher's hooks and spans run by the student meet exactly (float32);
    OLMo 2's are its sublayers' inputs, Llama's its pre-norms'."""
    from mom_cli.families import family_for
    from mom_cli.io.loading import load_model

    student = load(work / "exact" if family == "llama" else olmo2 / "exact")
    teacher, _ = load_model(str(models_dir / "llama" if family == "llama" else olmo2 / "src"))
    x = torch.randint(0, 320, (2, 16))
    cache = H.TeacherCache(tmp_path / "cache-check", list(range(9)), np.arange(2), 16, 64)
    cache.open({})
    cache.grow(2, teacher, family_for(family), x.numpy(), 2, "cpu", {}, lambda: torch.autocast("cpu", enabled=False))
    rows = torch.arange(2)
    for a, b in ((0, 3), (3, 4), (4, 8)):
        units = H.span_units(0, 4, a, b)
        r = H.Region("r", "test", 0, a, b, units, [])
        y, _ = H.run_region(student, r, cache.read(a, rows, "cpu"))
        # inputs and outputs are stored in bf16: the difference is their rounding, not the model's
        ref = cache.read(b, rows, "cpu")
        assert (y - ref).abs().max() <= 0.02 * ref.abs().max(), (a, b)
    logits = teacher(input_ids=x).logits
    head = student.lm_head(student.model.norm(cache.read(8, rows, "cpu")))
    assert torch.allclose(head, logits, atol=0.05)


def test_local_stage_lowers_each_regions_error_and_heals(work):
    out = work / "peer-healed"
    # local_share 0.7: enough of the small budget for the local stage to show on each region
    opts = H.HealOptions(data=str(work / "text.txt"), budget="12k", local_share=0.7, lr=3e-3, global_lr=1e-3, **SMALL)
    r = H.heal(work / "peer", out, opts)
    assert len(r.regions) == 2
    for reg in r.regions:
        assert reg["error_after"] < 0.95 * reg["error_before"], reg
    config = json.loads((out / "config.json").read_text())
    assert config["mom_provenance"][-1]["command"] == "heal"
    lines = [json.loads(x) for x in (out / "heal_metrics.jsonl").read_text().splitlines()]
    assert {x.get("stage") for x in lines if "loss" in x} == {"local", "global"}
    assert r.global_steps > 0 and r.eval_ppl_before is not None and r.eval_ppl_after is not None
    assert not (work / "peer-healed.heal-state").exists()
    # only the regions' parameters (and the PEER BatchNorm statistics) moved
    before, after = weights(work / "peer"), weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".peer." in k for k in changed), changed


def test_an_exact_checkpoint_comes_back_unchanged(work):
    out = work / "exact-healed"
    r = H.heal(work / "exact", out, H.HealOptions(data=str(work / "text.txt"), budget="4k", **SMALL))
    assert r.regions == [] and r.trainable_params == 0
    before, after = weights(work / "exact"), weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert r.eval_ppl_before == r.eval_ppl_after


@pytest.mark.parametrize("ckpt", ["pruned", "peer"])  # peer: with the retrieval term's kept setup
def test_resume_is_bit_exact(work, ckpt):
    opts = dict(data=str(work / "text.txt"), budget="4k", lr=3e-3, save_every=1, **SMALL)
    whole = H.heal(work / ckpt, work / f"whole-{ckpt}", H.HealOptions(**opts))
    steps = 0
    for line in (work / f"whole-{ckpt}" / "heal_metrics.jsonl").read_text().splitlines():
        steps = max(steps, json.loads(line)["step"])
    assert steps >= 4
    regions = [
        json.loads(x).get("region") for x in (work / f"whole-{ckpt}" / "heal_metrics.jsonl").read_text().splitlines()
    ]
    second = regions.index(next(r for r in regions if r not in (None, regions[0]))) if ckpt == "peer" else None
    # inside the local stage (and inside a region that trains on the student's inputs), then inside the global one
    for stop in (2, *([second + 2] if second else []), steps - 1):
        out = work / f"resumed-{ckpt}-{stop}"
        cut = H.heal(work / ckpt, out, H.HealOptions(**opts, stop_after=stop))
        assert cut.path is None and (work / f"resumed-{ckpt}-{stop}.heal-state" / "state.pt").exists()
        H.heal(work / ckpt, out, H.HealOptions(**opts, resume=True))
        a, b = weights(work / f"whole-{ckpt}"), weights(out)
        assert all(torch.equal(a[k], b[k]) for k in a), stop
        ma = [json.loads(x) for x in (work / f"whole-{ckpt}" / "heal_metrics.jsonl").read_text().splitlines()]
        mb = [json.loads(x) for x in (out / "heal_metrics.jsonl").read_text().splitlines()]
        assert [m.get("loss") for m in ma] == [m.get("loss") for m in mb]
    assert whole.path == work / f"whole-{ckpt}"


def test_a_region_learns_from_the_students_own_inputs(work, tmp_path):
    """Stage 1 feeds each region of a chain the student's state at its start: the teacher's cached
    state at the chain's first region, carried through the student's modules from there (in turns
    between two memmaps, and from the chain's start for rows filled later). It meets the student's
    own forward, to bf16 rounding."""
    from mom_cli.surgery.convert_peer import ConvertOptions, convert_peer
    from mom_cli.training import distributed

    convert_peer(work / "exact", tmp_path / "peer4", ConvertOptions(layers="0-3", heads=2, topk=16))
    opts = H.HealOptions(data=str(work / "text.txt"), budget="4k", **SMALL)
    run = H.Heal(tmp_path / "peer4", tmp_path / "out", opts, H.check_options(opts), distributed.Dist(), "cpu")
    run.model.eval()
    assert [H.chain_head(run.regions, i) for i in range(4)] == [0, 0, 0, 0]
    cache = H.TeacherCache(tmp_path / "cache", run.cache_positions, run.cache_source, SMALL["seq_len"], 64)
    feeder = H.Feeder(run, cache, {})
    cache.open({})
    feeder.grow(4)  # a part now; the rest after the first regions, as a time budget fills it
    rows = torch.arange(min(8, cache.shape[0]))
    seen: dict[int, torch.Tensor] = {}
    block = run.model.model.blocks[0]
    ffn_step = block.ffn_step

    def keep(y, state, h, *args, **kwargs):  # the residual stream at each FFN's input
        seen[h] = y.detach().clone()
        return ffn_step(y, state, h, *args, **kwargs)

    block.ffn_step = keep
    ids = torch.from_numpy(run.blocks[run.cache_source[rows.numpy()]].astype(np.int64))
    with torch.no_grad():
        run.model(input_ids=ids)
    del block.ffn_step
    assert sorted(seen) == [0, 1, 2, 3]
    for i, (region, filled) in enumerate(zip(run.regions, (4, 6, 8, 8))):
        feeder.student.prepare(i)
        feeder.grow(filled)  # rows the teacher fills while region i trains
        assert feeder.student.region == (None if i == 0 else i)  # the chain's first region reads the teacher's cache
        x = feeder.inputs(region, rows[:filled])
        ref = seen[i].view(len(rows), SMALL["seq_len"], -1)[:filled]
        # bf16 rounding at each region's input, and the odd retrieval it flips
        assert (x - ref).norm() <= 0.01 * ref.norm(), i
    meta = json.loads((tmp_path / "cache" / "student.json").read_text())
    assert meta == {"0": {"region": 2, "filled": 8}, "1": {"region": 3, "filled": 8}}  # slots in turns


@pytest.mark.parametrize("ckpt, first", [("peer", 3), ("pruned", 2)])
def test_stage_2_takes_the_teachers_state_below_the_first_region(work, ckpt, first):
    """Below the first change the student is its source: stage 2 starts it from the teacher's state
    there, with the loss and gradients of the whole forward (float32)."""
    from mom_cli.training import distributed
    from mom_cli.training import train as tr

    opts = H.HealOptions(data=str(work / "text.txt"), budget="4k", **SMALL)
    run = H.Heal(work / ckpt, work / f"{ckpt}-unused", opts, H.check_options(opts), distributed.Dist(), "cpu")
    assert run.shared_bottom == first
    params = [run.named[n].requires_grad_(True) for n in run.trainable]
    x = torch.randint(0, run.config.vocab_size, (2, SMALL["seq_len"]))
    grads = []
    for losses in (
        lambda: tr.step_losses(run.model, run.teacher, x, run.coef),
        lambda: H.global_losses(run, run.model, x),
    ):
        parts = losses()
        parts["loss"].backward()
        grads.append([p.grad.clone() for p in params] + [parts["loss"].detach()])
        run.model.zero_grad()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    other = H.HealOptions(data=str(work / "text.txt"), budget="4k", teacher=str(work / "exact"), **SMALL)
    run = H.Heal(work / ckpt, work / f"{ckpt}-unused", other, H.check_options(other), distributed.Dist(), "cpu")
    assert run.shared_bottom is None  # another teacher: its states are not the student's
    run = H.Heal(work / ckpt, work / f"{ckpt}-unused", opts, H.check_options(opts), distributed.Dist(), "cpu")
    run.config.mom_provenance = [*run.config.mom_provenance, {"command": "train-routers", "args": {"train": "all"}}]
    assert run.shared_bottom is None  # training changed the layers below too


def test_eval_every_draws_the_curve_and_changes_nothing(work):
    """Evaluations along the way add points to the curve and leave the training itself untouched."""
    opts = dict(data=str(work / "text.txt"), budget="4k", lr=3e-3, **SMALL)
    plain = H.heal(work / "pruned", work / "plain", H.HealOptions(**opts))
    curved = H.heal(work / "pruned", work / "curved", H.HealOptions(**opts, eval_every=2))
    a, b = weights(work / "plain"), weights(work / "curved")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = max(json.loads(x)["step"] for x in (work / "curved" / "heal_metrics.jsonl").read_text().splitlines())
    assert len(plain.curve) == 2 and plain.curve[0][1] == plain.eval_ppl_before
    assert len(curved.curve) == 2 + steps // 2
    assert [t for t, _ in curved.curve] == sorted(t for t, _ in curved.curve)
    assert curved.curve[-1] == (curved.curve[-1][0], curved.eval_ppl_after)


@pytest.fixture(scope="module")
def long_text(work) -> Path:
    """Far more blocks than a few seconds of healing read."""
    path = work / "long.txt"
    path.write_text((work / "text.txt").read_text() * 100)
    return path


def cache_meta(state: Path) -> dict:
    return json.loads((state / "cache-rank0" / "cache.json").read_text())


def test_a_time_budget_fills_the_cache_on_demand(work, long_text):
    """The teacher runs over the rows the region reads, not over the whole cache, and the region learns."""
    # in bf16 autocast, as `--dtype auto` runs on CPUs with native bf16
    opts = H.HealOptions(data=str(long_text), budget="5s", lr=3e-3, keep_state=True, **SMALL | {"dtype": "bf16"})
    r = H.heal(work / "pruned", work / "timed", opts)
    (reg,) = r.regions
    assert reg["steps"] > 0 and reg["error_after"] < 0.95 * reg["error_before"], reg
    meta = cache_meta(work / "timed.heal-state")
    rows, read = meta["shape"][0], H.LOCAL_EVAL_BLOCKS + reg["steps"] * SMALL["batch_size"]
    assert rows > 10000  # the cache could hold the data...
    # ...but the teacher only ran over what the region read, and at most one pass ahead
    assert H.LOCAL_EVAL_BLOCKS < meta["filled"] <= min(rows - 1, read + H.FILL_BATCHES * SMALL["batch_size"])
    assert meta["fill_seconds"] > 0
    steps = [json.loads(x) for x in (work / "timed" / "heal_metrics.jsonl").read_text().splitlines()]
    assert any(x.get("stage") == "local" for x in steps) and any(x.get("stage") == "global" for x in steps)


def test_a_time_budget_resume_keeps_the_filled_rows(work, long_text, monkeypatch):
    opts = dict(data=str(long_text), budget="20s", lr=3e-3, save_every=1, **SMALL)
    out, state = work / "timed-resumed", work / "timed-resumed.heal-state"
    H.heal(work / "pruned", out, H.HealOptions(**opts, stop_after=3))
    filled = cache_meta(state)["filled"]
    assert filled > H.LOCAL_EVAL_BLOCKS
    starts = []
    grow = H.TeacherCache.grow
    monkeypatch.setattr(H.TeacherCache, "grow", lambda self, *a, **k: starts.append(self.filled) or grow(self, *a, **k))
    r = H.heal(work / "pruned", out, H.HealOptions(**opts, resume=True, stop_after=6))
    assert r.path is None and starts and min(starts) >= filled  # no row filled twice
    assert cache_meta(state)["filled"] >= filled


def test_plot_training_reads_heal_metrics(work, tmp_path):
    pytest.importorskip("matplotlib")
    from mom_cli.analysis.plots import plot_training, read_metrics

    # its own run: under xdist, the resume test's output may live in another worker's folder
    H.heal(
        work / "pruned",
        tmp_path / "healed",
        H.HealOptions(data=str(work / "text.txt"), budget="4k", eval_every=2, **SMALL),
    )
    rows = read_metrics(tmp_path / "healed")
    assert any("eval_ppl" in r for r in rows)
    assert any(r.get("stage") == "local" for r in rows)
    assert plot_training(rows, tmp_path / "heal.png").exists()


def test_bad_input_is_one_clear_line(work, models_dir, tmp_path):
    text = str(work / "text.txt")
    # no provenance, no teacher
    bare = tmp_path / "bare"
    shutil.copytree(work / "exact", bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg["mom_provenance"] = []
    (bare / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(
        mom("heal", str(bare), "-o", str(tmp_path / "out"), "--data", text, cwd=tmp_path), 2, "no provenance.*--teacher"
    )
    # a teacher with another vocabulary
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=400)
    ).save_pretrained(other)
    make_tokenizer(other)
    assert_one_line_error(
        mom(
            "heal",
            str(work / "peer"),
            "-o",
            str(tmp_path / "out"),
            "--data",
            text,
            "--seq-len",
            "32",
            "--teacher",
            str(other),
            cwd=tmp_path,
        ),
        2,
        "vocabulary of 400",
    )
    # data too short for one sequence
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    assert_one_line_error(
        mom(
            "heal",
            str(work / "peer"),
            "-o",
            str(tmp_path / "out"),
            "--data",
            str(short),
            "--seq-len",
            "64",
            cwd=tmp_path,
        ),
        2,
        "shorter than one sequence",
    )
    # a budget that is neither tokens nor time
    assert_one_line_error(
        mom("heal", str(work / "peer"), "-o", str(tmp_path / "out"), "--data", text, "--budget", "soon", cwd=tmp_path),
        2,
        "--budget 'soon' is not a number of tokens",
    )


def test_bad_options_name_themselves():
    for opts, name in ((dict(retrieval_loss=-1.0), "--retrieval-loss"), (dict(eval_every=-1), "--eval-every")):
        with pytest.raises(UsageError, match=name):
            H.check_options(H.HealOptions(data="x", **opts))


def test_the_retrieval_term_keeps_its_setup_and_trains_only_retrieval(work):
    """The PEER layers' owners and score scale are measured once per region and kept in the
    cursor (for resume); the term's gradient reaches the queries and keys, not the experts."""
    model = load(work / "peer")
    model.train()
    regions = H.find_regions(model, model.config, "auto")
    cursor: dict = {}
    term = H.Retrieval(model, regions[0], cursor)
    assert len(term.layers) == 1
    x = torch.randn(2, 16, model.config.hidden_size)
    with term:
        H.run_region(model, regions[0], x)
    (layer,) = term.layers.values()
    stats = layer.query_bn.running_mean.clone()
    term.loss().backward()
    assert torch.equal(layer.query_bn.running_mean, stats)  # the second pass is not counted
    assert set(cursor["retrieval"]) == set(term.layers)
    assert layer.query.weight.grad is not None and layer.sub_keys.grad is not None
    assert layer.w_out.grad is None and layer.w_in.grad is None


def test_ridge_refit_finds_output_vectors_that_fit():
    """With retrieval fixed, a PEER layer is linear in its output vectors: the refit recovers
    vectors that fit the targets far better than the ones it started from."""
    from mom_cli.modeling.peer import PeerLayer

    torch.manual_seed(0)
    layer = PeerLayer(16, 64, heads=2, topk=8, key_dim=8, gated=True, gate="none").eval()
    h = torch.randn(2048, 16)
    with torch.no_grad():
        target_vectors = torch.randn_like(layer.w_out) / 4
        start = layer.w_out.clone()
        layer.w_out.copy_(target_vectors)
        y = layer(h)
        layer.w_out.copy_(start)
    error = lambda: float(((layer(h).detach() - y) ** 2).sum() / (y**2).sum())  # noqa: E731
    before = error()
    w = torch.rand(2048) + 0.5  # per-token weights change the fit's emphasis, not an exact fit
    H.ridge_refit(layer, [(h[:1024], y[:1024], w[:1024]), (h[1024:], y[1024:], w[1024:])])
    assert error() < 0.1 * before, (before, error())


def test_a_token_with_a_massive_residual_does_not_drown_the_rest():
    """The region's error is measured as the next norm sees each token: a token whose residual is
    a thousand times larger (an attention sink's) weighs like any other, so missing every other
    token shows as a large error, and missing only that one as a small one."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 32)
    change = torch.randn(1, 64, 32)
    change[0, 0] *= 1000
    target = x + change
    miss_the_rest = target.clone()
    miss_the_rest[0, 1:] = x[0, 1:]
    miss_the_sink = target.clone()
    miss_the_sink[0, 0] = x[0, 0]
    assert H.relative_error(miss_the_rest, x, target) > 0.9
    assert H.relative_error(miss_the_sink, x, target) < 0.05
    # the loss ranks them the same way; a plain MSE would rank them the other way round
    region = H.Region(name="test", cause="test", block=0, start=0, end=1, units=[], params=[])
    loss = lambda y: float(H.region_loss(None, region, 99, y, target))  # noqa: E731
    assert loss(miss_the_rest) > 10 * loss(miss_the_sink)
    assert float(((miss_the_rest - target) ** 2).mean()) < float(((miss_the_sink - target) ** 2).mean())


def test_an_olmo2_teacher_heals_a_pruned_module(olmo2, models_dir):
    from mom_cli.surgery.prune import pooled_modules, remove_modules

    mha1 = next(r for r in pooled_modules(load(olmo2 / "exact").config) if r.kind == "mha" and r.slot == 1)
    prov = {"command": "prune", "args": {}, "source": str(olmo2 / "src"), "time": "", "mom_version": ""}
    remove_modules(olmo2 / "exact", olmo2 / "pruned", [mha1], prov)
    r = H.heal(
        olmo2 / "pruned",
        olmo2 / "healed",
        H.HealOptions(data=str(models_dir / "text.txt"), budget="8k", lr=3e-3, global_lr=1e-3, **SMALL),
    )
    assert [reg["cause"] for reg in r.regions] == ["prune"]
    assert r.regions[0]["error_after"] < 0.9 * r.regions[0]["error_before"]


def test_a_region_that_ends_at_the_top_reports_the_kl_it_trains_on(work, models_dir, tmp_path):
    """A compressed block spanning the whole model trains on KL through the head, which leaves the
    final residual's scale free: its error is that KL (on the rows kept out), not a relative error."""
    decomposed(models_dir / "llama", tmp_path / "half", depth=2, top_k=2)
    opts = H.HealOptions(data=str(work / "text.txt"), budget="8k", local_share=0.7, lr=3e-3, global_lr=1e-3, **SMALL)
    r = H.heal(tmp_path / "half", tmp_path / "healed", opts)
    (reg,) = r.regions
    assert (reg["cause"], reg["metric"]) == ("decompose", "KL")
    assert 0 < reg["error_after"] < reg["error_before"], reg
    peer = H.heal(work / "peer", tmp_path / "peer", H.HealOptions(**{**opts.__dict__, "budget": "2k"}))
    assert {x["metric"] for x in peer.regions} == {"relative error"}


def test_a_second_pass_over_the_data_is_announced_once(work, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "peer", trust_remote_code=False)
    n = len(tok((work / "text.txt").read_text()).input_ids)
    opts = H.HealOptions(data=str(work / "text.txt"), budget=str(3 * n), local_share=0.1, **SMALL)
    H.heal(work / "pruned", work / "pruned-3-passes", opts)
    err = capsys.readouterr().err
    assert err.count("starts a second pass over DATA") == 1, err
    H.heal(work / "pruned", work / "pruned-1-pass", H.HealOptions(**{**opts.__dict__, "budget": str(n // 2)}))
    assert "second pass" not in capsys.readouterr().err
