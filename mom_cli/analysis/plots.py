"""Pictures for people who would rather look than read. Headless (Agg); matplotlib is optional
(`pip install 'mom-cli[plot]'`). Every plot function draws from the same dict a command prints
with `--json`, so what is drawn is what was measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mom_cli.errors import UsageError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'mom-cli[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_target(path: Path, force: bool = True) -> None:
    """Fail before any work if the picture could not be drawn or written."""
    from mom_cli.io.atomic import check_output

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"plot file {path} must end in .png, .svg or .pdf")
    check_output(path, force)  # the folder exists and is writable; `--plot` of a command may replace its picture
    _pyplot()


def _save(fig: Any, path: Path, force: bool = True) -> Path:
    """Write the figure atomically, then close it (pyplot keeps every open figure alive)."""
    from mom_cli.io.atomic import atomic_file

    path = Path(path)
    try:
        with atomic_file(path, force) as tmp:
            fig.savefig(tmp, format=path.suffix[1:].lower(), dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
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
    return _save(fig, path)


def plot_prune_report(report: dict[str, Any], path: Path, force: bool = False) -> Path:
    """`mom plot prune`: the picture of a saved `mom prune --json` report."""
    if not isinstance(report, dict) or not {"modules", "trace_loss", "metric"} <= set(report):
        raise UsageError("not a prune report: save one with `mom prune ... --json > report.json`")
    check_target(path, force)
    return plot_prune(report, path)


# ----------------------------------------------------------------------------- routing


def routing_figure(pic: Any) -> Any:
    """Per block, a row with the MHA and FFN heatmaps of module share per step (SKIP included, as
    in the paper's analysis figures), then a row with the paths of the sample's tokens."""
    plt = _pyplot()
    blocks = sorted({b for b, _ in pic.shares})
    rows_per_block = 2 if pic.paths else 1
    fig, axes = plt.subplots(
        rows_per_block * len(blocks), 2, figsize=(11, 4.6 * rows_per_block * len(blocks)), squeeze=False
    )
    for i, b in enumerate(blocks):
        row = rows_per_block * i
        for col, kind in enumerate(("mha", "ffn")):
            if (b, kind) in pic.shares:
                _share_map(fig, axes[row][col], pic, b, kind)
            else:
                axes[row][col].set_axis_off()
            if pic.paths:
                _path_map(axes[row + 1][col], pic, b, kind)
    fig.suptitle(f"routing on {pic.tokens:,} tokens", fontsize=11)
    fig.tight_layout()
    return fig


def _share_map(fig: Any, ax: Any, pic: Any, b: int, kind: str) -> None:
    share = pic.shares[(b, kind)]
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    names = pic.names[(b, kind)]
    ax.set_yticks(range(len(names)), names, fontsize=6 if len(names) > 12 else 8)
    steps = share.shape[1]
    ax.set_xticks(range(steps), [str(h + 1) for h in range(steps)], fontsize=6 if steps > 12 else 8)
    ax.set_xlabel("step")
    ax.set_ylabel("module (source layer)")
    ax.set_title(f"block {b} {kind.upper()}: share of tokens")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)


def _path_map(ax: Any, pic: Any, b: int, kind: str) -> None:
    path = pic.paths[(b, kind)]  # (steps, tokens)
    names = pic.names[(b, kind)]
    ax.imshow(path, aspect="auto", cmap="tab20", vmin=0, vmax=max(19, len(names) - 1), interpolation="nearest")
    steps, n = path.shape
    if steps * n <= 900:  # small enough to label every cell with the module it chose
        for h in range(steps):
            for t in range(n):
                label = "S" if names[path[h, t]] == "SKIP" else str(path[h, t])
                ax.text(t, h, label, ha="center", va="center", fontsize=5)
    ax.set_xticks(range(n), [repr(s)[1:-1] for s in pic.sample], rotation=90, fontsize=6)
    ax.set_yticks(range(steps), [str(h + 1) for h in range(steps)], fontsize=6 if steps > 12 else 8)
    ax.set_ylabel("step")
    ax.set_title(f"block {b} {kind.upper()}: each token's top module (S = SKIP)")


def plot_routing(pic: Any, path: Path, force: bool = False) -> Path:
    return _save(routing_figure(pic), path, force)


# ----------------------------------------------------------------------------- training


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """train_metrics.jsonl (a checkpoint folder or the file itself): one JSON object per line."""
    path = Path(path)
    if path.is_dir():
        healed = path / "heal_metrics.jsonl"
        path = (
            healed
            if healed.is_file() and not (path / "train_metrics.jsonl").is_file()
            else path / "train_metrics.jsonl"
        )
    if not path.is_file():
        raise UsageError(
            f"{path} does not exist; `mom train-routers` and `mom heal` write train_metrics.jsonl "
            "and heal_metrics.jsonl into their output"
        )
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UsageError(f"{path}:{i}: not a JSON line") from None
    if not any("loss" in r for r in rows):
        raise UsageError(f"{path} has no training steps to draw")
    return rows


def training_figure(rows: list[dict[str, Any]]) -> Any:
    """Left: training loss (total and next-token part) and held-out loss against tokens seen.
    Right: learning rate and throughput."""
    plt = _pyplot()
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = [r["tokens"] for r in train]
    if any("stage" in r for r in train):  # mom heal: each region's local loss, then the end-to-end KL
        for label in dict.fromkeys(_curve(r) for r in train):
            part = [r for r in train if _curve(r) == label]
            ax.plot([r["tokens"] for r in part], [r["loss"] for r in part], label=label)
        ax.set_yscale("log")
    else:
        ax.plot(x, [r["loss"] for r in train], label="loss", color="tab:blue")
    if any(r.get("lm_loss") is not None for r in train):
        ax.plot(x, [r.get("lm_loss") for r in train], label="next-token loss", color="tab:green", alpha=0.8)
    if evals:
        ax.plot(
            [r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss", color="tab:red"
        )
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title("training")
    ax.legend(fontsize=8)
    ax_lr.plot(x, [r.get("lr") for r in train], color="tab:purple", label="learning rate")
    ax_lr.set_xlabel("tokens")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("schedule and speed")
    if any(r.get("tokens_per_s") is not None for r in train):
        speed = ax_lr.twinx()
        speed.plot(x, [r.get("tokens_per_s") for r in train], color="tab:gray", alpha=0.6, label="tokens/s")
        speed.set_ylabel("tokens/s")
    fig.tight_layout()
    return fig


def _curve(row: dict[str, Any]) -> str:
    return f"local: {row['region']}" if row.get("stage") == "local" else "end-to-end KL"


def plot_training(rows: list[dict[str, Any]], path: Path, force: bool = False) -> Path:
    return _save(training_figure(rows), path, force)
