"""The command-line contract, through real `python -m mom_cli` subprocesses.

- stdout carries only the result (one path, or one JSON object); logs and errors go to stderr;
- a failure is one line `mom: error: ...`, exit 2 for usage, 1 for failures, no traceback
  unless --debug;
- a failed or interrupted command leaves nothing where its output would have been.

Each test runs its own `mom` subprocesses; the inputs (and the decompose | export pipe that
several tests read) are module fixtures. Each `mom` process spends seconds importing torch and
transformers: CI runs the suite on two workers (pytest-xdist).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MOM = [sys.executable, "-m", "mom_cli"]
SHELL_MOM = " ".join(shlex.quote(a) for a in MOM)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
EVAL = ["--data", "text.txt", "--seq-len", "32", "--max-tokens", "2048", "--json"]


@dataclass
class Run:
    rc: int
    out: str
    err: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:  # shown by failing asserts
        return f"rc={self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err[-3000:]}"


def mom(*args: str, cwd: Path, stdin: str | None = None) -> Run:
    res = subprocess.run(
        [*MOM, *args],
        cwd=cwd,
        env=ENV,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return Run(res.returncode, res.stdout, res.stderr)


def bash(script: str, cwd: Path) -> Run:
    res = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=2 * TIMEOUT,
    )
    return Run(res.returncode, res.stdout, res.stderr)


def entries(folder: Path) -> list[str]:
    """Everything in an output's parent folder, hidden temporaries (`.NAME.tmp-*`) included."""
    return sorted(p.name for p in folder.iterdir())


def assert_one_line_error(run: Run, code: int, pattern: str) -> None:
    lines = run.err.splitlines()
    assert run.rc == code, run
    assert len(lines) == 1 and lines[0].startswith("mom: error: "), run
    assert re.search(pattern, lines[0]), run
    assert "Traceback" not in run.err and run.out == "", run


# ---------------------------------------------------------------------------------------------
# Inputs: copies of the fixture models plus broken variants, all in one folder per module.


def _split_shards(src: Path, dst: Path) -> Path:
    """`src` as two shards with an index: the embeddings in the first, every layer in the second."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    first = {k: v for k, v in tensors.items() if ".wte." in k or ".wpe." in k}
    assert first and len(first) < len(tensors)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(first, dst / names[0], metadata={"format": "pt"})
    save_file({k: v for k, v in tensors.items() if k not in first}, dst / names[1], metadata={"format": "pt"})
    weight_map = {k: names[0] if k in first else names[1] for k in tensors}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst / names[1]


def make_base_inputs(root: Path, models: Path) -> None:
    shutil.copytree(models / "gpt2", root / "gpt2")
    (root / "text.txt").write_text((models / "text.txt").read_text())


def make_broken_inputs(root: Path, models: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    (root / "short.txt").write_text("Too short for one sequence.")
    (root / "noconf").mkdir()
    (root / "noconf" / "notes.txt").write_text("not a model")
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    BertModel(cfg).save_pretrained(root / "bert")
    shutil.copytree(models / "gpt2", root / "corrupt")
    (root / "corrupt" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 4,')  # cut short
    shutil.copytree(models / "gpt2", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    shutil.copytree(models / "gpt2", root / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(models / "gpt2" / "model.safetensors"), root / "pickled" / "pytorch_model.bin")
    # Sources that fail or block only once writing has begun: the layers' shard is bad.
    shard = _split_shards(models / "gpt2", root / "bad-shard")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for sig in ("SIGINT", "SIGTERM") if hasattr(os, "mkfifo") else ():
        shard = _split_shards(models / "gpt2", root / f"fifo-{sig}")
        shard.unlink()
        os.mkfifo(shard)  # opening it to read blocks until someone opens it to write


# ---------------------------------------------------------------------------------------------
# Bad inputs: each one line on stderr, the right exit code, nothing left at the output.


@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]  # `OUT` stands for this case's output path
    code: int
    pattern: str  # what the one error line must say
    stdin: str | None = None


BAD = {
    "missing-source": Bad(("decompose", "./no-such-model", "-o", "OUT"), 2, r"no-such-model does not exist"),
    "no-config": Bad(("decompose", "noconf", "-o", "OUT"), 2, r"has no config\.json"),
    "unsupported-family": Bad(("decompose", "bert", "-o", "OUT"), 2, r"unsupported model family 'bert'.*gpt2.*llama"),
    "corrupt-config": Bad(("decompose", "corrupt", "-o", "OUT"), 1, r"corrupt .*config\.json"),
    "truncated-weights": Bad(("decompose", "truncated", "-o", "OUT"), 1, r"model\.safetensors.*truncated or corrupt"),
    "pool-size-not-divisor": Bad(
        ("decompose", "gpt2", "--pool-size", "3", "-o", "OUT"), 2, r"impossible plan.*--pool-size 3"
    ),
    "top-k-too-large": Bad(("decompose", "gpt2", "--top-k", "99", "-o", "OUT"), 2, r"impossible plan.*--top-k"),
    "no-layers-left": Bad(("decompose", "gpt2", "--bottom", "4", "-o", "OUT"), 2, r"impossible plan.*--bottom 4"),
    "existing-output": Bad(("decompose", "gpt2", "-o", "OUT"), 2, r"already exists.*--force"),
    "unwritable-parent": Bad(("decompose", "gpt2", "-o", "OUT"), 1, r"permission denied"),
    "pickle-refused": Bad(("decompose", "pickled", "-o", "OUT"), 2, r"pickled weights.*--allow-pickle"),
    "empty-stdin": Bad(("export", "-", "-o", "OUT"), 2, r"expected a checkpoint path on stdin", stdin=""),
    "unknown-option": Bad(
        ("decompose", "gpt2", "--no-such-option", "-o", "OUT"), 2, r"No such option: --no-such-option"
    ),
    "eval-data-too-short": Bad(
        ("eval", "gpt2", "--data", "short.txt", "--seq-len", "32"), 2, r"fewer than one sequence"
    ),
    "eval-seq-len-too-long": Bad(
        ("eval", "gpt2", "--data", "text.txt", "--seq-len", "512"), 2, r"longer than the model's 256 positions"
    ),
}


# ---------------------------------------------------------------------------------------------
# Fixtures: the inputs, and the one pipe several tests read.


@pytest.fixture(scope="module")
def root(models_dir, tmp_path_factory) -> Path:
    """A folder with the fixture GPT-2, its text, and the broken inputs of BAD."""
    root = tmp_path_factory.mktemp("cli")
    make_base_inputs(root, models_dir)
    make_broken_inputs(root, models_dir)
    return root


@pytest.fixture(scope="module")
def pipe(root) -> Run:
    """decompose | export as a shell pipeline; decompose's stdout is kept with tee."""
    work = root / "pipe"
    work.mkdir()
    shutil.copytree(root / "gpt2", work / "gpt2")
    script = (
        f"{SHELL_MOM} decompose gpt2 -q 2>decompose.err | tee decompose.out | {SHELL_MOM} export - -o out"
        '; echo "${PIPESTATUS[@]}" > status'
    )
    res = bash(script, work)
    res.extra.update(
        work=work,
        status=(work / "status").read_text().split(),
        decompose_out=(work / "decompose.out").read_text(),
        decompose_err=(work / "decompose.err").read_text(),
    )
    return res


def root_writes_anywhere(root: Path) -> bool:
    """True where a read-only folder is still writable to us (running as root)."""
    probe = root / "probe-ro"
    probe.mkdir()
    os.chmod(probe, 0o500)
    try:
        return os.access(probe, os.W_OK)
    finally:
        os.chmod(probe, 0o700)
        probe.rmdir()


def run_bad(root: Path, name: str) -> Run:
    """BAD[name] with its output in a fresh folder out-NAME (prepared as the case needs)."""
    case = BAD[name]
    parent = root / f"out-{name}"
    parent.mkdir()
    if name == "existing-output":
        (parent / "result").mkdir()
        (parent / "result" / "keep.txt").write_text("mine")
    if name == "unwritable-parent":
        os.chmod(parent, 0o500)
    before = entries(parent)
    try:
        res = mom(*(a.replace("OUT", f"{parent.name}/result") for a in case.args), cwd=root, stdin=case.stdin)
    finally:
        os.chmod(parent, 0o700)
    res.extra.update(parent=parent, before=before)
    return res


def run_signalled(root: Path, sig_name: str) -> Run:
    """decompose blocks on a FIFO shard after its temporary output exists; then it gets a signal."""
    parent = root / f"out-{sig_name}"
    parent.mkdir()
    fifo = root / f"fifo-{sig_name}" / "model-00002-of-00002.safetensors"
    # As from a terminal: a shell that starts a job in the background (`cmd &`, as some CI
    # runners do) makes it ignore SIGINT, and the child would inherit that.
    proc = subprocess.Popen(
        [*MOM, "decompose", fifo.parent.name, "-o", f"{parent.name}/result"],
        cwd=root,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + TIMEOUT
    seen: list[str] = []
    try:
        while not seen and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = [n for n in entries(parent) if n.startswith(".result.tmp-")]
        if seen:
            time.sleep(0.3)  # it is blocked on the FIFO: it cannot finish before the signal
            proc.send_signal(getattr(signal, sig_name))
        while proc.poll() is None and time.monotonic() < deadline:
            try:  # let a blocked open() of the FIFO return, so Python can act on the signal
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    return Run(proc.returncode, out, err, {"parent": parent, "tmp_seen": seen})


# ---------------------------------------------------------------------------------------------
# The tests.


def test_pipe_stdout_is_one_path_and_logs_go_to_stderr(pipe):
    res = pipe
    work = res.extra["work"]
    assert res.extra["status"] == ["0", "0", "0"], res
    printed = res.extra["decompose_out"]
    assert printed.endswith("\n") and len(printed.splitlines()) == 1, printed
    ckpt = work / printed.strip()
    assert ckpt.resolve() == (work / "gpt2-mom").resolve()  # the default output, beside the source
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "mom"
    assert res.extra["decompose_err"] == ""  # -q: nothing for people, and the result is on stdout
    assert res.out == "out\n", res  # export's stdout is its output path only ...
    assert "export" in res.err and "Traceback" not in res.err  # ... its log went to stderr
    assert sorted(entries(work)) == sorted(["decompose.err", "decompose.out", "gpt2", "gpt2-mom", "out", "status"])


def test_piped_export_is_standard_format_with_same_logits(pipe):
    import torch
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    res = pipe
    out = res.extra["work"] / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and "auto_map" not in cfg
    exported = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    source = AutoModelForCausalLM.from_pretrained(res.extra["work"] / "gpt2").eval()
    assert type(exported) is GPT2LMHeadModel
    x = torch.randint(0, source.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (exported(x).logits - source(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_failing_step_fails_the_pipe_and_writes_nothing(root):
    work = root / "failing-pipe"
    work.mkdir()
    res = bash(
        f'{SHELL_MOM} decompose does-not-exist-dir/ | {SHELL_MOM} export - -o out; echo "${{PIPESTATUS[@]}}" >&2', work
    )
    *errors, status = res.err.splitlines()
    assert status == "2 2", res  # decompose: usage error; export: nothing on stdin
    assert res.out == "" and "Traceback" not in res.err, res
    assert len(errors) == 2 and all(line.startswith("mom: error: ") for line in errors), res
    assert any(re.search(r"does-not-exist-dir/? does not exist", line) for line in errors), res  # decompose's own
    assert any("expected a checkpoint path on stdin" in line for line in errors), res
    assert entries(work) == []  # no out, no .out.tmp-*


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_with_right_code_and_leaves_nothing(root, case):
    if case == "unwritable-parent" and root_writes_anywhere(root):
        pytest.skip("a 0o500 folder is still writable here (running as root)")
    res = run_bad(root, case)
    assert_one_line_error(res, BAD[case].code, BAD[case].pattern)
    parent = res.extra["parent"]
    assert entries(parent) == res.extra["before"]  # no partial output, no hidden temporary
    if case == "existing-output":
        assert entries(parent / "result") == ["keep.txt"] and (parent / "result" / "keep.txt").read_text() == "mine"


def test_force_replaces_output_and_json_is_one_object(root):
    parent = root / "out-force"
    (parent / "result").mkdir(parents=True)
    (parent / "result" / "old.txt").write_text("replace me")
    res = mom("decompose", "gpt2", "-o", "out-force/result", "--force", "--json", cwd=root)
    assert res.rc == 0 and "mom: error" not in res.err, res
    lines = res.out.splitlines()
    assert len(lines) == 1, res
    result = json.loads(lines[0])
    assert isinstance(result, dict) and result["path"] == "out-force/result"
    assert entries(parent) == ["result"]  # the old output is gone, no .result.old-* or .tmp-* left
    assert not (parent / "result" / "old.txt").exists()
    assert json.loads((parent / "result" / "config.json").read_text())["model_type"] == "mom"


def test_outputs_get_the_permissions_of_a_plain_mkdir_or_open(tmp_path):
    """Temporary outputs are private while written; the finished output is not (umask applies)."""
    import stat

    from mom_cli.io.atomic import atomic_dir, atomic_file

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "ckpt", force=False) as d:
            (d / "config.json").write_text("{}")
        with atomic_file(tmp_path / "picture.png", force=False) as f:
            f.write_bytes(b"png")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "picture.png").stat().st_mode) == 0o644


def test_pickle_accepted_with_allow_pickle(root):
    from safetensors.torch import load_file

    (root / "out-pickle").mkdir()
    res = mom("decompose", "pickled", "--allow-pickle", "-q", "-o", "out-pickle/result", cwd=root)
    assert res.rc == 0 and res.out == "out-pickle/result\n" and res.err == "", res
    ckpt = root / "out-pickle" / "result"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "mom" and not list(ckpt.glob("*.bin"))
    embed = load_file(ckpt / "model.safetensors")["model.embed_tokens.weight"]
    assert embed.equal(load_file(root / "gpt2" / "model.safetensors")["transformer.wte.weight"])


def test_eval_json_and_same_perplexity_as_source(root, pipe):
    results = []
    for model in ("gpt2", "pipe/gpt2-mom"):
        res = mom("eval", model, *EVAL, cwd=root)
        assert res.rc == 0 and len(res.out.splitlines()) == 1 and "mom: error" not in res.err, res
        result = json.loads(res.out)
        assert 0 < result["tokens"] <= 2048 and result["tokens_per_second"] > 0, result
        assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1, result
        results.append(result)
    source, mom_ckpt = results
    assert mom_ckpt["tokens"] == source["tokens"]
    assert abs(mom_ckpt["perplexity"] - source["perplexity"]) / source["perplexity"] < 1e-4


def test_info_counts_source_plus_routers_and_lists_provenance(root, pipe):
    from transformers import AutoModelForCausalLM

    import mom_cli

    res = mom("info", "pipe/gpt2-mom", "--json", cwd=root)
    assert res.rc == 0 and len(res.out.splitlines()) == 1, res
    info = json.loads(res.out)
    source = AutoModelForCausalLM.from_pretrained(root / "gpt2")
    ckpt = mom_cli.load(root / "pipe" / "gpt2-mom")
    routers = sum(p.numel() for n, p in ckpt.named_parameters() if "_router." in n)
    assert routers > 0
    assert info["params_total"] == sum(p.numel() for p in source.parameters()) + routers
    (record,) = info["provenance"]
    assert record["command"] == "decompose" and record["source"] == "gpt2" and record["args"]["top_k"] == 1


def test_failure_while_writing_leaves_nothing_and_debug_shows_where(root):
    """The layers' shard is truncated: decompose fails while writing (--debug shows where)."""
    (root / "out-midway").mkdir()
    res = mom("--debug", "decompose", "bad-shard", "-o", "out-midway/result", cwd=root)
    assert res.rc == 1 and res.out == "", res
    assert "Traceback" in res.err, res  # --debug
    assert re.search(r'tensorio\.py", line \d+, in \w*write', res.err), res  # it failed while writing tensors
    last = res.err.splitlines()[-1]
    assert last.startswith("mom: error: ") and "model-00002-of-00002.safetensors" in last, res
    assert entries(root / "out-midway") == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO to hold decompose mid-write")
@pytest.mark.parametrize("sig_name", ["SIGINT", "SIGTERM"])
def test_signal_while_writing_leaves_nothing(root, sig_name):
    # SIGKILL cannot be caught: a killed process leaves its hidden .NAME.tmp-* folder (never the output).
    res = run_signalled(root, sig_name)
    assert res.extra["tmp_seen"], res  # the output was being written when the signal came
    assert entries(res.extra["parent"]) == [], res
    assert res.rc == 128 + getattr(signal, sig_name), res  # not 0: a script must not go on
    assert res.out == "" and "Traceback" not in res.err, res
    assert res.err.splitlines()[-1] == "mom: interrupted; no output was written", res


def test_each_options_field_is_a_command_line_parameter_of_the_same_name():
    """The commands build their library options from their parameters by name (`options_from_context`):
    a field without a parameter of its name would silently keep its default. These are the exceptions:
    values the command derives (`skip` from --no-skip) and library-only fields."""
    import dataclasses

    import typer

    from mom_cli.cli.app import app
    from mom_cli.surgery.convert_peer import ConvertOptions
    from mom_cli.surgery.decompose import PlanOptions
    from mom_cli.surgery.prune import PruneOptions
    from mom_cli.training.train import TrainOptions

    group = typer.main.get_command(app)
    derived_or_library_only = {
        "decompose": (PlanOptions, {"skip"}),
        "prune": (PruneOptions, {"eval_tokens"}),
        "convert-peer": (ConvertOptions, {"query_bn", "shared_keys", "eval_tokens", "seed"}),
        "train-routers": (TrainOptions, {"compile", "max_grad_norm", "stop_after"}),
    }
    for command, (cls, others) in derived_or_library_only.items():
        params = {p.name for p in group.commands[command].params}
        assert {f.name for f in dataclasses.fields(cls)} - params == others, command
