"""mom: model surgery for pretrained Transformers (Mixture-of-Modules, PEER, pruning).

Importing `mom_cli` registers the `mom` model type with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads MoM checkpoints.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .checkpoint import load
from .configuration_mom import MomConfig
from .modeling_mom import MomForCausalLM, RoutingRecorder
from .provenance import version

__version__ = version()
__all__ = ["MomConfig", "MomForCausalLM", "RoutingRecorder", "load", "__version__"]

AutoConfig.register("mom", MomConfig, exist_ok=True)
AutoModelForCausalLM.register(MomConfig, MomForCausalLM, exist_ok=True)
