"""Recipes: named pipelines of `mom` steps in YAML, validated whole, then run like a shell pipe.

    # What it does, what it costs (the first comment line is the recipe's description).
    vars:                       # --set NAME=VALUE overrides; a null default must be set
      source: gpt2
    output: ${source}-small     # default for -o
    steps:
      - command: decompose      # any `mom` command; options as on its command line,
        source: ${source}       #   spelled keep-ffn or keep_ffn, flags as true/false
        depth: 6
      - command: prune          # a checkpoint step's input is the previous step's output
        keep-ffn: true
        data: ${data}
      - command: eval           # report steps (eval, info) measure the current checkpoint
      - command: plot routing   # picture steps draw it; `output` names the file in the result

Every step is checked against the command's own parameters (found by introspecting the CLI, so
new commands validate without changes here) before any step runs; a mistake is one error naming
the recipe file and line. Each step runs in-process through the same command-line code as
`mom CMD ...` in a pipe, with its output in a work directory, keyed by a hash of the resolved
step and its input, so a rerun skips finished steps. The resolved recipe is saved in the result
(`mom_recipe.yaml`) and its model card.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from mom_cli import console
from mom_cli.errors import MomError, UsageError, one_line
from mom_cli.io.atomic import releases_locks

RECIPE_FILE = "mom_recipe.yaml"
SUFFIXES = (".yaml", ".yml")
TOP_KEYS = ("name", "description", "vars", "output", "steps")
RUNNER_KEYS = ("json", "force", "help")  # the runner sets these itself
PICTURE_GROUPS = ("plot",)  # commands under these groups draw a file; they do not change the model
NOT_STEPS = ("run", "recipes")
CHECKPOINT_ARGS = ("checkpoint", "model", "source")  # positional inputs the current checkpoint can fill
TORCH_FRESH_SEED = 67280421310721  # torch's default generator seed in a fresh process
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_-]*)\}")


# ----------------------------------------------------------------------------- finding recipes


def log(msg: str) -> None:
    """One line per message, even when it is longer than the terminal (commands, paths)."""
    if not console.QUIET:
        console.stderr.print(msg, soft_wrap=True, markup=False)


def recipe_dirs() -> list[Path]:
    """Shipped recipes: `mom_cli/recipe_files` in an installed package, else the checkout's `recipes/`."""
    here = Path(__file__).resolve().parent.parent
    return [d for d in (here / "recipe_files", here.parent / "recipes") if d.is_dir()]


def shipped() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.iterdir()):
            if p.suffix in SUFFIXES:
                found.setdefault(p.stem, p)
    return found


def find(ref: str) -> Path:
    """A recipe by file path, or by name from the shipped recipes."""
    path = Path(ref).expanduser()
    if path.suffix in SUFFIXES or os.sep in ref:
        if not path.is_file():
            raise UsageError(f"recipe file {ref} does not exist; `mom recipes list` shows the shipped ones")
        return path
    known = shipped()
    if ref not in known:
        raise UsageError(
            f"no recipe named {ref!r}; known: {', '.join(known) or 'none'} (or give a path to a .yaml file)"
        )
    return known[ref]


def description(path: Path) -> str:
    """The recipe's `description:`, else its first comment line."""
    text = path.read_text()
    with contextlib.suppress(yaml.YAMLError):
        data = yaml.safe_load(text)
        if isinstance(data, dict) and isinstance(data.get("description"), str) and data["description"].strip():
            return data["description"].strip().splitlines()[0]
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def copy(ref: str, dest: Path, force: bool) -> Path:
    """`mom recipes cp NAME DEST`: a copy to edit (DEST may be a folder)."""
    from mom_cli.io.atomic import atomic_file

    src = find(ref)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    with atomic_file(dest, force) as tmp:
        shutil.copyfile(src, tmp)
    return dest


# ----------------------------------------------------------------------------- the commands' parameters


@dataclass
class Param:
    key: str  # as written in a recipe: the long option without dashes, or the argument's name
    flag: str | None  # `--keep-ffn`; None for a positional argument
    type: type
    is_flag: bool
    required: bool
    optional_value: str | None = None  # `--keep-ffn` alone means this value


@dataclass
class CommandSpec:
    name: str  # "prune", "plot routing"
    params: dict[str, Param]
    argument: str | None  # key of the positional input (CKPT, SOURCE, MODEL)
    kind: str  # "checkpoint" (makes the next input), "report" (prints a result), "picture" (draws a file)


def command_specs(group: Any) -> dict[str, CommandSpec]:
    """Every `mom` command that can be a step, from the CLI's click command group itself."""
    from mom_cli.cli.argv import OPTIONAL_REF, OPTIONAL_VALUE

    specs: dict[str, CommandSpec] = {}

    def visit(cmd: Any, prefix: tuple[str, ...]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            path = (*prefix, name)
            if path[0] in NOT_STEPS:
                continue
            if hasattr(sub, "commands"):
                visit(sub, path)
            else:
                specs[" ".join(path)] = _spec(" ".join(path), sub, path[0] in PICTURE_GROUPS)

    visit(group, ())
    # options that may stand alone on the command line (`--keep-ffn`, `--distill`): `true` in a recipe
    alone = {**OPTIONAL_VALUE, **OPTIONAL_REF}
    for spec in specs.values():
        for p in spec.params.values():
            p.optional_value = alone.get(p.flag or "")
    return specs


def _spec(name: str, cmd: Any, picture: bool) -> CommandSpec:
    params: dict[str, Param] = {}
    argument = None
    for p in cmd.params:
        annotation = getattr(getattr(p, "type_descriptor", None), "annotation", str)
        kind = annotation if annotation in (int, float, bool) else str
        if p.param_type_name == "argument":
            params[p.name] = Param(p.name.replace("_", "-"), None, kind, False, bool(p.required))
            argument = argument or p.name.replace("_", "-")
            continue
        long = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        key = long.lstrip("-")
        params[key] = Param(key, long, kind, bool(getattr(p, "is_flag", False)), bool(p.required))
    params = {p.key: p for p in params.values()}
    kind = "picture" if picture else "checkpoint" if "output" in params else "report"
    return CommandSpec(name, params, argument, kind)


# ----------------------------------------------------------------------------- reading a recipe


@dataclass
class Step:
    index: int  # 1-based
    id: str
    command: str
    options: dict[str, Any]  # recipe key -> value, variables not yet substituted
    line: int
    lines: dict[str, int] = field(default_factory=dict)  # option key -> line
    from_set: set[str] = field(default_factory=set)  # option keys given by --set STEP.OPTION


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    vars: dict[str, Any]
    output: str | None
    steps: list[Step]
    lines: dict[str, int]  # top-level key or "vars.NAME" -> line

    def where(self, line: int | None) -> str:
        return f"{self.path}:{line}" if line else str(self.path)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _value(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as e:  # a tag such as !!python/object: safe_load knows no such thing
        problem = getattr(e, "problem", None) or str(e)
        raise UsageError(
            f"{loader.name}:{_line(node)}: {one_line(problem, 120)}; recipes hold plain values only"
        ) from None


def _refuse_aliases(text: str, path: Path) -> None:
    """Anchors and aliases (&a, *a) are refused: nested, they expand without bound, and a recipe
    has no need of them."""
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, (yaml.AliasToken, yaml.AnchorToken)):
                raise UsageError(
                    f"{path}:{token.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are "
                    "not allowed in recipes; write the value out"
                )
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: not valid YAML: {one_line(getattr(e, 'problem', None) or e, 120)}") from None


def _mapping(node: yaml.Node, what: str, path: Path) -> list[tuple[str, yaml.Node, int]]:
    if not isinstance(node, yaml.MappingNode):
        raise UsageError(f"{path}:{_line(node)}: {what} must be a mapping of key: value")
    out = []
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise UsageError(f"{path}:{_line(k)}: keys of {what} must be plain names")
        out.append((str(k.value), v, _line(k)))
    return out


def load(ref: str) -> Recipe:
    """Parse a recipe, keeping the line of every key for error messages."""
    path = find(ref)
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as e:
        raise UsageError(f"{path}: cannot read the recipe: {one_line(e, 120)}") from None
    _refuse_aliases(text, path)
    loader = yaml.SafeLoader(text)
    loader.name = str(path)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: not valid YAML: {one_line(getattr(e, 'problem', None) or e, 120)}") from None
    finally:
        loader.dispose()
    if root is None:
        raise UsageError(f"{path}: empty recipe; it needs at least `steps:`")
    recipe = Recipe(path, path.stem, description(path), {}, None, [], {})
    for key, node, line in _mapping(root, "a recipe", path):
        recipe.lines[key] = line
        if key not in TOP_KEYS:
            raise UsageError(f"{path}:{line}: unknown recipe key {key!r}; a recipe has {', '.join(TOP_KEYS)}")
        if key == "vars":
            for name, vnode, vline in _mapping(node, "vars", path):
                recipe.vars[name] = _value(loader, vnode)
                recipe.lines[f"vars.{name}"] = vline
        elif key == "steps":
            recipe.steps = _steps(loader, node, path)
        elif key in ("name", "description", "output"):
            value = _value(loader, node)
            if not isinstance(value, str):
                raise UsageError(f"{path}:{line}: `{key}` must be a string")
            setattr(recipe, key, value)
    if not recipe.steps:
        raise UsageError(f"{recipe.where(recipe.lines.get('steps'))}: the recipe has no steps")
    return recipe


def _steps(loader: yaml.SafeLoader, node: yaml.Node, path: Path) -> list[Step]:
    if not isinstance(node, yaml.SequenceNode):
        raise UsageError(f"{path}:{_line(node)}: `steps` must be a list of steps (`- command: ...`)")
    steps: list[Step] = []
    for i, snode in enumerate(node.value, 1):
        step = Step(i, "", "", {}, _line(snode))
        for key, vnode, line in _mapping(snode, f"step {i}", path):
            value = _value(loader, vnode)
            if key in ("command", "id"):
                if not isinstance(value, str) or not value.strip():
                    raise UsageError(f"{path}:{line}: step {i}: `{key}` must be a non-empty string")
                setattr(step, key, " ".join(value.split()))
                continue
            norm = key.replace("_", "-")
            if norm in step.options:
                raise UsageError(f"{path}:{line}: step {i}: option {key!r} given twice")
            step.options[norm] = value
            step.lines[norm] = line
        if not step.command:
            raise UsageError(f"{path}:{step.line}: step {i} has no `command:` (e.g. `- command: decompose`)")
        steps.append(step)
    seen: dict[str, int] = {}
    for step in steps:  # ids name steps in --set: the command, numbered when repeated
        base = step.id or step.command.replace(" ", "-")
        seen[base] = seen.get(base, 0) + 1
        step.id = base if seen[base] == 1 or step.id else f"{base}-{seen[base]}"
    return steps


# ----------------------------------------------------------------------------- resolving


@dataclass
class Resolved:
    """One validated step: its command, options with values, and where it takes its input from."""

    step: Step
    spec: CommandSpec
    options: dict[str, Any]  # recipe key -> value, runner keys excluded
    explicit_input: bool


def parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sets:
        key, eq, raw = s.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set {s!r} must be KEY=VALUE (a variable, or STEP.OPTION such as prune.keep-ffn=50%)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = raw if isinstance(value, (dict, list)) else value
    return out


def resolve(recipe: Recipe, sets: dict[str, Any], specs: dict[str, CommandSpec]) -> list[Resolved]:
    """Check every step against its command, with variables and --set values applied; nothing runs."""
    values = dict(recipe.vars)
    step_sets: dict[tuple[str, str], Any] = {}
    for key, value in sets.items():
        if "." in key:
            sid, _, opt = key.partition(".")
            step_sets[(sid, opt.replace("_", "-"))] = value
        elif key in recipe.vars:
            values[key] = value
        else:
            raise UsageError(
                f"--set {key}: {recipe.path} has no variable {key!r} "
                f"(variables: {', '.join(recipe.vars) or 'none'}; for a step option use STEP.OPTION)"
            )
    for (sid, opt), value in step_sets.items():
        step = next((s for s in recipe.steps if sid in (s.id, str(s.index))), None)
        if step is None:
            raise UsageError(
                f"--set {sid}.{opt}: no step {sid!r} in {recipe.path} (steps: {', '.join(s.id for s in recipe.steps)})"
            )
        step.options[opt] = value
        step.from_set.add(opt)
    for name, value in values.items():
        if value is None:
            raise UsageError(
                f"{recipe.where(recipe.lines.get('vars.' + name))}: variable {name!r} has no value; "
                f"pass --set {name}=..."
            )
    out: list[Resolved] = []
    checkpoints = 0
    for step in recipe.steps:
        where = f"{recipe.where(step.line)}: step {step.index} ({step.command})"
        spec = specs.get(step.command)
        if spec is None:
            raise UsageError(f"{where}: unknown command {step.command!r}; this mom has: {', '.join(specs)}")
        opts = {}
        for key, raw in step.options.items():
            origin = f"--set {step.id}.{key}" if key in step.from_set else recipe.where(step.lines.get(key, step.line))
            at = f"{origin}: step {step.index} ({step.command})"
            value = substitute(raw, values, at)
            opts[key] = check_value(spec, key, value, at, picture=spec.kind == "picture")
        explicit = spec.argument is not None and spec.argument in opts
        if spec.kind == "checkpoint":
            if checkpoints and explicit:
                at = recipe.where(step.lines.get(spec.argument, step.line))
                raise UsageError(
                    f"{at}: step {step.index} ({step.command}): `{spec.argument}` is the previous step's output here; remove it "
                    "(only the first checkpoint step names its input)"
                )
            if not checkpoints and not explicit and spec.argument:
                raise UsageError(f"{where}: the first step needs its input: add `{spec.argument}: ...`")
            checkpoints += 1
        elif not explicit and spec.argument and spec.argument not in CHECKPOINT_ARGS:
            raise UsageError(f"{where}: its input is not a checkpoint; add `{spec.argument}: FILE`")
        elif not explicit and not checkpoints and spec.argument:
            raise UsageError(
                f"{where}: no checkpoint yet to work on; add `{spec.argument}: ...` or move the step later"
            )
        for p in spec.params.values():
            if p.required and p.key not in opts and p.key != spec.argument and p.key != "output":
                raise UsageError(f"{where}: missing required option `{p.key}` (mom {spec.name} {p.flag} ...)")
        out.append(Resolved(step, spec, opts, explicit))
    if not checkpoints:
        raise UsageError(f"{recipe.path}: no step makes a checkpoint (decompose, prune, export, ...)")
    return out


def substitute(value: Any, values: dict[str, Any], where: str) -> Any:
    """`${name}` in a string; a value that is exactly `${name}` keeps the variable's type."""
    if not isinstance(value, str):
        return value

    def lookup(name: str) -> Any:
        if name not in values:
            raise UsageError(f"{where}: unknown variable ${{{name}}} (variables: {', '.join(values) or 'none'})")
        return values[name]

    whole = VAR.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    return VAR.sub(lambda m: str(lookup(m.group(1))), value)


def check_value(spec: CommandSpec, key: str, value: Any, where: str, picture: bool = False) -> Any:
    if key in RUNNER_KEYS or (key == "output" and not picture):
        raise UsageError(f"{where}: `{key}` is set by `mom run` itself (use -o for the result); remove it")
    p = spec.params.get(key)
    if p is None:
        known = ", ".join(k for k in spec.params if k not in RUNNER_KEYS and k != "output")
        raise UsageError(f"{where}: unknown option {key!r} for mom {spec.name}; its options: {known}")
    if key == "output":  # a picture's file name inside the result
        if not isinstance(value, str) or Path(value).name != value:
            raise UsageError(f"{where}: `output` of a picture step is a file name inside the result (e.g. routing.png)")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
    }[p.type]
    if p.optional_value and value is True:
        return p.optional_value
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[p.type]
        raise UsageError(f"{where}: option {key!r} must be {want}, got {value!r}")
    return str(value) if p.type is str else value


# ----------------------------------------------------------------------------- running


@dataclass
class StepResult:
    index: int
    id: str
    command: str
    output: str | None
    cached: bool
    seconds: float
    result: Any


@dataclass
class RunResult:
    path: Path
    recipe: str
    work_dir: Path | None
    steps: list[StepResult]

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "recipe": self.recipe,
            "work_dir": str(self.work_dir) if self.work_dir else None,
            "steps": [vars(s) for s in self.steps],
        }


@dataclass
class RunOptions:
    sets: list[str] = field(default_factory=list)
    output: Path | None = None
    work_dir: Path | None = None
    keep_work: bool = False
    fresh: bool = False
    force: bool = False


@releases_locks
def run(ref: str, opts: RunOptions, group: Any) -> RunResult:
    """Run a recipe; `group` is the CLI's click command group, the steps' commands."""
    from mom_cli.io.atomic import check_output

    recipe = load(ref)
    sets = parse_sets(opts.sets)
    steps = resolve(recipe, sets, command_specs(group))
    values = {**recipe.vars, **{k: v for k, v in sets.items() if "." not in k}}
    out = Path(opts.output or substitute(recipe.output or f"{recipe.name}-out", values, str(recipe.path)))
    if opts.output is None:
        check_recipe_output(out, recipe)
    check_output(out, opts.force)  # before minutes of work
    work = opts.work_dir or out.parent / f".{out.name}.mom-work"
    made_work = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    log(f"mom run {recipe.name}: {len(steps)} steps, work in {work}")
    results: list[StepResult] = []
    made: list[Path] = []
    current: str | None = None
    current_key = ""
    pictures: list[tuple[Path, str]] = []
    try:
        for r in steps:
            key = step_key(r, current_key)
            target = step_path(work, r, key)
            input_ref = str(r.options[r.spec.argument]) if r.explicit_input else current
            results.append(_run_step(group, r, len(steps), input_ref, target, opts.fresh))
            made.append(target)
            if r.spec.kind == "checkpoint":
                current, current_key = str(target), key
            elif r.spec.kind == "picture":
                pictures.append((target, r.options.get("output") or f"{r.step.id}{target.suffix}"))
        assert current is not None  # resolve() guarantees a checkpoint step
        final = finish(recipe, steps, values, Path(current), pictures, out, opts.force)
    except BaseException:
        if made:
            log(f"finished steps are kept in {work}; the same command reruns from the failed step")
        elif made_work:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not opts.keep_work:  # the default work folder goes whole; a --work-dir keeps what others put there
        _clean(work, made, made_work or opts.work_dir is None)
    return RunResult(final, recipe.name, work if opts.keep_work else None, results)


def check_recipe_output(out: Path, recipe: Recipe) -> None:
    """An output the recipe names (not the command line) stays under the current folder: a recipe
    from elsewhere must not point --force at a folder of the user's."""
    if out.is_absolute() or ".." in out.parts or not out.parts:
        raise UsageError(
            f"{recipe.where(recipe.lines.get('output'))}: the recipe's output {str(out)[:80]!r} leaves the "
            "current folder; name the output on the command line with -o"
        )


def step_key(r: Resolved, input_key: str) -> str:
    """What a step's output depends on: its command and options, and its input (or the input's key)."""
    opts = {k: (v, fingerprint(v)) for k, v in sorted(r.options.items())}
    upstream = fingerprint(str(r.options[r.spec.argument])) if r.explicit_input else input_key
    blob = json.dumps({"command": r.spec.name, "options": opts, "input": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def fingerprint(value: Any) -> str | None:
    """For an option that names a local file or folder: its files' names, sizes and times."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        return None
    path = Path(value).expanduser()
    try:
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            return None
        stats = [
            (str(p.relative_to(path) if p != path else p.name), p.stat().st_size, p.stat().st_mtime_ns) for p in files
        ]
    except OSError:
        return None
    return hashlib.sha256(json.dumps([str(path.resolve()), stats]).encode()).hexdigest()[:16]


def step_path(work: Path, r: Resolved, key: str) -> Path:
    base = work / f"{r.step.index:02d}-{r.step.id.replace(' ', '-')}-{key}"
    if r.spec.kind == "report":
        return base.with_suffix(".json")
    if r.spec.kind == "picture":
        return base.with_suffix(Path(r.options.get("output", "x.png")).suffix or ".png")
    if r.options.get("format") == "safetensors":  # export to one flat file
        return base.with_suffix(".safetensors")
    return base


def argv_for(r: Resolved, input_ref: str | None, target: Path) -> list[str]:
    """The command line this step stands for (what a pipe would run)."""
    args = r.spec.name.split()
    if r.spec.argument and input_ref is not None:
        args.append(input_ref)
    for key, value in r.options.items():
        p = r.spec.params[key]
        if p.flag is None or key == "output":
            continue
        if p.is_flag:
            if value:
                args.append(p.flag)
            continue
        args += [p.flag, str(value)]
    if r.spec.kind != "report":
        args += ["-o", str(target)]
    if "json" in r.spec.params:
        args.append("--json")
    return args


def _run_step(group: Any, r: Resolved, total: int, input_ref: str | None, target: Path, fresh: bool) -> StepResult:
    label = f"step {r.step.index}/{total}: mom {r.spec.name}"
    done = target.with_name(target.name + ".result.json") if r.spec.kind != "report" else target
    if target.exists() and done.exists() and not fresh:
        log(f"{label}: done before, reusing {target}")
        return StepResult(
            r.step.index, r.step.id, r.spec.name, _shown(r, target), True, 0.0, json.loads(done.read_text())
        )
    for stale in (target, done):
        _remove(stale)
    argv = argv_for(r, input_ref, target)
    log(f"{label}: mom {' '.join(argv)}")
    start = time.perf_counter()
    printed = run_command(group, argv, f"{r.step.index} ({r.spec.name})")
    seconds = time.perf_counter() - start
    result = _parse(printed)
    from mom_cli.io.atomic import atomic_file

    with atomic_file(done, force=True) as tmp:  # written last: the step is complete
        tmp.write_text(json.dumps(result, default=str) + "\n")
    if r.spec.kind == "report":
        log(f"{label}: {json.dumps(result, default=str) if not isinstance(result, str) else result}")
    return StepResult(r.step.index, r.step.id, r.spec.name, _shown(r, target), False, round(seconds, 3), result)


def _shown(r: Resolved, target: Path) -> str | None:
    return None if r.spec.kind == "report" else str(target)


def _parse(printed: str) -> Any:
    text = printed.strip()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def run_command(group: Any, argv: list[str], label: str) -> str:
    """Run `mom ARGV` in this process through the command-line code; returns what it printed."""
    from mom_cli.cli.argv import invoke

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), fresh_rng():
            code = invoke(group, argv)
    except MomError as e:  # the step's own message, prefixed with which step; its exit code kept
        err = UsageError(f"step {label}: {e}") if e.exit_code == 2 else MomError(f"step {label}: {e}")
        err.exit_code = e.exit_code
        raise err from e
    finally:
        gc.collect()  # the step's model is garbage now: free it before the next step loads one
    if code != 0:
        raise MomError(f"step {label} exited with code {code}")
    return buf.getvalue()


@contextlib.contextmanager
def fresh_rng() -> Iterator[None]:
    """Each step starts from torch's random state of a fresh process, as it would in a pipe."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(TORCH_FRESH_SEED)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# ----------------------------------------------------------------------------- the result


def resolved_yaml(recipe: Recipe, steps: list[Resolved], values: dict[str, Any]) -> str:
    """A recipe with every variable and --set applied: `mom run` on it repeats this run."""
    from mom_cli.io.provenance import version

    doc = {
        "name": recipe.name,
        "description": recipe.description,
        "steps": [
            {
                "command": r.spec.name,
                **({"id": r.step.id} if r.step.id != r.spec.name.replace(" ", "-") else {}),
                **r.options,
            }
            for r in steps
        ],
    }
    head = (
        f"# Resolved by `mom run` (mom {version()}) from {recipe.path}\n"
        f"# with variables {json.dumps(values, default=str)}; `mom run {RECIPE_FILE}` repeats it.\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def finish(
    recipe: Recipe,
    steps: list[Resolved],
    values: dict[str, Any],
    last: Path,
    pictures: list[tuple[Path, str]],
    out: Path,
    force: bool,
) -> Path:
    """The last checkpoint becomes the result (hard links, so the work copy stays for reruns),
    with the pictures, the resolved recipe and a model card section."""
    from mom_cli.io.atomic import atomic_dir, atomic_file

    text = resolved_yaml(recipe, steps, values)
    if last.is_file():  # a flat .safetensors export: the recipe goes beside it (first: refused without --force)
        with atomic_file(Path(f"{out}.{RECIPE_FILE}"), force) as tmp:
            tmp.write_text(text)
        with atomic_file(out, force) as tmp:
            tmp.unlink()  # the link takes its place
            _link(last, tmp)
        return out
    with atomic_dir(out, force) as tmp:
        for src in last.rglob("*"):
            if src.is_file():
                dst = tmp / src.relative_to(last)
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link(src, dst)
        for src, name in pictures:
            _link(src, tmp / name)
        (tmp / RECIPE_FILE).write_text(text)
        card = tmp / "README.md"
        before = card.read_text() if card.exists() else f"# {out.name}\n"
        card.unlink(missing_ok=True)  # a hard link: never write through to the work copy
        card.write_text(before.rstrip("\n") + "\n\n" + card_section(recipe, text, [n for _, n in pictures]))
    return out


def card_section(recipe: Recipe, text: str, pictures: list[str]) -> str:
    lines = ["## Recipe", "", f"Made by `mom run {recipe.name}`: {recipe.description}", ""]
    lines += [f"![{name}]({name})" for name in pictures] + ([""] if pictures else [])
    lines += ["```yaml", text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links: copy
        shutil.copy2(src, dst)


def _remove(path: Path, ignore_errors: bool = False) -> None:
    """A step's output, a folder or a file, if it is there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    elif path.exists():
        path.unlink()


def _clean(work: Path, made: list[Path], whole: bool) -> None:
    for p in made:
        for q in (p, p.with_name(p.name + ".result.json")):
            _remove(q, ignore_errors=True)
    if whole:
        shutil.rmtree(work, ignore_errors=True)
