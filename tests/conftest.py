"""Tiny random models saved by transformers, with a real (small) tokenizer, for every test.

Models are built session-wide once and copied per test where a test writes beside them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels (the GPU's segment matmul) then run in Triton's interpreter on CPU tensors,
    # where tests call them; set before mom_cli is imported, as Triton reads it at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TEXT = (
    "The quick brown fox jumps over the lazy dog. A model is a function from tokens to logits. "
    "Mixture of modules routes each token through attention and feed-forward modules step by step. "
    "Pruning removes modules that the routers rarely choose, and export writes safetensors files. "
) * 40
VOCAB = 320


def make_tokenizer(directory: Path) -> None:
    """A byte-level BPE with VOCAB entries, trained on TEXT, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)


def _gpt2(directory: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def _llama(directory: Path, tied: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms so a mis-mapped norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="where the device tests run (tests that take the `device` fixture): cpu, or cuda on a GPU machine",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda, but torch sees no GPU")
    return name


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs tiny models: OpenMP threads only add contention on a 2-core machine, where
    the CLI tests also run their subprocesses side by side (a 30 ms op measured 2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    _gpt2(root / "gpt2")
    _llama(root / "llama")
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.fixture
def gpt2_dir(models_dir, tmp_path) -> Path:
    return Path(shutil.copytree(models_dir / "gpt2", tmp_path / "gpt2"))


@pytest.fixture
def llama_dir(models_dir, tmp_path) -> Path:
    return Path(shutil.copytree(models_dir / "llama", tmp_path / "llama"))


@pytest.fixture(params=["gpt2", "llama"])
def family_dir(request, models_dir, tmp_path) -> Path:
    return Path(shutil.copytree(models_dir / request.param, tmp_path / request.param))


@pytest.fixture
def text_file(models_dir) -> Path:
    return models_dir / "text.txt"
