"""LoRA adapters on a MoM checkpoint's module projections, through `peft`.

A cheaper alternative to training whole modules (`--train all`): each MHA and FFN projection of
the plain layers and the pools gets a rank-r update B·A (B starts at zero, so the model starts
unchanged), trained beside the routers and merged into the weights the checkpoint stores. The
routers, PEER layers and embeddings are not adapted.

From Python, the same adapters on any MoM model (`peft` saves, loads and merges them as usual):

    from peft import get_peft_model
    from mom_cli.training.lora import lora_config
    model = get_peft_model(mom_cli.load(CKPT), lora_config(rank=8))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mom_cli.errors import UsageError

# The projections of MhaModule and FfnModule (gated: gate/up/down, plain: fc_in/fc_out); no
# router, PEER or embedding layer has these names.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc_in", "fc_out")
MISSING = "LoRA needs peft, the `lora` extra: pip install 'mom-cli[lora]'"


def lora_config(rank: int, alpha: float | None = None, dropout: float = 0.0) -> Any:
    """peft's LoraConfig for the module projections; alpha defaults to 2 x rank (scale 2)."""
    if rank < 1:
        raise UsageError(f"--lora rank must be >= 1, got {rank}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise UsageError(MISSING) from None
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )


def attach(model: nn.Module, rank: int) -> Any:
    """Inject adapters into `model` in place (it stays the same object, its own forward and
    attributes intact); returns the peft LoraModel that merges them back with `merge`."""
    from peft import LoraModel

    return LoraModel(model, lora_config(rank), "default")


def merge(lora: Any) -> nn.Module:
    """Fold the adapters into the base weights and remove them: a plain model again."""
    return lora.merge_and_unload(progressbar=False)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name
