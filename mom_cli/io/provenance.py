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
    clean = {k: (str(v) if not isinstance(v, (int, float, bool, str, type(None), list, dict)) else v) for k, v in args.items()}
    return {
        "command": command,
        "args": clean,
        "source": source,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mom_version": version(),
    }


def model_card(config: Any) -> str:
    """A short README.md: what the model is, how to load it, and its history."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mom, mixture-of-modules]",
        "---",
        f"# Mixture-of-Modules model ({config.family} family)",
        "",
        "Made with [`mom`](https://pypi.org/project/mom-cli/). Load it with:",
        "",
        "```python",
        "import mom_cli  # registers the `mom` model type with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "```",
        "",
        "## Plan",
        "",
        f"- plain bottom layers: {len(config.bottom_layers)}; plain top layers: {len(config.top_layers)}",
    ]
    for i, b in enumerate(config.blocks):
        lines.append(
            f"- block {i}: {_live(b['mha'])} MHA + {_live(b['ffn'])} FFN modules{' + SKIP' if config.skip else ''}, "
            f"{b['steps']} steps, top-{config.router_top_k}, {config.router} router"
        )
    lines += ["", "## Provenance", "", "| # | command | source | time | mom |", "|---|---|---|---|---|"]
    for i, r in enumerate(config.mom_provenance, 1):
        lines.append(f"| {i} | `{r['command']}` | {r['source']} | {r['time']} | {r['mom_version']} |")
    return "\n".join(lines) + "\n"


def _live(origins: list) -> int:
    """Modules a pool still holds (pruned slots are None)."""
    return sum(o is not None for o in origins)
