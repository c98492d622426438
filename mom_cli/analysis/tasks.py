"""`mom eval --tasks`: lm-evaluation-harness on any model mom loads, the way surgery papers report.

lm-eval runs through its Python API on the model mom has already loaded (MoM checkpoint,
`transformers` directory, hub id or GGUF), so a MoM checkpoint needs no export first and mom's
own classes are used. Several models give one table, each score beside the first model's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mom_cli.console import hush, log
from mom_cli.errors import MomError, UsageError

MISSING = "`mom eval --tasks` needs lm-evaluation-harness, the `eval` extra: pip install 'mom-cli[eval]'"


@dataclass
class TaskOptions:
    tasks: list[str]  # lm-eval task names, or paths to task .yaml files
    num_fewshot: int | None = None
    limit: float | None = None  # examples per task; below 1, a share of each task
    batch_size: int = 4
    device: str = "cpu"
    dtype: torch.dtype | None = None
    allow_pickle: bool = False


@dataclass
class TaskScores:
    model: str
    scores: dict[str, dict[str, float]]  # task -> metric -> value
    stderr: dict[str, dict[str, float | None]]
    samples: dict[str, int]
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lm_eval_module() -> Any:
    try:
        import lm_eval
        import lm_eval.models.huggingface
    except ImportError:
        raise UsageError(MISSING) from None
    return lm_eval


def split_specs(tasks: list[str]) -> tuple[list[str], list[Path]]:
    """Task specs for lm-eval (a local .yaml becomes its absolute path) and the folders holding
    local ones, which lm-eval indexes too so that their `include:`s and groups resolve."""
    specs: list[str] = []
    folders: list[Path] = []
    for t in tasks:
        path = Path(t).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise UsageError(f"task file {t} does not exist")
            specs.append(str(path.resolve()))
            if path.resolve().parent not in folders:
                folders.append(path.resolve().parent)
        elif t:
            specs.append(t)
    if not specs:
        raise UsageError("--tasks is empty: give lm-eval task names or .yaml task files, comma-separated")
    return specs, folders


def task_manager(specs: list[str], folders: list[Path]) -> Any:
    """lm-eval's index: only the local folders when every task is a file (fast, offline),
    else also lm-eval's own tasks; unknown names are refused before any model is loaded."""
    from lm_eval.tasks import TaskManager

    names = [s for s in specs if not Path(s).is_file()]
    manager = TaskManager(include_path=[str(f) for f in folders] or None, include_defaults=bool(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UsageError(
            f"unknown lm-eval task {unknown[0]!r}: give a task name (`lm_eval ls tasks`) or a .yaml task file"
        )
    return manager


def run_tasks(model: Any, tokenizer: Any, ref: str, opts: TaskOptions, manager: Any, specs: list[str]) -> TaskScores:
    """lm-eval's scores of one loaded model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size)
    try:
        with hush():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=specs,
                num_fewshot=opts.num_fewshot,
                limit=_limit(opts.limit),
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=_bootstrap(opts.limit),
            )
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise MomError(f"lm-eval failed on {ref}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    scores, stderr = _metrics(out["results"])
    samples = {t: int(n.get("effective", n.get("original", 0))) for t, n in out.get("n-samples", {}).items()}
    options = {
        "tasks": opts.tasks,
        "num_fewshot": opts.num_fewshot,
        "limit": opts.limit,
        "lm_eval_version": out.get("lm_eval_version"),
    }
    return TaskScores(ref, scores, stderr, samples, time.perf_counter() - start, options)


def _limit(limit: float | None) -> int | float | None:
    if limit is None:
        return None
    return int(limit) if limit >= 1 else limit


def _bootstrap(limit: float | None) -> int:
    """Standard errors by bootstrap are slow on tiny subsets and say little there; lm-eval's
    default otherwise, as the papers report."""
    return 0 if limit is not None and limit < 50 else 100_000


def _metrics(results: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    """lm-eval's "acc,none" keys as {task: {"acc": value}}; a filter other than "none" is kept
    in the name ("exact_match (strict-match)")."""
    scores: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    for task, row in results.items():
        for key, value in row.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric} ({filt})"
            scores.setdefault(task, {})[name] = float(value)
            err = row.get(f"{metric}_stderr,{filt}")
            stderr.setdefault(task, {})[name] = float(err) if isinstance(err, (int, float)) else None
    return scores, stderr


def evaluate_models(refs: list[str], opts: TaskOptions) -> list[TaskScores]:
    """Every model in turn (one in memory at a time) on the same tasks."""
    from mom_cli.io.loading import load_model

    lm_eval_module()
    specs, folders = split_specs(opts.tasks)
    _quiet_lm_eval()
    manager = task_manager(specs, folders)
    out = []
    for ref in refs:
        log(f"eval {ref}: {', '.join(opts.tasks)}")
        model, tok = load_model(ref, opts.device, opts.dtype, opts.allow_pickle)
        out.append(run_tasks(model, tok, ref, opts, manager, specs))
        del model
    return out


def comparison(results: list[TaskScores]) -> list[dict[str, Any]]:
    """One row per (task, metric): each model's value and its difference from the first model's."""
    rows = []
    first = results[0]
    for task, metrics in first.scores.items():
        for metric, base in metrics.items():
            values = [r.scores.get(task, {}).get(metric) for r in results]
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "values": values,
                    "deltas": [None if v is None else v - base for v in values],
                }
            )
    return rows


def _quiet_lm_eval() -> None:
    """lm-eval logs every task's defaults at WARNING; mom shows errors only (and its own log).
    Its progress bars (tqdm, datasets) follow --quiet."""
    from mom_cli import console

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if console.QUIET:
        import datasets

        datasets.disable_progress_bars()


def check_recordable(ref: str) -> Path:
    """The MoM checkpoint `--record` writes into; refused before any evaluation runs."""
    from mom_cli.io.checkpoint import read_mom

    ckpt = Path(ref)
    if not ckpt.is_dir():
        raise UsageError(f"--record writes into a local MoM checkpoint; {ref} is not a directory")
    read_mom(ckpt)
    return ckpt


def record(result: TaskScores) -> Path:
    """Append the scores to a MoM checkpoint's provenance and put them in its model card
    (`model-index`, which the Hub renders); each file is replaced atomically."""
    import json

    from mom_cli.io import provenance
    from mom_cli.io.atomic import atomic_file

    ckpt = check_recordable(result.model)
    cfg_path = ckpt / "config.json"
    raw = json.loads(cfg_path.read_text())
    entry = provenance.record("eval", result.options, result.model)
    entry["results"] = result.scores
    raw["mom_provenance"] = [*raw.get("mom_provenance", []), entry]
    card_path = ckpt / "README.md"
    card = card_path.read_text() if card_path.exists() else f"# {ckpt.name}\n"
    card = provenance.with_results(card, provenance.current_results(raw["mom_provenance"]), ckpt.resolve().name)
    # the card first: a config without its card is the state a crash in between may leave
    with atomic_file(card_path, force=True) as tmp:
        tmp.write_text(card)
    with atomic_file(cfg_path, force=True) as tmp:
        tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return ckpt
