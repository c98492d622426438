"""A tiny Llama GGUF file written on the fly, plus the transformers model it should load as.

Tests need a real GGUF to read, but no model hub is reachable and a checked-in binary would rot,
so we build one: a random float32 Llama with grouped-query attention, and a small byte-level BPE
tokenizer, written with `gguf.GGUFWriter` the way llama.cpp's converter lays a Llama out.
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import torch
import transformers

FILE_NAME = "tiny-llama-f32.gguf"

# Small enough to write and load in well under a second, but with every feature that can go wrong:
# more than one layer, grouped-query attention (4 query heads share 2 KV heads) and a separate
# (untied) output head, so `output.weight` is in the file.
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, CONTEXT = 64, 2, 4, 2, 128, 128
ROPE_THETA, RMS_EPS = 10000.0, 1e-5

# Words the BPE merges spell out whole; everything else falls back to single bytes.
WORDS = "the and hello world model token layer quick brown fox jumps over lazy dog".split()
# GPT-2's names: transformers' GPT-2 tokenizer appends "<|endoftext|>" (its default unk token) when
# the vocabulary lacks it, which would make the tokenizer one id longer than the model's embedding.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes, in byte order.

    Printable bytes stand for themselves; the others are shifted to code points from 256 up.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _tokenizer() -> tuple[list[str], list[str], list[int]]:
    """`(tokens, merges, token_types)` of a byte-level BPE vocabulary.

    Every word is merged left to right (`Ġ t`, `Ġt h`, `Ġth e`, ...), so each merge's halves are
    already in the vocabulary, which is all BPE asks. `Ġ` is the byte alphabet's space.
    """
    tokens = _byte_alphabet()
    merges: list[str] = []
    for word in WORDS:
        for spelled in ("Ġ" + word, word):  # with and without a leading space
            for end in range(2, len(spelled) + 1):
                left, right = spelled[: end - 1], spelled[end - 1]
                if spelled[:end] not in tokens:
                    merges.append(f"{left} {right}")
                    tokens.append(spelled[:end])
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * 2
    return tokens + [BOS, EOS], merges, [int(t) for t in types]


def _to_llama_cpp_rope_order(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotate-half layout to llama.cpp's interleaved-pairs one.

    HF keeps each head's rotary pairs as (first half, second half); llama.cpp wants them adjacent.
    transformers undoes this when it reads a Llama GGUF, so writing HF order unchanged would load
    a model with scrambled attention.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_llama_gguf(directory: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, transformers.LlamaForCausalLM]:
    """Write a tiny float32 Llama GGUF into `directory`; return its path and the same model in torch.

    The reference model is float32, in eval mode, with weights drawn from `seed`. Load the file with
    `AutoModelForCausalLM.from_pretrained(directory, gguf_file=path.name, dtype=torch.float32)`; its
    config then matches the reference's, except `rms_norm_eps` comes back rounded to float32.
    """
    tokens, merges, token_types = _tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=False,
        bos_token_id=tokens.index(BOS),
        eos_token_id=tokens.index(EOS),
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()

    # Fill every weight ourselves, seeded: the default init is tiny (std 0.02) and leaves the norms
    # at exactly 1, which would hide a swapped or mis-ordered tensor behind near-zero logits.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)

    # "gpt2" is llama.cpp's name for byte-level BPE (Llama 3 uses it too); transformers rebuilds a
    # GPT-2 style tokenizer from the tokens and merges, so any text encodes.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_add_bos_token(False)

    # gguf's own name table maps HF parameter names to llama.cpp's (blk.N.attn_q.weight, ...).
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for hf_name, tensor in model.state_dict().items():
        weight = tensor.numpy().astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            weight = _to_llama_cpp_rope_order(weight, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            weight = _to_llama_cpp_rope_order(weight, KV_HEADS)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))  # keeps the ".weight"
        assert gguf_name is not None, f"gguf has no name for {hf_name}"
        writer.add_tensor(gguf_name, np.ascontiguousarray(weight))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


if __name__ == "__main__":
    # Self-check: the file loads in transformers as the same model, and its tokenizer works.
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        _ = transformers.LlamaForCausalLM  # resolve the lazy import (seconds) so we time the write
        start = time.perf_counter()
        gguf_path, reference = write_tiny_llama_gguf(pathlib.Path(tmp))
        seconds = time.perf_counter() - start
        print(f"wrote {gguf_path.name}: {gguf_path.stat().st_size} bytes in {seconds:.3f}s")

        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
        ids = torch.tensor([[reference.config.bos_token_id, 5, 17, 42, 99, 256, 300, 7]])
        with torch.no_grad():
            diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
        print(f"{type(loaded).__name__}: max |logit diff| = {diff:.3g}")
        assert diff <= 1e-5, diff

        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        encoded = tokenizer("Hello world, the quick brown fox jumps over the lazy dog!")["input_ids"]
        print(f"{type(tokenizer).__name__}: {encoded} -> {tokenizer.decode(encoded)!r}")
        assert encoded and max(encoded) < reference.config.vocab_size
        assert len(tokenizer) == reference.config.vocab_size
        print("ok")
