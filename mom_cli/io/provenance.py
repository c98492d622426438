"""What was done to a checkpoint: one record per operation, kept in its config and model card."""

from __future__ import annotations

import datetime as _dt
from typing import Any


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("mom-cli")
    except PackageNotFoundError:
        return "0+unknown"


def record(command: str, args: dict[str, Any], source: str) -> dict[str, Any]:
    clean = {
        k: (str(v) if not isinstance(v, (int, float, bool, str, type(None), list, dict)) else v)
        for k, v in args.items()
    }
    return {
        "command": command,
        "args": clean,
        "source": source,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mom_version": version(),
    }


# What a folder needs to load, and how to say so in its model card.
NEEDS = ("nothing", "remote-code", "mom")
_LOAD = {
    "nothing": ["from transformers import AutoModelForCausalLM", "model = AutoModelForCausalLM.from_pretrained(PATH)"],
    "remote-code": [
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # runs the folder's modeling_mom.py",
    ],
    "mom": [
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # runs the folder's modeling_mom.py",
        "# or, with mom installed, its own classes and no code from the folder:",
        "import mom_cli",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
    ],
}
_SAYS = {
    "nothing": "a standard `{arch}` model: it needs nothing beyond `transformers`.",
    "remote-code": "a Mixture-of-Modules model; its runtime is in this folder, so it loads with `trust_remote_code=True`.",
    "mom": "a Mixture-of-Modules checkpoint; it loads with `trust_remote_code=True` (its runtime is in this folder), "
    "or with `mom` installed.",
}


def model_card(config: Any, needs: str = "mom", arch: str | None = None) -> str:
    """A short README.md: what the model is, what loading it needs, its plan and history."""
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS}")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mom, mixture-of-modules]",
        "---",
        f"# {'Mixture-of-Modules' if needs != 'nothing' else 'Transformer'} model ({config.family} family)",
        "",
        f"Made with `mom`: {_SAYS[needs].format(arch=arch or config.source_model_type)} Load it with:",
        "",
        "```python",
        *_LOAD[needs],
        "```",
        "",
    ]
    if needs != "nothing":
        lines += [
            "## Plan",
            "",
            f"- plain bottom layers: {len(config.bottom_layers)}; plain top layers: {len(config.top_layers)}",
        ]
        for i, b in enumerate(config.blocks):
            lines.append(
                f"- block {i}: {_live(b['mha'])} MHA + {_live(b['ffn'])} FFN modules{' + SKIP' if config.skip else ''}, "
                f"{b['steps']} steps, top-{config.router_top_k}, {config.router} router"
            )
        lines.append("")
    lines += ["## Provenance", "", "| # | command | source | time | mom |", "|---|---|---|---|---|"]
    for i, r in enumerate(config.mom_provenance, 1):
        lines.append(f"| {i} | `{r['command']}` | {r['source']} | {r['time']} | {r['mom_version']} |")
    card = "\n".join(lines) + "\n"
    results = current_results(config.mom_provenance)
    return with_results(card, results, _model_name(config)) if results else card


def _model_name(config: Any) -> str:
    prov = config.mom_provenance
    return f"{str(prov[0]['source']).rstrip('/').split('/')[-1]}-mom" if prov else "mom-model"


def current_results(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Task scores measured on the weights as they are: `eval` records after the last operation
    that changed the model (a pruned model does not inherit its source's scores)."""
    out: dict[str, dict[str, float]] = {}
    for r in history:
        if r["command"] != "eval":
            out = {}
        else:
            for task, metrics in r.get("results", {}).items():
                out.setdefault(task, {}).update(metrics)
    return out


def with_results(card: str, results: dict[str, dict[str, float]], name: str) -> str:
    """The card with `model-index` in its YAML header (the Hub renders it) and an Evaluation
    section; both replace earlier ones, everything else in the card is kept."""
    import re

    import yaml

    header: dict[str, Any] = {}
    body = card
    m = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    if m:
        header = yaml.safe_load(m.group(1)) or {}
        body = card[m.end() :]
    header["model-index"] = [
        {
            "name": name,
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": task, "type": task},
                    "metrics": [{"type": k, "value": v, "name": k} for k, v in metrics.items()],
                }
                for task, metrics in results.items()
            ],
        }
    ]
    body = re.sub(r"\n## Evaluation\n.*?(?=\n## |\Z)", "", body, flags=re.DOTALL).rstrip("\n") + "\n"
    table = [
        "",
        "## Evaluation",
        "",
        "lm-evaluation-harness, recorded by `mom eval --record`:",
        "",
        "| task | metric | value |",
        "|---|---|---|",
    ]
    table += [f"| {t} | {k} | {v:.4f} |" for t, ms in results.items() for k, v in ms.items()]
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n{body}" + "\n".join(table) + "\n"


def _live(origins: list) -> int:
    """Modules a pool still holds (pruned slots are None)."""
    return sum(o is not None for o in origins)
