"""Routing statistics kept beside a checkpoint: how often, and with how much weight, each module
was chosen at each step. `train-routers` records them during its last steps; `prune --metric
usage` and the routing plots read them.

    routing_stats.json   {"tokens": N, "entries": [{"block", "kind", "step", "count", "mass"}, ...]}

`count` and `mass` have one entry per slot of the pool, SKIP last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mom_cli.errors import MomError

FILE_NAME = "routing_stats.json"
Stats = dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]]


def save(directory: Path, stats: Stats, tokens: int) -> Path:
    entries = [
        {"block": b, "kind": kind, "step": h, "count": count.tolist(), "mass": mass.tolist()}
        for (b, kind, h), (count, mass) in sorted(stats.items())
    ]
    path = Path(directory) / FILE_NAME
    path.write_text(json.dumps({"tokens": tokens, "entries": entries}) + "\n")
    return path


def load(directory: Path) -> tuple[Stats, int] | None:
    """The statistics stored with a checkpoint, or None when it has none."""
    path = Path(directory) / FILE_NAME
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        stats = {
            (int(e["block"]), str(e["kind"]), int(e["step"])): (
                torch.tensor(e["count"], dtype=torch.float64),
                torch.tensor(e["mass"], dtype=torch.float64),
            )
            for e in raw["entries"]
        }
        return stats, int(raw["tokens"])
    except (ValueError, KeyError, TypeError) as e:
        raise MomError(f"corrupt {path}: {e}; delete it or re-run train-routers") from e
