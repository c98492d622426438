"""Pictures for people who would rather look than read. Headless (Agg); matplotlib is optional
(`pip install 'mom-cli[plot]'`). Every plot function draws from the same dict a command prints
with `--json`, so what is drawn is what was measured.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import UsageError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'mom-cli[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_target(path: Path) -> None:
    """Fail before any work if the picture could not be drawn or written."""
    from .outputs import check_output

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"plot file {path} must end in .png, .svg or .pdf")
    check_output(path, force=True)  # the folder exists and is writable; a plot may be replaced
    _pyplot()


def _save(fig: Any, path: Path) -> Path:
    from .outputs import atomic_file

    path = Path(path)
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format=path.suffix[1:].lower(), dpi=120, bbox_inches="tight")
    return path


def plot_prune(report: dict[str, Any], path: Path) -> Path:
    """Left: every module's score (removed ones in red), MHA and FFN side by side.
    Right: calibration perplexity against the number of modules removed, in removal order."""
    plt = _pyplot()
    kinds = [k for k in ("mha", "ffn") if any(m["kind"] == k for m in report["modules"])]
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(5 * (len(kinds) + 1), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mods = [m for m in report["modules"] if m["kind"] == kind]
        colors = ["tab:red" if m["removed"] else "tab:blue" for m in mods]
        ax.bar(range(len(mods)), [m["score"] for m in mods], color=colors)
        ax.set_xticks(range(len(mods)), [f"{m['block']}.{m['slot']}" for m in mods], rotation=90, fontsize=6)
        ax.set_title(f"{kind.upper()} modules: {report['metric']} score (red: removed)")
        ax.set_xlabel("block.slot")
    ax = axes[0][-1]
    ppl = [math.exp(x) for x in report["trace_loss"]]
    ax.plot(range(len(ppl)), ppl, marker="o")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("calibration perplexity")
    ax.set_xlabel("modules removed")
    ax.set_ylabel("perplexity")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
