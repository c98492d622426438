"""GGUF sources: a tiny Llama GGUF written with the gguf package decomposes exactly."""

from __future__ import annotations

import torch

import mom_cli
from tests.gguf_fixture import write_tiny_llama_gguf
from tests.helpers import decomposed, ids, max_diff


@torch.no_grad()
def test_gguf_source_decomposes_exactly(tmp_path):
    path, ref = write_tiny_llama_gguf(tmp_path / "src")
    ckpt = decomposed(path, tmp_path / "mom")
    mom = mom_cli.load(ckpt).eval()
    x = ids(2, 16, vocab=ref.config.vocab_size)
    assert max_diff(ref(x).logits, mom(x).logits) <= 1e-4
    assert (ckpt / "tokenizer.json").exists() or (ckpt / "tokenizer_config.json").exists()
