"""Attacks and careless use: no code from a model folder runs, nothing is lost, every refusal is one line.

Most cases run the CLI in-process (`main(argv)`, a fraction of a second each); the few that need
a real stdin, a second process or a signal run `python -m mom_cli`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mom_cli.cli.app import main

MOM = [sys.executable, "-m", "mom_cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TRAIN = ["--data", "text.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, code: int, rc: int, pattern: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert lines and lines[-1].startswith("mom: error: "), err
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "Traceback" not in err
    errors = [ln for ln in lines if ln.startswith("mom: error")]
    assert len(errors) == 1 and len(lines[-1]) < 700, err


@pytest.fixture
def work(models_dir, tmp_path, monkeypatch) -> Path:
    shutil.copytree(models_dir / "gpt2", tmp_path / "gpt2")
    shutil.copy(models_dir / "text.txt", tmp_path / "text.txt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def mom_ckpt(work, capsys) -> Path:
    assert cli(capsys, "decompose", "gpt2", "-o", "m")[0] == 0
    return work / "m"


def rewrite_safetensors(path: Path, edit) -> None:
    """Load every tensor, let `edit` change the dict, save it back (a damaged checkpoint)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def patch_header(path: Path, edit) -> None:
    """Rewrite a safetensors header in place (same length, padded with spaces): a header that lies."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n :])


# ----------------------------------------------------------------------------- 1. remote code


def remote_code_folder(base: Path, tokenizer_only: bool = False) -> Path:
    d = Path(shutil.copytree(base / "gpt2", base / ("evil-tok" if tokenizer_only else "evil")))
    marker = base / "RAN"
    (d / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import GPT2Config as EvilConfig\n"
        "from transformers import GPT2LMHeadModel as EvilModel\n"
    )
    if tokenizer_only:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["auto_map"] = {"AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]}
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
    else:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(
            model_type="evilnet", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        )
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_remote_code_never_runs_even_when_stdin_says_yes(work):
    remote_code_folder(work)
    remote_code_folder(work, tokenizer_only=True)
    mom = " ".join(MOM)
    script = textwrap.dedent(f"""
        yes | {mom} info evil; echo "rc=$?"
        yes | {mom} decompose evil -o out1; echo "rc=$?"
        yes | {mom} eval evil --data text.txt --seq-len 32; echo "rc=$?"
        printf 'evil\\ny\\n' | {mom} eval - --data text.txt --seq-len 32; echo "rc=$?"
        yes | {mom} eval evil-tok --data text.txt --seq-len 32; echo "rc=$?"
        yes | {mom} decompose evil-tok -o out2; echo "rc=$?"
    """)
    res = subprocess.run(["bash", "-c", script], cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert not (work / "RAN").exists(), res.stderr
    assert res.stdout.split() == ["rc=2"] * 6, res
    errors = res.stderr.splitlines()
    assert len(errors) == 6 and all(e.startswith("mom: error: ") and "own Python code" in e for e in errors), res.stderr
    assert "no opt-in" in errors[0] and "[y/N]" not in res.stdout + res.stderr
    assert not (work / "out1").exists() and not (work / "out2").exists()


def test_known_model_type_with_auto_map_loads_the_builtin_class_only(work, capsys):
    cfg = json.loads((work / "gpt2" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (work / "gpt2" / "config.json").write_text(json.dumps(cfg))
    (work / "gpt2" / "evil.py").write_text(f"open({str(work / 'RAN')!r}, 'w')\n")
    code, _, err = cli(capsys, "eval", "gpt2", "--data", "text.txt", "--seq-len", "32", "--max-tokens", "64", "--json")
    assert code == 0, err
    assert not (work / "RAN").exists()


# ----------------------------------------------------------------------------- 2. missing tensors


@pytest.mark.parametrize("damage", ["missing", "shape", "dtype"])
def test_damaged_mom_checkpoint_is_refused_by_every_command(mom_ckpt, capsys, damage):
    name = "model.blocks.0.ffn.1.fc_in.weight"

    def edit(t):
        if damage == "missing":
            del t[name]
        elif damage == "shape":
            t[name] = t[name][:, :-1].contiguous()
        else:
            t[name] = t[name].to(torch.int32)

    rewrite_safetensors(mom_ckpt / "model.safetensors", edit)
    runs = {
        "eval": ["eval", "m", "--data", "text.txt", "--seq-len", "32"],
        "info": ["info", "m"],
        "export": ["export", "m", "-o", "x"],
        "prune": ["prune", "m", "--data", "text.txt", "-o", "x"],
        "convert-peer": ["convert-peer", "m", "--layers", "all", "-o", "x"],
        "train-routers": ["train-routers", "m", "-o", "x", *TRAIN],
    }
    for command, argv in runs.items():
        code, out, err = cli(capsys, *argv)
        one_line(err, 1, code, re.escape(name))
        assert out == "" and not Path("x").exists(), command


# ----------------------------------------------------------------------------- 3. locks


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding mom's lock of `path`, as a running writer does."""
    code = (
        f"import fcntl, os, sys, time; fd = os.open({str(path.parent / f'.{path.name}.lock')!r}, os.O_RDWR | os.O_CREAT);"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_of_one_output_is_refused(work, capsys, mom_ckpt):
    for target, argv in (
        (work / "out", ["decompose", "gpt2", "-o", "out"]),
        (work / "t.train-state", ["train-routers", "m", "-o", "t", *TRAIN]),
    ):
        proc = hold_lock(target)
        try:
            code, out, err = cli(capsys, *argv)
        finally:
            proc.kill()
            proc.wait()
        one_line(err, 1, code, r"another mom command is writing")
        assert not (work / "out").exists() and not (work / "t").exists()
    assert cli(capsys, "decompose", "gpt2", "-o", "out")[0] == 0  # the lock goes with its holder
    assert not list(work.glob(".out.lock"))  # and a finished writer removes its lock file


# ----------------------------------------------------------------------------- 4. replacement


def test_force_replaces_by_exchange_and_the_old_output_never_vanishes(work, monkeypatch):
    from mom_cli.io import atomic

    (work / "o").mkdir()
    (work / "o" / "v").write_text("old")
    seen = []
    real = atomic._exchange

    def spy(a: Path, b: Path) -> bool:
        ok = real(a, b)
        seen.append((ok, (b / "v").read_text()))  # at once after the swap: the target is the new one
        return ok

    monkeypatch.setattr(atomic, "_exchange", spy)
    with atomic.atomic_dir(work / "o", force=True) as tmp:
        (tmp / "v").write_text("new")
    assert seen == [(True, "new")] and (work / "o" / "v").read_text() == "new"
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".o")) == []


def test_next_run_restores_an_old_output_left_aside_and_cleans_leftovers(work, capsys):
    # what a kill between the two renames of the fallback leaves, and a killed run's temporary
    (work / ".out.old-abc" / "x").mkdir(parents=True)
    (work / ".out.old-abc" / "x" / "config.json").write_text("{}")
    (work / ".out.tmp-def").mkdir()
    code, out, err = cli(capsys, "decompose", "gpt2", "-o", "out")
    one_line(err, 2, code, "already exists")  # the restored old output is not replaced without --force
    assert "restored" in err and "removed" in err
    assert (work / "out" / "config.json").read_text() == "{}"
    assert not list(work.glob(".out.*"))


def test_output_dot_is_refused_in_one_line(work, capsys):
    for target in (".", "..", str(work)):
        code, out, err = cli(capsys, "decompose", "gpt2", "-o", target, "--force")
        one_line(err, 2, code, "current folder")
    assert not list(work.parent.glob("..old-*")) and not list(work.glob(".*old-*"))


def test_signal_just_after_commit_says_the_output_is_complete(work, capsys, monkeypatch):
    import mom_cli.cli.app as app

    def late_signal(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "emit", late_signal)
    code, out, err = cli(capsys, "decompose", "gpt2", "-o", "out")
    assert code == 130 and "was written complete" in err, err
    assert (work / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- 5, 6. resume


def _train(ckpt: Path, out: Path, **kw):
    from mom_cli.training.train import TrainOptions, train

    base = dict(data="text.txt", steps=3, batch_size=2, seq_len=32, eval_tokens=64, save_every=1, seed=0)
    return train(ckpt, out, TrainOptions(**{**base, **kw}), force=kw.pop("force", False))


def test_resume_refuses_every_result_changing_option_and_names_the_safe_ones(mom_ckpt, work):
    from dataclasses import fields

    from mom_cli.errors import UsageError
    from mom_cli.training.train import RESUME_SAFE, TrainOptions

    _train(mom_ckpt, work / "t", stop_after=1)
    for change in ({"eval_tokens": 128}, {"batch_size": 1, "grad_accum": 2}, {"lr": 5e-4}, {"seed": 1}):
        with pytest.raises(UsageError, match="the saved run differs"):
            _train(mom_ckpt, work / "t", resume=True, **change)
    # every option is either in the fingerprint or named as safe to change
    assert set(RESUME_SAFE) <= {f.name for f in fields(TrainOptions)}
    # a partial metrics line (a kill mid-write) is dropped on resume, and a safe option may change
    metrics = work / "t.train-state" / "train_metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 2, "lo')
    result = _train(mom_ckpt, work / "t", resume=True, eval_every=1)
    assert result.steps == 3
    lines = (work / "t" / "train_metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(ln), dict) for ln in lines)


@pytest.mark.parametrize("state", ["pickle", "structure"])
def test_bad_training_state_is_one_line(mom_ckpt, work, capsys, state):
    (work / "t.train-state").mkdir()
    path = work / "t.train-state" / "state.pt"
    if state == "pickle":

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {work / 'RAN'}",))

        torch.save({"x": Evil()}, path)
    else:
        torch.save({"a": 1}, path)
    code, out, err = cli(capsys, "train-routers", "m", "-o", "t", "--resume", *TRAIN)
    one_line(err, 1, code, "training state")
    assert not (work / "RAN").exists()


# ----------------------------------------------------------------------------- 7, 9. recipes


def test_recipe_aliases_tags_and_outside_outputs_are_refused(work, capsys):
    bomb = (
        "vars:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "  c: [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nsteps:\n  - command: decompose\n    source: ${c}\n"
    )
    (work / "bomb.yaml").write_text(bomb)
    code, out, err = cli(capsys, "run", "bomb.yaml")
    one_line(err, 2, code, "anchors and aliases")
    (work / "tag.yaml").write_text(
        "vars:\n  x: !!python/object/apply:os.system ['touch RAN']\nsteps:\n  - command: decompose\n"
    )
    code, out, err = cli(capsys, "run", "tag.yaml")
    one_line(err, 2, code, r"tag\.yaml:2")
    assert not (work / "RAN").exists()
    (work / "long.yaml").write_text("steps:\n  - command: decompose\n    source: gpt2\n    " + "k" * 100000 + ": 1\n")
    code, out, err = cli(capsys, "run", "long.yaml")
    one_line(err, 2, code, ".")
    (work / "keep").mkdir()
    (work / "away.yaml").write_text(f"output: {work / 'keep'}\nsteps:\n  - command: decompose\n    source: gpt2\n")
    code, out, err = cli(capsys, "run", "away.yaml", "--force")
    one_line(err, 2, code, "leaves the current folder")
    assert (work / "keep").is_dir()


def test_recipe_with_flat_export_keeps_an_existing_recipe_file(work, capsys):
    (work / "flat.yaml").write_text(
        "steps:\n  - command: decompose\n    source: gpt2\n  - command: export\n    format: safetensors\n"
    )
    (work / "r.safetensors.mom_recipe.yaml").write_text("mine")
    code, out, err = cli(capsys, "run", "flat.yaml", "-o", "r.safetensors")
    one_line(err, 2, code, "mom_recipe.yaml already exists")
    assert (work / "r.safetensors.mom_recipe.yaml").read_text() == "mine" and not (work / "r.safetensors").exists()
    assert cli(capsys, "run", "flat.yaml", "-o", "r.safetensors", "--force")[0] == 0
    assert "decompose" in (work / "r.safetensors.mom_recipe.yaml").read_text()


# ----------------------------------------------------------------------------- 8, 10, 12. garbage in


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_temperature_must_be_finite_and_positive(work, capsys, value):
    code, out, err = cli(capsys, "decompose", "gpt2", "-o", "o", "--temperature", value)
    one_line(err, 2, code, "--temperature must be a finite number")


def test_json_never_holds_nan():
    from mom_cli.cli.app import _json

    text = _json({"perplexity": float("nan"), "x": [float("inf"), 1.5]})
    assert json.loads(text) == {"perplexity": None, "x": [None, 1.5]}


def test_a_header_that_lies_about_the_dtype_is_refused(work, capsys):
    def edit(h):
        h["transformer.h.0.attn.c_attn.weight"]["dtype"] = "I32"
        h["transformer.wte.weight"]["dtype"] = "I32"

    patch_header(work / "gpt2" / "model.safetensors", edit)
    code, out, err = cli(capsys, "decompose", "gpt2", "-o", "o")
    one_line(err, 1, code, "int32, not a floating type|stored as int32")
    assert not (work / "o").exists()


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("n_embd", 1e9, "n_embd.*expected int|n_embd must be a whole number"),
        ("n_embd", 1024, r"has shape \[320, 64\], but the source config implies \[320, 1024\]"),
        ("n_embd", -64, "(n_embd|hidden_size) must be a positive size"),
        ("n_embd", "abc", "n_embd"),
        ("n_layer", [1], "n_layer.*expected int|n_layer must be a whole number"),
    ],
)
def test_config_sizes_are_checked_before_anything_is_allocated(work, capsys, field, value, pattern):
    cfg = json.loads((work / "gpt2" / "config.json").read_text())
    cfg[field] = value
    (work / "gpt2" / "config.json").write_text(json.dumps(cfg))
    for argv in (["decompose", "gpt2", "-o", "o"], ["eval", "gpt2", "--data", "text.txt", "--seq-len", "32"]):
        code, out, err = cli(capsys, *argv)
        one_line(err, 1, code, pattern if argv[0] == "decompose" or "shape" not in pattern else ".")


def test_negative_or_zero_sizes_are_refused_in_one_line(work, capsys, mom_ckpt):
    for argv, pattern in (
        (["decompose", "gpt2", "-o", "o", "--router-hidden", "-5"], "--router-hidden must be"),
        (["decompose", "gpt2", "-o", "o", "--depth", "0"], "--depth must be >= 1"),
        (["decompose", "gpt2", "-o", "o", "--pool-size", "0"], "--pool-size must be >= 1"),
        (["train-routers", "m", "-o", "o", "--data", "text.txt", "--steps", "-2"], "--steps is too small"),
    ):
        code, out, err = cli(capsys, *argv)
        one_line(err, 2, code, re.escape(pattern))
    cfg = json.loads((mom_ckpt / "config.json").read_text())
    cfg["blocks"][0]["steps"] = -2
    (mom_ckpt / "config.json").write_text(json.dumps(cfg))
    code, out, err = cli(capsys, "info", "m")
    one_line(err, 1, code, ".")


def test_top_k_is_checked_before_any_tensor_is_read(work, capsys, monkeypatch):
    from mom_cli.io import tensorio

    def never(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(tensorio.SafetensorsReader, "__init__", never)
    code, out, err = cli(capsys, "decompose", "gpt2", "-o", "o", "--top-k", "40")
    one_line(err, 2, code, "--top-k must be between 1 and 5")


def test_messages_name_the_right_help_and_meaning(work, capsys, mom_ckpt):
    code, out, err = cli(capsys, "plot", "routing", "m", "--data", "text.txt")
    one_line(err, 2, code, r"see mom plot routing --help")
    code, out, err = cli(capsys, "eval", "m", "--data", "text.txt", "--seq-len", "32", "--max-tokens", "10")
    one_line(err, 2, code, r"--max-tokens 10 caps the tokens evaluated below one sequence of --seq-len 32")


def test_a_piped_decompose_says_where_its_checkpoint_stays(work):
    mom = " ".join(MOM)
    res = subprocess.run(
        ["bash", "-c", f"{mom} decompose gpt2 | {mom} export - -o plain"],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert f"the checkpoint is at {work / 'gpt2-mom'}" in " ".join(res.stderr.split())


def test_corrupt_token_cache_names_the_cache(mom_ckpt, work, capsys):
    assert cli(capsys, "train-routers", "m", "-o", "t", *TRAIN)[0] == 0
    (cache,) = (work / ".mom-tokens").glob("*.tokens")
    for damage in (b"\x01\x02\x03", struct.pack("<i", 10**6) * 400):
        cache.write_bytes(damage)
        code, out, err = cli(capsys, "train-routers", "m", "-o", "t2", *TRAIN)
        one_line(err, 1, code, r"\.mom-tokens")


# ----------------------------------------------------------------------------- 11. smaller


def test_shard_index_outside_the_checkpoint_is_refused(mom_ckpt, work, capsys):
    from safetensors import safe_open

    with safe_open(str(mom_ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (work / "outside.safetensors").write_bytes((mom_ckpt / "model.safetensors").read_bytes())
    (mom_ckpt / "model.safetensors").unlink()
    for target in ("../outside.safetensors", str(work / "outside.safetensors")):
        index = {"metadata": {}, "weight_map": {k: target for k in keys}}
        (mom_ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        code, out, err = cli(capsys, "info", "m")
        one_line(err, 1, code, "is not a file name inside")


def test_tokenizer_symlink_is_not_copied(work, capsys):
    (work / "secret").write_text("do not copy me")
    (work / "gpt2" / "vocab.txt").symlink_to(work / "secret")
    code, out, err = cli(capsys, "decompose", "gpt2", "-o", "o")
    one_line(err, 2, code, "symbolic link")
    assert not (work / "o").exists()


def test_old_format_pickle_loads_with_allow_pickle(work, capsys):
    from safetensors.torch import load_file

    tensors = load_file(work / "gpt2" / "model.safetensors")
    (work / "gpt2" / "model.safetensors").unlink()
    torch.save(tensors, work / "gpt2" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    code, out, err = cli(capsys, "decompose", "gpt2", "-o", "o")
    one_line(err, 2, code, "--allow-pickle")
    code, out, err = cli(capsys, "decompose", "gpt2", "-o", "o", "--allow-pickle")
    assert code == 0, err
