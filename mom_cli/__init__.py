"""mom: model surgery for pretrained Transformers (Mixture-of-Modules, PEER, pruning).

Importing `mom_cli` registers the `mom` model type with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads MoM checkpoints. The registration and the
names below load on first use (see registration.py), so the `mom` command line starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mom_cli import registration

__all__ = ["MomConfig", "MomForCausalLM", "RoutingRecorder", "load", "__version__"]
_LAZY = {
    "MomConfig": ".modeling.configuration_mom",
    "MomForCausalLM": ".modeling.modeling_mom",
    "RoutingRecorder": ".modeling.modeling_mom",
    "load": ".io.checkpoint",
}

registration.install()


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from mom_cli.io.provenance import version

        return version()
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
