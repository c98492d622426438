"""Recipes and `mom run`: validation up front (file:line errors), every shipped recipe valid, and
end to end through real subprocesses: the issue's pipe and the same recipe give identical
checkpoints; a rerun reuses finished steps; a failing step stops the run (and a pipe) with its own
message and leaves no output. Also the fast command-line start that shell completion needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer
from test_cli import ENV, SHELL_MOM, assert_one_line_error, bash, entries, mom

from mom_cli.cli import recipes
from mom_cli.cli.app import app
from mom_cli.errors import UsageError

# ---------------------------------------------------------------------------------------------
# Validation, in-process (no model is loaded).

SPECS = recipes.command_specs(typer.main.get_command(app))

GOOD = """\
# A test recipe.
vars:
  source: gpt2
  data: text.txt
  depth: 2
steps:
  - command: decompose
    source: ${source}
    depth: ${depth}
    top_k: 2
  - command: prune
    keep-ffn: true
    data: ${data}
    seq-len: 32
  - command: eval
    data: ${data}
  - command: export
"""

# name -> (line to replace, replacement or None to delete, expected line, pattern)
BAD = {
    "unknown-option": ("    top_k: 2", "    top_kk: 2", 10, r"unknown option 'top-kk' for mom decompose"),
    "wrong-type": ("    top_k: 2", "    top_k: two", 10, r"option 'top-k' must be an integer, got 'two'"),
    "bool-for-int": ("    top_k: 2", "    top_k: true", 10, r"option 'top-k' must be an integer"),
    "missing-required": (
        "    data: ${data}\n    seq-len: 32",
        "    seq-len: 32",
        11,
        r"missing required option `data`",
    ),
    "unknown-command": ("  - command: eval", "  - command: evaluate", 15, r"unknown command 'evaluate'"),
    "unknown-variable": ("    depth: ${depth}", "    depth: ${deep}", 9, r"unknown variable \$\{deep\}"),
    "runner-key": ("    top_k: 2", "    output: here", 10, r"`output` is set by `mom run`"),
    "input-of-later-step": ("    keep-ffn: true", "    checkpoint: elsewhere", 12, r"previous step's output"),
    "no-input-first": ("    source: ${source}\n", "", 7, r"first step needs its input: add `source"),
    "unknown-top-key": ("steps:", "stepz:", 6, r"unknown recipe key 'stepz'"),
    "bad-yaml": ("    top_k: 2", "    top_k: [2", 11, r"not valid YAML"),
}


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_is_refused_naming_file_and_line(tmp_path, case):
    old, new, line, pattern = BAD[case]
    assert GOOD.count(old) == 1
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(UsageError) as e:
        recipes.resolve(recipes.load(str(path)), {}, SPECS)
    assert str(e.value).startswith(f"{path}:{line}:"), e.value
    assert re.search(pattern, str(e.value)), e.value


def test_good_recipe_resolves_with_variables_sets_and_both_spellings(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = recipes.load(str(path))
    assert recipe.description == "A test recipe." and [s.id for s in recipe.steps] == [
        "decompose",
        "prune",
        "eval",
        "export",
    ]
    steps = recipes.resolve(recipe, recipes.parse_sets(["depth=3", "prune.keep_mha=75%", "2.seq-len=64"]), SPECS)
    dec, prune = steps[0], steps[1]
    assert dec.options == {"source": "gpt2", "depth": 3, "top-k": 2}  # --set keeps the YAML type
    assert prune.options == {"keep-ffn": "all", "data": "text.txt", "seq-len": 64, "keep-mha": "75%"}
    argv = recipes.argv_for(prune, "IN", Path("OUT"))
    assert argv == [
        "prune",
        "IN",
        "--keep-ffn",
        "all",
        "--data",
        "text.txt",
        "--seq-len",
        "64",
        "--keep-mha",
        "75%",
        "-o",
        "OUT",
        "--json",
    ]
    assert [s.spec.kind for s in steps] == ["checkpoint", "checkpoint", "report", "checkpoint"]
    with pytest.raises(UsageError, match="has no variable 'nope'"):
        recipes.resolve(recipes.load(str(path)), recipes.parse_sets(["nope=1"]), SPECS)
    with pytest.raises(UsageError, match="no step 'train'"):
        recipes.resolve(recipes.load(str(path)), recipes.parse_sets(["train.steps=1"]), SPECS)


def test_step_keys_follow_options_and_inputs(tmp_path):
    (tmp_path / "text.txt").write_text("some text")
    path = write(tmp_path, GOOD.replace("${data}", str(tmp_path / "text.txt")))
    steps = recipes.resolve(recipes.load(str(path)), {}, SPECS)
    k1 = recipes.step_key(steps[0], "")
    assert k1 == recipes.step_key(recipes.resolve(recipes.load(str(path)), {}, SPECS)[0], "")
    assert k1 != recipes.step_key(recipes.resolve(recipes.load(str(path)), {"depth": 4}, SPECS)[0], "")
    k2 = recipes.step_key(steps[1], k1)
    assert k2 != recipes.step_key(steps[1], "other-input")
    os.utime(tmp_path / "text.txt", ns=(1, 1))  # the data changed: prune must run again
    assert k2 != recipes.step_key(steps[1], k1)


def test_every_shipped_recipe_is_valid_and_says_what_it_costs():
    found = recipes.shipped()
    assert {
        "decompose-exact",
        "compressed-depth",
        "peer-middle",
        "prune-attention",
        "full-chain",
        "smollm2-first",
    } <= set(found)
    assert any(n.startswith("compressed-gpt2-") for n in found)
    specs = SPECS
    for name, path in found.items():
        recipe = recipes.load(name)
        needed = [k for k, v in recipe.vars.items() if v is None]
        steps = recipes.resolve(recipe, {k: "text.txt" for k in needed}, specs)
        assert steps and recipe.description, name
        assert re.search(r"^# .*\bcost", path.read_text(), re.I | re.M), f"{name}: say what it costs in a comment"


# ---------------------------------------------------------------------------------------------
# End to end, through real subprocesses.

STEPS_FLAGS = "--steps 2 --batch-size 2 --seq-len 32 --eval-tokens 256"
PRUNE_FLAGS = "--calib-tokens 256 --seq-len 32"
PIPE = (
    f"{SHELL_MOM} decompose gpt2 | {SHELL_MOM} convert-peer - --layers middle"
    f" | {SHELL_MOM} train-routers - --data text.txt {STEPS_FLAGS}"
    f" | {SHELL_MOM} prune - --keep-ffn --data text.txt {PRUNE_FLAGS} | {SHELL_MOM} export - -o out/"
)
CHAIN = """\
# The issue's pipe as a recipe, on the tiny fixture; cost: seconds.
vars:
  data: text.txt
steps:
  - command: decompose
    source: gpt2
  - command: convert-peer
    layers: middle
  - command: train-routers
    data: ${data}
    steps: 2
    batch-size: 2
    seq-len: 32
    eval-tokens: 256
  - command: prune
    keep-ffn: true
    data: ${data}
    calib-tokens: 256
    seq-len: 32
  - command: plot routing
    data: ${data}
    max-tokens: 256
    seq-len: 32
    output: routing.png
  - command: export
"""


@pytest.fixture(scope="module")
def e2e(models_dir, tmp_path_factory):
    """The pipe and the recipe run at the same time, in two folders; then the recipe's rerun and
    a recipe whose second step fails, rerun with the fix."""
    root = tmp_path_factory.mktemp("recipes")
    work = {}
    for name in ("pipe", "recipe", "failing", "failing-pipe"):
        work[name] = root / name
        shutil.copytree(models_dir / "gpt2", work[name] / "gpt2")
        (work[name] / "text.txt").write_text((models_dir / "text.txt").read_text())
    write(work["recipe"], CHAIN, "chain.yaml")
    write(work["failing"], CHAIN.replace("calib-tokens: 256", "calib-tokens: 999999"), "chain.yaml")
    failing_pipe = (
        f"{SHELL_MOM} decompose ./missing-model/ | {SHELL_MOM} convert-peer - --layers middle"
        f' | {SHELL_MOM} export - -o out/; echo "${{PIPESTATUS[@]}}" >&2'
    )
    with ThreadPoolExecutor(2) as pool:
        jobs = {
            "pipe": pool.submit(bash, PIPE + '; echo "${PIPESTATUS[@]}" > status', work["pipe"]),
            "recipe": pool.submit(mom, "run", "chain.yaml", "-o", "out", "--keep-work", "--json", cwd=work["recipe"]),
        }
        res = {k: f.result() for k, f in jobs.items()}
        jobs = {
            "rerun": pool.submit(
                mom, "run", "chain.yaml", "-o", "again", "--work-dir", ".out.mom-work", "--json", cwd=work["recipe"]
            ),
            "failing": pool.submit(mom, "run", "chain.yaml", "-o", "out", cwd=work["failing"]),
        }
        res.update({k: f.result() for k, f in jobs.items()})
        res["failing-out"] = (work["failing"] / "out").exists()
        res["failing-work"] = (
            sorted(p.name for p in (work["failing"] / ".out.mom-work").iterdir())
            if (work["failing"] / ".out.mom-work").exists()
            else []
        )
        jobs = {
            "fixed": pool.submit(
                mom, "run", "chain.yaml", "-o", "out", "--json", "--set", "prune.calib-tokens=256", cwd=work["failing"]
            ),
            "failing-pipe": pool.submit(bash, failing_pipe, work["failing-pipe"]),
        }
        res.update({k: f.result() for k, f in jobs.items()})
    return work, res


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _config(directory: Path) -> dict:
    """config.json without what differs by nature: provenance times and intermediate paths."""
    cfg = json.loads((directory / "config.json").read_text())
    for r in cfg.get("mom_provenance", []):
        r.pop("time", None)
        if r["command"] != "decompose":
            r.pop("source", None)
    return cfg


def test_pipe_and_recipe_give_identical_checkpoints(e2e):
    work, res = e2e
    assert (work["pipe"] / "status").read_text().split() == ["0"] * 5, res["pipe"]
    assert res["recipe"].rc == 0 and len(res["recipe"].out.splitlines()) == 1, res["recipe"]
    result = json.loads(res["recipe"].out)
    assert result["path"] == "out" and [s["cached"] for s in result["steps"]] == [False] * 6
    piped, ran = work["pipe"] / "out", work["recipe"] / "out"
    a, b = _tensors(piped), _tensors(ran)
    assert a and a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]
    assert _config(piped) == _config(ran)
    commands = [r["command"] for r in _config(ran)["mom_provenance"]]
    assert commands == ["decompose", "convert-peer", "train-routers", "prune"]


def test_result_holds_resolved_recipe_picture_and_card(e2e):
    import matplotlib.image as mpimg

    work, res = e2e
    out = work["recipe"] / "out"
    saved = out / recipes.RECIPE_FILE
    again = recipes.load(str(saved))  # the saved recipe is itself runnable
    assert [s.command for s in again.steps] == [
        s.command for s in recipes.load(str(work["recipe"] / "chain.yaml")).steps
    ]
    assert again.steps[2].options["data"] == "text.txt"  # variables applied
    card = (out / "README.md").read_text()
    assert "## Recipe" in card and "![routing.png](routing.png)" in card and "command: train-routers" in card
    assert mpimg.imread(out / "routing.png").shape[0] > 100
    assert (work["recipe"] / ".out.mom-work").is_dir()  # --keep-work


def test_rerun_reuses_every_finished_step(e2e):
    work, res = e2e
    run = res["rerun"]
    assert run.rc == 0, run
    result = json.loads(run.out)
    assert [s["cached"] for s in result["steps"]] == [True] * 6
    assert _tensors(work["recipe"] / "again").keys() == _tensors(work["recipe"] / "out").keys()


def test_failing_step_stops_the_run_with_its_message_and_rerun_continues(e2e):
    work, res = e2e
    run = res["failing"]
    assert run.rc == 2 and run.out == "", run
    last = run.err.splitlines()[-1]
    assert re.match(
        r"mom: error: step 4 \(prune\): calibration data text\.txt has \d+ tokens, fewer than --calib-tokens", last
    ), run
    assert "Traceback" not in run.err
    assert res["failing-out"] is False  # no result after the failure
    kept = res["failing-work"]  # the finished steps stay for the rerun, nothing of the failed one
    assert [n.split("-")[0] for n in kept if not n.endswith(".json")] == ["01", "02", "03"], kept
    fixed = res["fixed"]
    assert fixed.rc == 0, fixed
    assert [s["cached"] for s in json.loads(fixed.out)["steps"]] == [True, True, True, False, False, False]
    assert not (work["failing"] / ".out.mom-work").exists()  # cleaned after success without --keep-work


def test_failing_step_in_a_pipe_stops_it_with_its_own_message(e2e):
    work, res = e2e
    run = res["failing-pipe"]
    *errors, status = run.err.splitlines()
    assert all(code != "0" for code in status.split()) and len(status.split()) == 3, run
    errors = [e for e in errors if e.startswith("mom: error: ")]
    assert len(errors) == 3 and any(re.search(r"missing-model/? does not exist", e) for e in errors), run
    assert sum("expected a checkpoint path on stdin" in e for e in errors) == 2, run
    assert run.out == "" and entries(work["failing-pipe"]) == ["gpt2", "text.txt"]


# ---------------------------------------------------------------------------------------------
# The command line: one-line errors, recipes list/show/cp, fast start and shell completion.


def test_bad_recipe_through_the_cli_is_one_line(tmp_path):
    write(tmp_path, GOOD.replace("    top_k: 2", "    top_k: two"))
    res = mom("run", "r.yaml", "-o", "out", cwd=tmp_path)
    assert_one_line_error(res, 2, r"r\.yaml:10: step 1 \(decompose\): option 'top-k' must be an integer")
    assert entries(tmp_path) == ["r.yaml"]


def test_recipes_list_show_cp(tmp_path):
    listed = mom("recipes", "list", "--json", cwd=tmp_path)
    assert listed.rc == 0 and "full-chain" in json.loads(listed.out), listed
    shown = mom("recipes", "show", "prune-attention", cwd=tmp_path)
    assert shown.out == recipes.find("prune-attention").read_text()
    copied = mom("recipes", "cp", "prune-attention", ".", cwd=tmp_path)
    assert copied.out == "prune-attention.yaml\n" and (tmp_path / "prune-attention.yaml").read_text() == shown.out
    again = mom("recipes", "cp", "prune-attention", ".", cwd=tmp_path)
    assert_one_line_error(again, 2, r"already exists.*--force")


def test_cli_starts_without_torch_and_import_still_registers(tmp_path):
    probe = (
        "import sys, mom_cli, mom_cli.cli.app; assert 'torch' not in sys.modules, 'torch imported';"
        "from transformers import AutoConfig, AutoModelForCausalLM;"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as M;"
        "c = AutoConfig.for_model('mom'); print(type(c).__name__, M[type(c)].__name__)"
    )
    res = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["MomConfig", "MomForCausalLM"], res.stderr


def test_shell_completion_installs_and_completes(tmp_path):
    script = Path(sys.executable).parent / "mom"
    if not script.exists():
        pytest.skip("the `mom` console script is not installed beside this Python")
    env = {
        **ENV,
        "HOME": str(tmp_path),
        "SHELL": "/bin/bash",
        "PATH": f"{script.parent}{os.pathsep}{ENV.get('PATH', '')}",
    }
    # The shell is named rather than detected: detection walks the process tree (shellingham), which
    # finds no shell when the tests run detached; typer's own switch makes the option take a value.
    detect_off = {**env, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    inst = subprocess.run(
        [str(script), "--install-completion", "bash"], env=detect_off, capture_output=True, text=True, timeout=120
    )
    assert inst.returncode == 0, inst.stderr
    complete = textwrap.dedent("""\
        source ~/.bash_completions/mom.sh
        COMP_WORDS=(mom rec); COMP_CWORD=1; _mom_completion mom; echo "${COMPREPLY[@]}"
        COMP_WORDS=(mom run prune-a); COMP_CWORD=2; _mom_completion mom; echo "${COMPREPLY[@]}"
        """)
    res = subprocess.run(["bash", "-c", complete], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.splitlines() == ["recipes", "prune-attention"], (res.stdout, res.stderr)


def test_every_command_help_has_an_example():
    import typer

    from mom_cli.cli.app import app

    def leaves(cmd, path):
        for name, sub in cmd.commands.items():
            yield from leaves(sub, [*path, name]) if hasattr(sub, "commands") else [(" ".join([*path, name]), sub)]

    found = dict(leaves(typer.main.get_command(app), []))
    assert {"run", "recipes list", "recipes show", "recipes cp", "plot routing", "plot prune", "plot training"} <= set(
        found
    )
    missing = [name for name, cmd in found.items() if not re.search(r"^\s*Example: mom ", cmd.help or "", re.M)]
    assert not missing, f"--help without an `Example: mom ...` line: {missing}"
