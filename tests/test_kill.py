"""SIGKILL at random moments: the target is always the complete old output or the complete new one,
and the next run on that path removes what the killed ones left.

Each writing command replaces (--force) an old output made with other options, in a forked copy of
this process (imports already done: a run takes a fraction of a second) that is killed after a
random delay spread over the run's length; 20 kills per command.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from mom_cli.cli.app import main

KILLS = 20
SKIP = {
    "README.md",
    "train_metrics.jsonl",
    "heal_metrics.jsonl",
}  # carry the time of the run: not part of "the same output"
TRAIN = ["--data", "text.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64"]
COMMANDS = {  # name: (target, argv of the old output, argv of the new one)
    "decompose": ("d", ["decompose", "gpt2", "-o", "d"], ["decompose", "gpt2", "-o", "d", "--top-k", "2", "--force"]),
    "export-hf": ("e", ["export", "m", "-o", "e", "--format", "safetensors"], ["export", "m", "-o", "e", "--force"]),
    "export-file": (
        "f.safetensors",
        ["decompose", "gpt2", "-o", "f.safetensors"],
        ["export", "m", "-o", "f.safetensors", "--format", "safetensors", "--force"],
    ),
    "prune": (
        "p",
        ["decompose", "gpt2", "-o", "p"],
        ["prune", "m", "-o", "p", "--data", "text.txt", "--calib-tokens", "128", "--seq-len", "32", "--force"],
    ),
    "convert-peer": (
        "c",
        ["decompose", "gpt2", "-o", "c"],
        ["convert-peer", "m", "-o", "c", "--layers", "1", "--heads", "2", "--topk", "4", "--key-dim", "8", "--force"],
    ),
    "train-routers": ("t", ["decompose", "gpt2", "-o", "t"], ["train-routers", "m", "-o", "t", *TRAIN, "--force"]),
    "heal": (
        "h",
        ["decompose", "gpt2", "-o", "h"],
        ["heal", "pr", "-o", "h", "--data", "text.txt", "--seq-len", "32", "--budget", "512", "--force"],
    ),
}


def signature(path: Path, exact: bool) -> dict[str, str] | None:
    """What identifies an output: every file's bytes (exact), or all but the run's time stamps."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = {}
    for f in files:
        rel = str(f.relative_to(path)) if f != path else f.name
        data = f.read_bytes()
        if not exact and f.name in SKIP:
            continue
        if not exact and f.name == "config.json":
            cfg = json.loads(data)
            cfg.pop("mom_provenance", None)
            data = json.dumps(cfg, sort_keys=True).encode()
        if not exact and f.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(load_file(f).items()))
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def forked(argv: list[str], kill_after: float | None) -> float:
    """Run `mom ARGV` in a forked child; SIGKILL it after `kill_after` seconds. Returns the run time."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: quiet, and never back into pytest
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        code = 1
        try:
            code = main(argv)
        finally:
            os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if kill_after is None:
        assert os.WIFEXITED(status), status
    return time.perf_counter() - start


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_leaves_old_or_new_and_the_next_run_cleans_up(models_dir, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models_dir / "gpt2", tmp_path / "gpt2")
    shutil.copy(models_dir / "text.txt", tmp_path / "text.txt")
    target, old_argv, new_argv = COMMANDS[command]
    path = tmp_path / target
    assert main(["decompose", "gpt2", "-o", "m"]) == 0
    if command == "heal":  # a surgery for heal to make up for
        assert main(["prune", "m", "-o", "pr", "--data", "text.txt", "--calib-tokens", "128", "--seq-len", "32"]) == 0
    forked(old_argv, None)
    keep = tmp_path / "keep"
    keep.mkdir()
    shutil.copytree(path, keep / target) if path.is_dir() else shutil.copy(path, keep / target)
    old = signature(path, exact=True)
    assert old
    forked(new_argv, None)  # warms the token cache
    # the shortest of two more runs: a slow outlier (the other test worker busy) would put every kill
    # before the writing starts
    length = min(forked(new_argv, None) for _ in range(2))
    new = signature(path, exact=False)
    assert new and new != signature(keep / target, exact=False)
    rng = random.Random(command)
    seen_leftovers = replaced = 0

    def kill_at(moment: float, i: int) -> None:
        nonlocal seen_leftovers, replaced
        if signature(path, exact=True) != old:  # start each kill from the old output
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            shutil.copytree(keep / target, path) if (keep / target).is_dir() else shutil.copy(keep / target, path)
        forked(new_argv, length * moment)
        seen_leftovers += bool([n for n in leftovers(tmp_path, target) if not n.endswith(".lock")])
        got_exact, got = signature(path, exact=True), signature(path, exact=False)
        assert got_exact == old or got == new, f"kill {i}: the target is neither the old output nor the new one"
        replaced += got_exact != old

    for i in range(KILLS):
        # kill moments: half spread over the whole run, half from 0.7 to 1.2 of it, where it writes
        kill_at((i + rng.random()) / KILLS if i % 2 else 0.7 + 0.5 * (i + rng.random()) / KILLS, i)
    extra = 0
    while seen_leftovers + replaced == 0 and extra < 10:
        # a busy machine (the other test worker) slowed every killed run past its kill: kill later,
        # until a kill lands during or after the writing, which the test is there to check
        extra += 1
        kill_at(1.2 * 1.3**extra, KILLS + extra)
    print(f"{command}: {replaced} of {KILLS + extra} kills after the replacement, {seen_leftovers} left temporaries")
    # kills landed before, during and after the writing
    assert seen_leftovers + replaced > 0 and replaced < KILLS + extra
    forked(new_argv, None)  # the next run: completes and removes what the killed ones left
    assert signature(path, exact=False) == new
    assert leftovers(tmp_path, target) == [], leftovers(tmp_path, target)
