"""Open any model mom measures: a MoM checkpoint, a transformers directory, a hub id or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mom_cli.console import hush, status
from mom_cli.errors import MomError, UsageError, one_line
from mom_cli.io.sources import load_config, resolve_path

# Every --dtype spelling: the full names, and the short ones train-routers' help uses.
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A --dtype value; None for "auto" (keep the stored dtype)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    ref: str, device: str = "cpu", dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any supported reference; `dtype` None keeps the stored dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mom_cli  # noqa: F401  (registers the mom model type)

    path = resolve_path(ref)
    # mom loads MoM checkpoints with its own classes: never the code a folder carries
    kwargs: dict[str, Any] = {"dtype": dtype or "auto", "trust_remote_code": False}
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"{path} is a file but not a .gguf model")
        kwargs.update(gguf_file=path.name)
        directory = path.parent
    else:
        directory = path
        config = load_config(directory)
        if getattr(config, "model_type", None) == "mom":
            from mom_cli.io.checkpoint import read_mom

            read_mom(directory)  # clear errors for corrupt weights before transformers
        elif not allow_pickle and not any(directory.glob("*.safetensors")):
            raise UsageError(
                f"{directory} has no safetensors weights; convert them, or pass --allow-pickle if you trust the file"
            )
        kwargs["use_safetensors"] = not allow_pickle
    try:
        with status(f"loading {ref}"), hush():
            model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            directory, trust_remote_code=False, **({"gguf_file": path.name} if path.is_file() else {})
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise MomError(f"cannot load {ref}: {one_line(e)}") from e
    if path.is_file():  # dequantised to float: tools that see a quantizer refuse to save or train it
        from mom_cli.io.sources import dequantised_config

        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        dequantised_config(model)
    return model.to(device).eval(), tokenizer


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved beside a model directory's weights."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise MomError(f"cannot load the tokenizer of {directory}: {str(e).splitlines()[0]}") from e


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r}: use cpu, cuda or auto")
    return name
