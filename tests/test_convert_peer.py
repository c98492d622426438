"""`mom convert-peer` and PEER modules in the MoM runtime: exactness against the dense MoM (both
families), zero-expert expansion, cached generation in a routed pool, exports (trust_remote_code in a
fresh Python, flat safetensors), the report, `mom info`'s counts, and bad inputs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import mom_cli
from mom_cli.errors import UsageError
from mom_cli.surgery.convert_peer import ConvertOptions, convert_peer
from tests.helpers import decomposed, ids, max_diff, remote_code_check

D_FF = {"gpt2": 256, "llama": 128}  # the fixtures' FFN widths
SHARD = 2 * 10**9


@pytest.fixture(scope="module")
def moms(models_dir, tmp_path_factory) -> dict[str, Path]:
    """Decomposed fixture models, shared by the module's tests (which never write into them)."""
    root = tmp_path_factory.mktemp("peer-moms")
    return {
        "gpt2": decomposed(models_dir / "gpt2", root / "gpt2"),
        "llama": decomposed(models_dir / "llama", root / "llama"),
        "llama-routed": decomposed(models_dir / "llama", root / "llama-routed", depth=2, top_k=2),
        "gpt2-bottom": decomposed(models_dir / "gpt2", root / "gpt2-bottom", bottom=1),
    }


def logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return mom_cli.load(path).eval()(x).logits


def square_above(n: int) -> int:
    return (math.isqrt(n - 1) + 1) ** 2


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_covering_retrieval_equals_dense_and_zero_experts_change_nothing(moms, family, tmp_path):
    """h=1, k=N, gate none: the PEER modules compute the dense FFNs exactly, at the default N and
    with the pool expanded well beyond d_ff (the extra experts have zero output vectors)."""
    x = ids(2, 16)
    dense = logits(moms[family], x)
    default_n = square_above(D_FF[family])
    for n in (default_n, (math.isqrt(default_n) + 5) ** 2):
        out = convert_peer(
            moms[family], tmp_path / f"peer-{n}", ConvertOptions(layers="1-2", experts=n, heads=1, topk=n)
        )
        model = mom_cli.load(out.path).eval()
        peer = model.model.blocks[0].ffn["1"].peer
        assert type(model.model.blocks[0].ffn["1"]).__name__ == "PeerFfnModule"
        assert type(model.model.blocks[0].ffn["0"]).__name__ == "FfnModule"  # a pool mixing dense and PEER
        assert peer.n_experts == n and int((peer.w_out.abs().sum(1) > 0).sum()) == D_FF[family]
        with torch.no_grad():
            assert max_diff(dense, model(x).logits) <= 1e-5


def test_cached_generation_agrees_with_peer_in_a_routed_pool(moms, tmp_path):
    """Top-2 routing over a pool mixing dense and PEER modules, with token-dependent routers: the
    KV-cached decode gives the full forward's logits, and generate() the same tokens either way."""
    out = convert_peer(moms["llama-routed"], tmp_path / "peer", ConvertOptions(layers="0,2", heads=4, topk=8))
    model = mom_cli.load(out.path).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.model.blocks:  # routers that depend on the token: PEER sees subsets
            block.ffn_router.head.weight.normal_(0, 0.5)
            block.mha_router.head.weight.normal_(0, 0.5)
        x = ids(2, 12)
        full = model(x, use_cache=False).logits
        first = model(x[:, :8], use_cache=True)
        cache = first.cache if hasattr(first, "cache") and first.cache is not None else first.past_key_values
        steps = [first.logits]
        for t in range(8, 12):
            step = model(x[:, t : t + 1], use_cache=True, cache=cache, past_key_values=cache)
            steps.append(step.logits)
        assert max_diff(full, torch.cat(steps, 1)) <= 1e-4
        cached = model.generate(x[:, :5], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(x[:, :5], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    model.train()  # a routed module may get one token in training: BatchNorm has no batch variance then
    assert torch.isfinite(model(x[:1, :1], use_cache=False).logits).all()


# ----------------------------------------------------------------------------- exports


def test_exports_remote_code_without_mom_and_flat_safetensors(moms, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mom_cli.modeling.configuration_mom import MomConfig
    from mom_cli.modeling.modeling_mom import MomForCausalLM
    from mom_cli.surgery.export import export

    ckpt = convert_peer(moms["gpt2"], tmp_path / "peer", ConvertOptions(layers="1,3", heads=2, topk=32)).path
    x = ids(1, 10)
    expect = logits(ckpt, x)
    out, kind = export(ckpt, tmp_path / "rc", "hf", None, SHARD, False)
    assert kind == "remote-code" and (out / "peer.py").exists()
    diff, module = remote_code_check(
        out,
        x,
        expect,
        tmp_path,
        """
        print(type(m.model.blocks[0].ffn["1"].peer).__module__)
        """,
    )
    assert "mom_cli" not in module and module.endswith("peer") and float(diff) <= 1e-5

    flat, _ = export(ckpt, tmp_path / "flat.safetensors", "safetensors", None, SHARD, False)
    with safe_open(str(flat), "pt") as f:
        config = MomConfig.from_dict(json.loads(f.metadata()["mom_config"]))
    assert set(config.peer) == {"0.1", "0.3"}
    model = MomForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(load_file(flat), strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # tied to the embeddings
    model.tie_weights()
    with torch.no_grad():
        assert max_diff(expect, model(x).logits) <= 1e-6


# ----------------------------------------------------------------------------- the report


def test_report_and_info_after_calibration(moms, models_dir, tmp_path):
    from mom_cli.analysis.evaluate import perplexity
    from mom_cli.analysis.info import peer_costs, summary
    from mom_cli.io.text import blocks, token_stream

    opts = ConvertOptions(
        layers="middle",
        calibrate=str(models_dir / "text.txt"),
        calib_tokens=1024,
        calib_steps=3,
        seq_len=64,
        eval_tokens=512,
    )
    report = convert_peer(moms["gpt2"], tmp_path / "peer", opts).as_dict()
    assert [r["origin"] for r in report["layers"]] == [1, 2]  # the middle third... of 4 layers: 1-2
    for r in report["layers"]:
        assert r["n_experts"] == 256 and r["heads"] * r["topk"] == 128 and r["neurons_kept"] == 256
        assert 0 < r["oracle_mass_found"] <= 1 + 1e-6 and 0 <= r["output_error"] < 2
        assert 0 < r["expert_usage"] <= 1 and 0 <= r["usage_kl_uniform"] <= math.log(256)
        assert r["calib_error_before"] > 0 and r["calib_error_after"] > 0
        assert r["params_active_per_token"] < r["params_total"]
    assert report["calibrated"] and report["heldout_tokens"] == 512
    assert report["params_active_per_token"]["after"] < report["params_total"]["after"]

    # the perplexity reported after conversion is the saved checkpoint's, on DATA after the calibration tokens
    model = mom_cli.load(report["path"]).eval()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(report["path"])
    held = blocks(token_stream(opts.calibrate, tok, 1024 + 512)[1024:], 64)
    assert math.isclose(
        math.exp(perplexity(model, held, 4, "cpu")[0]), report["heldout_perplexity"]["after"], rel_tol=1e-5
    )
    assert model.config.mom_provenance[-1]["command"] == "convert-peer"
    assert model.config.mom_provenance[-1]["args"]["layers"] == [1, 2]

    s = summary(model.config)
    assert [p["module"] for p in s["peer_modules"]] == ["0.1", "0.2"]
    peer = model.model.blocks[0].ffn["1"].peer
    costs = peer_costs(peer.config_dict())
    assert costs["params_total"] == sum(p.numel() for p in peer.parameters())
    assert s["peer_modules"][0]["params_total"] == sum(p.numel() for p in model.model.blocks[0].ffn["1"].parameters())
    covering = peer_costs({**peer.config_dict(), "heads": 1, "topk": 256})
    assert covering["params_active"] == covering["params_total"]


def test_drop_weakest_neurons_and_random_init(moms, tmp_path):
    out = convert_peer(
        moms["llama"],
        tmp_path / "small",
        ConvertOptions(layers="1", experts=100, drop_neurons="weakest", heads=4, topk=8),
    )
    assert out.layers[0].neurons_kept == 100
    peer = mom_cli.load(out.path).model.blocks[0].ffn["1"].peer
    assert int((peer.w_out.abs().sum(1) > 0).sum()) == 100
    listed = convert_peer(
        moms["llama"], tmp_path / "listed", ConvertOptions(layers="1", drop_neurons="0-27", heads=4, topk=8)
    )
    assert listed.layers[0].neurons_kept == 100 and listed.layers[0].n_experts == 100
    rand = convert_peer(moms["llama"], tmp_path / "rand", ConvertOptions(layers="all", init="random"))
    assert [r.gate for r in rand.layers] == ["softmax"] * 4 and len(mom_cli.load(rand.path).config.peer) == 4


# ----------------------------------------------------------------------------- bad input


BAD = {  # ConvertOptions changes -> what the error must say
    "not-square": (dict(experts=1000), r"--experts 1000 is not a perfect square.*961 or 1024"),
    "fewer-than-dff": (dict(experts=225), r"fewer than the 256 neurons.*--drop-neurons"),
    "out-of-range": (dict(layers="2-9"), r"9 is out of range.*0-3"),
    "topk-over-n": (dict(topk=300), r"--topk 300 must be between 1 and --experts 256"),
    "key-dim-odd": (dict(key_dim=33), r"--key-dim 33 must be even"),
    "key-dim-vs-heads": (dict(key_dim=16), r"neuron init needs key-dim/2 > heads"),
    "weakest-without-n": (dict(drop_neurons="weakest"), r"needs --experts N"),
    "random-calibrate": (dict(init="random", calibrate="text.txt"), r"--calibrate needs --init neurons"),
    "data-too-short": (dict(calibrate="short.txt", seq_len=64, calib_tokens=128), r"fewer than --calib-tokens 128"),
    "plain-layer": (dict(layers="0"), r"layer 0 is a plain \(bottom\) layer.*1-3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_are_usage_errors_and_write_nothing(moms, case, tmp_path, models_dir):
    (tmp_path / "short.txt").write_text("Too short.")
    shutil.copy(models_dir / "text.txt", tmp_path / "text.txt")
    changes, pattern = BAD[case]
    changes = {k: str(tmp_path / v) if k == "calibrate" else v for k, v in changes.items()}
    ckpt = moms["gpt2-bottom" if case == "plain-layer" else "gpt2"]
    with pytest.raises(UsageError, match=pattern):
        convert_peer(ckpt, tmp_path / "out", ConvertOptions(**{"layers": "1", **changes}))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_already_peer_is_refused(moms, tmp_path):
    once = convert_peer(moms["gpt2"], tmp_path / "once", ConvertOptions(layers="1-2")).path
    with pytest.raises(UsageError, match=r"layer 2 is already PEER; choose among 0,3"):
        convert_peer(once, tmp_path / "twice", ConvertOptions(layers="2"))
    again = convert_peer(once, tmp_path / "rest", ConvertOptions(layers="all"))  # all = the dense ones left
    assert [r.origin for r in again.layers] == [0, 3]

    from mom_cli.io.provenance import record
    from mom_cli.surgery.prune import ModuleRef, remove_modules

    remove_modules(moms["gpt2"], tmp_path / "pruned", [ModuleRef("ffn", 0, 2, 2)], record("prune", {}, "test"))
    with pytest.raises(UsageError, match=r"FFN module of layer 2 was pruned.*choose among 0-1,3"):
        convert_peer(tmp_path / "pruned", tmp_path / "x", ConvertOptions(layers="2"))
    pruned = convert_peer(tmp_path / "pruned", tmp_path / "y", ConvertOptions(layers="3"))  # slots keep their numbers
    assert pruned.layers[0].module == "0.3" and mom_cli.load(pruned.path).config.peer.keys() == {"0.3"}

    # Pruning a PEER module removes its entry too: the checkpoint names no layer it does not hold.
    gone = remove_modules(once, tmp_path / "peer-pruned", [ModuleRef("ffn", 0, 1, 1)], record("prune", {}, "test"))
    assert gone.peer.keys() == {"0.2"} and mom_cli.load(tmp_path / "peer-pruned").config.peer.keys() == {"0.2"}


def test_cli_json_result_and_one_line_errors(moms, tmp_path):
    """Through real `mom` processes (run side by side): --json is one object on stdout; bad input is
    one line on stderr with exit 2 and no output left behind."""
    from tests.test_cli import ENV, MOM, Run, assert_one_line_error

    def run(*args: str) -> Run:
        res = subprocess.run(
            [*MOM, "convert-peer", str(moms["gpt2"]), *args],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return Run(res.returncode, res.stdout, res.stderr)

    with ThreadPoolExecutor(2) as pool:
        ok = pool.submit(run, "--layers", "1", "-o", "ok", "--json")
        bad = pool.submit(run, "--layers", "1,x", "-o", "bad")
        ok, bad = ok.result(), bad.result()
    assert ok.rc == 0 and "Traceback" not in ok.err, ok
    result = json.loads(ok.out)
    assert Path(result["path"]).name == "ok" and result["layers"][0]["origin"] == 1 and (tmp_path / "ok").is_dir()
    assert_one_line_error(bad, 2, r"--layers '1,x': use indexes and ranges such as 10-19")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_help_has_example_and_every_option():
    import typer

    from mom_cli.cli.app import app

    command = typer.main.get_command(app).commands["convert-peer"]
    assert "Example: mom convert-peer" in command.help
    names = {opt for p in command.params for opt in p.opts}
    assert {
        "--layers",
        "--experts",
        "--heads",
        "--topk",
        "--key-dim",
        "--gate",
        "--init",
        "--calibrate",
        "--calib-tokens",
        "--calib-steps",
        "--device",
        "--json",
        "--force",
        "--no-query-bn",
        "--per-head-keys",
        "--drop-neurons",
        "--seq-len",
        "--batch-size",
        "--eval-data",
        "-o",
    } <= names
