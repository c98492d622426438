"""`mom train-routers`: the loss falls, frozen parameters stay, resume is bit-equal, two-process DDP
matches one process, distillation from the source starts at KL 0, activation checkpointing changes
nothing, the token cache and the sparse optimizer behave, and bad input is one clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import decomposed
from test_cli import ENV, assert_one_line_error, mom

from mom_cli.errors import UsageError
from mom_cli.io import tokencache
from mom_cli.io.checkpoint import load
from mom_cli.training import train as tr
from mom_cli.training.optim import RowSparseAdam
from mom_cli.training.train import TrainOptions, group_of, train

SMALL = dict(seq_len=32, batch_size=2)


@pytest.fixture(scope="module")
def work(tmp_path_factory, models_dir) -> Path:
    """A compressed Llama MoM (4 layers -> 2 steps, top-2), an identity GPT-2 MoM, and the text."""
    root = tmp_path_factory.mktemp("train")
    decomposed(models_dir / "llama", root / "c2", depth=2, top_k=2)
    decomposed(models_dir / "gpt2", root / "gpt2-mom")
    shutil.copy(models_dir / "text.txt", root / "text.txt")
    return root


def params(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load(path).state_dict().items()}


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "train_metrics.jsonl").read_text().splitlines()]


def test_routers_train_and_everything_else_stays(work):
    out = work / "routers"
    result = train(work / "c2", out, TrainOptions(data=str(work / "text.txt"), steps=8, lr=1e-2, **SMALL))
    before, after = params(work / "c2"), params(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("_router." in k for k in changed), changed
    assert {k for k in before if "_router." in k and "head" in k} <= changed  # the routing heads left zero
    config = json.loads((out / "config.json").read_text())
    assert config["mom_provenance"][-1]["command"] == "train-routers"
    stats = json.loads((out / "routing_stats.json").read_text())
    assert stats["tokens"] > 0 and {e["kind"] for e in stats["entries"]} == {"mha", "ffn"}
    lines = metrics(out)
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 9))
    assert result.path == out and not (work / "routers.train-state").exists()


def test_peer_groups_train_per_mode(work):
    """`routers` trains PEER retrieval but not the expert tables; `routers+peer` trains the tables too."""
    from mom_cli.surgery.convert_peer import ConvertOptions, convert_peer

    peer = convert_peer(work / "c2", work / "peer", ConvertOptions(layers="1,2", heads=2, topk=8)).path
    text = str(work / "text.txt")
    base = params(peer)
    for mode, trained in (
        ("routers", {"router", "peer_retrieval"}),
        ("routers+peer", {"router", "peer_retrieval", "peer_experts"}),
    ):
        out = train(peer, work / f"peer-{mode}", TrainOptions(data=text, train=mode, steps=2, lr=1e-2, **SMALL)).path
        new = params(out)
        changed = {group_of(k) for k in base if not torch.equal(base[k], new[k])}
        assert changed == trained, (mode, changed)


def test_loss_falls_on_real_text_with_train_all(work):
    out = work / "all"
    result = train(work / "c2", out, TrainOptions(data=str(work / "text.txt"), train="all", steps=20, lr=3e-3, **SMALL))
    lm = [m["lm_loss"] for m in metrics(out) if "lm_loss" in m]
    assert np.mean(lm[-4:]) < np.mean(lm[:4]) - 1.0, lm
    assert result.eval_ppl_after < 0.5 * result.eval_ppl_before


def test_resume_after_an_interruption_is_bit_equal(work):
    opts = dict(data=str(work / "text.txt"), train="all", steps=6, save_every=2, grad_accum=2, lr=3e-3, **SMALL)
    train(work / "c2", work / "straight", TrainOptions(**opts))
    stopped = train(work / "c2", work / "resumed", TrainOptions(**opts, stop_after=5))  # killed after step 5
    assert stopped.path is None and not (work / "resumed").exists()
    with pytest.raises(UsageError, match="pass --resume"):
        train(work / "c2", work / "resumed", TrainOptions(**opts))
    with pytest.raises(UsageError, match="differs in steps"):
        train(work / "c2", work / "resumed", TrainOptions(**{**opts, "steps": 7}, resume=True))
    train(work / "c2", work / "resumed", TrainOptions(**opts, resume=True))  # continues from step 4
    a, b = params(work / "straight"), params(work / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert drop(metrics(work / "straight")) == drop(metrics(work / "resumed"))


def torchrun(work: Path, ckpt: str, *args: str) -> subprocess.CompletedProcess:
    """2 processes x batch 2 over gloo: the global batch of one process with 2 micro-batches of 2."""
    common = [
        "--data",
        "text.txt",
        "--train",
        "all",
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mom_cli",
        "train-routers",
        ckpt,
        *common,
        "--batch-size",
        "2",
        "--json",
        *args,
    ]
    res = subprocess.run(cmd, cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def one_process(work: Path, ckpt: str, out: str, **kw) -> Path:
    train(
        work / ckpt,
        work / out,
        TrainOptions(
            data=str(work / "text.txt"), train="all", steps=3, lr=3e-3, grad_accum=2, device="cpu", **SMALL, **kw
        ),
    )
    return work / out


def test_two_process_gloo_ddp_matches_one_process(work):
    """torchrun with 2 x batch 2 against one process with 2 micro-batches of 2: the same global batch."""
    one_process(work, "c2", "one")
    res = torchrun(work, "c2", "-o", "two")
    assert json.loads(res.stdout)["path"] == "two"  # one JSON object: only rank 0 prints
    a, b = params(work / "one"), params(work / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ma, mb = metrics(work / "one"), metrics(work / "two")
    losses = lambda ms: [m[k] for m in ms for k in ("loss", "eval_ppl") if k in m]  # noqa: E731
    assert losses(ma) == pytest.approx(losses(mb), rel=1e-5)


def test_two_process_gloo_fsdp_matches_one_process_and_resumes_its_state(work, models_dir):
    """FSDP2 over 2 processes gives the parameters of one process. Top-1 routing leaves some modules
    unused by every rank in the first step: they must get no AdamW step, as in one process. The
    training state has the same format (whole tensors, optimizer by index) whichever the strategy:
    the sharded run resumes the one-process state of step 2."""
    decomposed(models_dir / "llama", work / "c1", depth=2, top_k=1)
    one = one_process(work, "c1", "one1", save_every=2, keep_state=True)
    torchrun(work, "c1", "--strategy", "fsdp", "--save-every", "1", "--keep-state", "-o", "fsdp")
    a, b = params(one), params(work / "fsdp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    losses = lambda ms: [m[k] for m in ms for k in ("loss", "eval_ppl") if k in m]  # noqa: E731
    assert losses(metrics(one)) == pytest.approx(losses(metrics(work / "fsdp")), rel=1e-5)
    state = lambda p: torch.load(p / "state.pt", weights_only=True)  # noqa: E731
    saved, sharded = state(work / "one1.train-state"), state(work / "fsdp.train-state")  # steps 2 and 3
    assert saved["params"].keys() == sharded["params"].keys()
    groups = lambda st: [{k: v for k, v in g.items() if k != "lr"} for g in st["opt"]["param_groups"]]  # noqa: E731
    assert groups(saved) == groups(sharded) and saved["opt"]["state"].keys() == sharded["opt"]["state"].keys()
    shutil.copytree(work / "one1.train-state", work / "fsdp-resumed.train-state")
    torchrun(work, "c1", "--strategy", "fsdp", "--resume", "-o", "fsdp-resumed")  # step 3 only, sharded
    c = params(work / "fsdp-resumed")
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-5


def test_cli_distill_from_source_starts_at_kl_zero_and_errors(work):
    """Identity-routed MoM vs its source: KL 0 at the first step. `--distill` alone = provenance source."""
    run = mom(
        "train-routers",
        "gpt2-mom",
        "--data",
        "text.txt",
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--distill",
        "--json",
        cwd=work,
    )
    assert run.rc == 0, run
    assert "pass --aux-loss-coef 0" in run.err  # identity routing with load balancing: warned
    result = json.loads(run.out)
    kl = [m["kl"] for m in metrics(work / result["path"]) if "kl" in m]
    assert kl[0] < 1e-6 and len(kl) == 2
    kept = mom(
        "train-routers",
        "gpt2-mom",
        "--data",
        "text.txt",
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--aux-loss-coef",
        "0",
        "-o",
        "kept",
        cwd=work,
    )
    assert kept.rc == 0 and "aux-loss-coef" not in kept.err, kept
    bad = mom("train-routers", "gpt2-mom", "--data", "text.txt", "--seq-len", "32", "--resume", "-o", "x", cwd=work)
    assert_one_line_error(bad, 2, "no saved training state")
    assert not (work / "x").exists()


def test_checkpointing_gives_the_same_loss_gradients_and_routing(work):
    from mom_cli.modeling.modeling_mom import RoutingRecorder

    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))

    def run(checkpointed: bool):
        model = load(work / "c2").train()
        with torch.no_grad():  # non-zero router heads: real routing, not the identity
            for n, p in model.named_parameters():
                if "head" in n:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        if checkpointed:
            model.activation_checkpointing_enable()
        model.model.recorder = RoutingRecorder()
        out = model(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.item(), out.aux_loss.item(), grads, model.model.recorder.stats

    loss0, aux0, g0, s0 = run(False)
    loss1, aux1, g1, s1 = run(True)
    assert loss0 == pytest.approx(loss1, abs=1e-6) and aux0 == pytest.approx(aux1, abs=1e-6)
    assert g0.keys() == g1.keys()
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5) for n in g0)
    assert all(torch.equal(s0[k][0], s1[k][0]) for k in s0)  # counted once, not again in the recompute


def test_bad_input_is_a_clear_usage_error(work, tmp_path):
    from mom_cli.modeling.configuration_mom import MomConfig
    from mom_cli.modeling.modeling_mom import MomForCausalLM

    text = str(work / "text.txt")
    with pytest.raises(UsageError, match="longer than the model's 256 positions"):
        train(work / "c2", tmp_path / "o", TrainOptions(data=text, seq_len=512))
    with pytest.raises(UsageError, match="fewer than one global batch"):
        train(work / "c2", tmp_path / "o", TrainOptions(data=text, seq_len=256, batch_size=64))
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        train(work / "c2", tmp_path / "o", TrainOptions(data=text, dtype="fp16", device="cpu", **SMALL))
    with pytest.raises(UsageError, match="launch with torchrun"):  # one process: nothing to shard over
        train(work / "c2", tmp_path / "o", TrainOptions(data=text, strategy="fsdp", **SMALL))
    with pytest.raises(UsageError, match="routers\\+peer cannot run with --strategy fsdp"):
        train(work / "c2", tmp_path / "o", TrainOptions(data=text, train="routers+peer", strategy="fsdp", **SMALL))
    cfg = MomConfig.from_pretrained(work / "c2")
    cfg.bottom_layers, cfg.blocks = [0, 1, 2, 3], []  # a plain stack: no routers
    MomForCausalLM(cfg).save_pretrained(tmp_path / "plain")
    shutil.copy(work / "c2" / "tokenizer.json", tmp_path / "plain")
    shutil.copy(work / "c2" / "tokenizer_config.json", tmp_path / "plain")
    with pytest.raises(UsageError, match="nothing to train"):
        train(tmp_path / "plain", tmp_path / "o", TrainOptions(data=text, **SMALL))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # nothing left behind


def test_token_cache_beside_the_data_keyed_by_content(tmp_path, work, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "c2")
    data = tmp_path / "d.txt"
    data.write_text("hello world. " * 50)
    first = tokencache.ensure(str(data), tok)
    assert first.parent == tmp_path / ".mom-tokens"
    assert tokencache.ensure(str(data), tok) == first
    blocks = tokencache.open_blocks(first, 8)
    assert isinstance(blocks, np.memmap) and blocks.shape[1] == 8
    assert blocks.reshape(-1)[:5].tolist() == tok("hello world. " * 50)["input_ids"][:5]
    data.write_text("other text. " * 50)
    assert tokencache.ensure(str(data), tok) != first  # an edited file is tokenised again
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "t.txt").write_text("read only. " * 20)
    ro.chmod(0o555)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        path = tokencache.ensure(str(ro / "t.txt"), tok)
        writable = os.access(ro, os.W_OK)  # root may write anyway
        assert path.parent == (ro / ".mom-tokens" if writable else tmp_path / "xdg" / "mom" / "tokens")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_distillation_loss_equals_kl_div_and_its_gradient(dtype, monkeypatch):
    """The KL that train-routers --distill and heal minimise, made chunk by chunk with its gradient,
    against torch's kl_div and autograd on float32 copies; the logged LM loss against cross-entropy."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype).requires_grad_(True)
    target = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype)
    x = torch.randint(0, 50, (3, 7), generator=g)
    ref_logits = logits.detach().float().requires_grad_(True)
    s = torch.log_softmax(ref_logits, -1)
    t = torch.log_softmax(target.float(), -1)
    ref = torch.nn.functional.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    ref_lm = torch.nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    tol = 1e-6 if dtype == torch.float32 else 5e-3  # the gradient is kept in the logits' dtype
    for rows in (21, 2):  # one chunk, and chunks of two rows
        monkeypatch.setattr(tr, "CPU_CHUNK_FLOATS", rows * 50)
        kl, lm = tr.distill_losses(logits, target, x)
        (grad,) = torch.autograd.grad(3 * kl, logits)
        assert abs(kl.item() - ref.item()) < 1e-5 and abs(lm.item() - ref_lm.item()) < 1e-5
        assert grad.dtype == dtype and (grad.float() - 3 * ref_grad).abs().max() < tol * 3 * ref_grad.abs().max()
        assert not lm.requires_grad
    assert abs(tr.kl_to_teacher(logits, target).item() - ref.item()) < 1e-5


def test_distillation_gradient_survives_fp16_and_a_loss_scale():
    """fp16 logits (train-routers --dtype fp16, with GradScaler): gradients divided by the token
    count would fall below fp16's range before the loss scale reaches them; they come back as
    autograd's float32 ones, scaled."""
    g = torch.Generator().manual_seed(1)
    logits = (8 * torch.randn(64, 64, 50, generator=g)).half().requires_grad_(True)
    target = (8 * torch.randn(64, 64, 50, generator=g)).half()
    kl, _ = tr.distill_losses(logits, target, torch.zeros(64, 64, dtype=torch.long))
    (grad,) = torch.autograd.grad(kl * 65536, logits)
    ref_logits = logits.detach().float().requires_grad_(True)
    s, t = torch.log_softmax(ref_logits, -1).flatten(0, 1), torch.log_softmax(target.float(), -1).flatten(0, 1)
    ref = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    (ref_grad,) = torch.autograd.grad(ref * 65536, ref_logits)
    shown = ref_grad.abs() > 1e-3  # what fp16 holds once scaled
    assert grad.dtype == torch.float16 and shown.sum() > 10_000
    assert ((grad.float() - ref_grad).abs() / ref_grad.abs())[shown].max() < 1e-2


def test_row_sparse_adam_updates_only_retrieved_rows():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 3))
    ref = torch.nn.Parameter(w.detach()[[1, 4]].clone())
    opt, dense = RowSparseAdam([w], lr=0.1, weight_decay=0.01), torch.optim.AdamW([ref], lr=0.1, weight_decay=0.01)
    start = w.detach().clone()
    for _ in range(3):
        g = torch.randn(2, 3)
        w.grad = torch.zeros(6, 3).index_copy_(0, torch.tensor([1, 4]), g)
        ref.grad = g.clone()
        opt.step()
        dense.step()
    untouched = [0, 2, 3, 5]
    assert torch.equal(w.detach()[untouched], start[untouched])
    assert torch.equal(opt.state[w]["exp_avg"][untouched], torch.zeros(4, 3))
    assert torch.allclose(w.detach()[[1, 4]], ref.detach(), atol=1e-6)
    assert opt.state[w]["row_steps"].tolist() == [0, 3, 0, 0, 3, 0]


def test_parameter_groups_follow_the_contract():
    assert group_of("model.blocks.0.ffn_router.head.weight") == "router"
    assert group_of("model.blocks.0.ffn.3.peer.query.weight") == "peer_retrieval"
    assert group_of("model.blocks.0.ffn.3.peer.query_bn.running_mean") == "peer_retrieval"
    assert group_of("model.blocks.0.ffn.3.peer.sub_keys") == "peer_retrieval"
    assert group_of("model.blocks.0.ffn.3.peer.w_out") == "peer_experts"
    assert group_of("model.blocks.0.ffn.3.norm.weight") == "other"
    assert group_of("model.blocks.0.mha.0.q_proj.weight") == "other"


@pytest.mark.parametrize("tied", [False, True])
def test_cpu_teacher_in_autocast_dtype_gives_the_same_logits(tmp_path: Path, tied: bool) -> None:
    """A CPU teacher under bf16 autocast keeps its Linear weights in bf16 (no casts every step):
    its logits are bitwise those of the float32 teacher under autocast, and a tied head does not
    drag the embeddings (the residual stream) to bf16."""
    from conftest import _llama
    from transformers import AutoConfig, AutoModelForCausalLM

    src = _llama(tmp_path / "llama", tied=tied)
    config = AutoConfig.from_pretrained(src)
    teacher = tr.load_teacher(str(src), config, "cpu", torch.bfloat16, "--teacher MODEL")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert teacher.lm_head.weight.dtype == torch.bfloat16
    assert teacher.model.embed_tokens.weight.dtype == torch.float32
    x = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(teacher(input_ids=x).logits, ref(input_ids=x).logits)
