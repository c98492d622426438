"""Register the `mom` model type with transformers' Auto classes, without importing them first.

`import mom_cli` must make `AutoConfig`/`AutoModelForCausalLM.from_pretrained(path)` understand
MoM checkpoints. Registering at once would import torch and transformers' Auto machinery (about
6 s), which the `mom` command line, `mom --help` and shell completion must not pay for. So the
registration is attached to transformers' own modules instead: it runs right after
`transformers.models.auto.configuration_auto` (home of AutoConfig) and `...modeling_auto` (home
of AutoModelForCausalLM) are imported, or immediately when they already are. Either way, no one
can reach an Auto class before `mom` is in it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Callable


def register_config() -> None:
    from transformers import AutoConfig

    from mom_cli.modeling.configuration_mom import MomConfig

    AutoConfig.register("mom", MomConfig, exist_ok=True)


def register_model() -> None:
    from transformers import AutoModelForCausalLM

    from mom_cli.modeling.configuration_mom import MomConfig
    from mom_cli.modeling.modeling_mom import MomForCausalLM

    AutoModelForCausalLM.register(MomConfig, MomForCausalLM, exist_ok=True)


HOOKS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": register_config,
    "transformers.models.auto.modeling_auto": register_model,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the hooked modules with the other finders, then runs the hook once a module has run."""

    def find_spec(self, name: str, path, target: ModuleType | None = None):
        if name not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            HOOKS[name]()

        spec.loader.exec_module = exec_module  # this spec's own loader instance only
        return spec


def install() -> None:
    """Register now what transformers has already imported; the rest when it is imported."""
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    for name, hook in HOOKS.items():
        if name in sys.modules:
            hook()
