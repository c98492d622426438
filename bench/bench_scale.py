"""Scale benchmark: `mom` on a checkpoint near the size of the machine, and prune's default speed.

Run from the repository root with the project's venv:

    python bench/bench_scale.py            # a synthetic 7B-shaped Llama in bf16 (13.5 GB of disk)
    python bench/bench_scale.py --small    # a 1.1B-shaped one (2.2 GB), minutes instead of an hour
    python bench/bench_scale.py --skip-smollm2 / --only-smollm2

1. A Llama with random bf16 weights is written shard by shard (one tensor in memory at a time)
   under a temporary directory, with a small BPE tokenizer trained on the calibration text.
2. Each step runs as its own process; its wall time, CPU time (a shared machine's wall time is
   noisy; CPU seconds / threads is what an idle machine would take) and peak RSS (its own maximum
   resident set, from getrusage of a wrapper's only child) are printed as a ratio to the
   checkpoint's size on disk:
       reference   transformers from_pretrained + save_pretrained (the usual way to copy a model)
       decompose   mom decompose (with its per-layer verification)   goal <= 0.1x
       info        mom info
       export      mom export --format hf                            goal <= 0.1x
       eval        mom eval, 64 tokens                               goal <= 1.1x
       prune       mom prune --metric loss, 256 calibration tokens   goal <= 0.35x
3. `mom prune --keep-mha 22 --keep-ffn` with its defaults on SmolLM2-135M (GGUF from bench/fetch.py,
   decomposed first), wall time; goal <= 10 minutes on 2 cores.

Everything is deleted afterwards unless --keep. Nothing is asserted; every figure is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # Llama-2-7B and TinyLlama-1.1B
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
    ),  # a smoke test of the script itself
}
GOALS = {"decompose": 0.1, "export": 0.1, "eval": 1.1, "prune": 0.35}
STEP_NAMES = ("reference", "decompose", "info", "export", "eval", "prune")
TOKENIZER_VOCAB = 4096

# Runs one command and prints its peak RSS: getrusage(RUSAGE_CHILDREN) of a process with one child.
_WRAP = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print('PEAK_RSS_KB', u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(rc)"
)


def log(msg: str) -> None:
    print(f"[bench_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_llama(directory: Path, shape: dict, text: Path) -> int:
    """A random bf16 Llama of `shape`, written tensor by tensor; returns its bytes on disk."""
    import torch
    from transformers import LlamaConfig

    from mom_cli.io.tensorio import PlannedTensor, write_safetensors

    cfg = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
    )
    cfg.save_pretrained(directory)
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, d),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
    gen = torch.Generator().manual_seed(0)

    def make(name: str, s: tuple) -> PlannedTensor:
        def produce() -> torch.Tensor:
            if len(s) == 1:
                return torch.ones(s, dtype=torch.bfloat16)
            return (torch.randn(s, generator=gen) * s[-1] ** -0.5).to(torch.bfloat16)

        return PlannedTensor(name, s, torch.bfloat16, produce)

    write_safetensors(directory, [make(n, s) for n, s in shapes.items()], 2 * 10**9)
    make_tokenizer(directory, text)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def make_tokenizer(directory: Path, text: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text.read_text(errors="replace")[:2_000_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        directory
    )


def timed(name: str, cmd: list[str], threads: int) -> dict:
    """Wall seconds and peak RSS of one command run in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    log(f"{name}: {' '.join(cmd)}")
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    usage = next((line.split()[1:] for line in p.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), ["0", "0"])
    if p.returncode:
        log(f"{name} failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-3:]}")
    return {
        "step": name,
        "seconds": seconds,
        "cpu_seconds": float(usage[1]),
        "peak_rss": int(usage[0]) * 1024,
        "ok": p.returncode == 0,
    }


def mom(*args: str) -> list[str]:
    return [sys.executable, "-m", "mom_cli", *args]


def scale_steps(work: Path, src: Path, text: Path, threads: int, only: set[str] | None = None) -> list[dict]:
    ref_code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto', trust_remote_code=False); "
        "m.save_pretrained(sys.argv[2])"
    )
    ckpt, out = work / "mom", work / "out"
    steps = [
        ("reference", [sys.executable, "-c", ref_code, str(src), str(work / "hf-copy")]),
        ("decompose", mom("decompose", str(src), "-o", str(ckpt))),
        ("info", mom("info", str(ckpt), "--json")),
        ("export", mom("export", str(ckpt), "-o", str(out / "export"))),
        (
            "eval",
            mom("eval", str(ckpt), "--data", str(text), "--max-tokens", "64", "--seq-len", "64", "--batch-size", "1"),
        ),
        (
            "prune",
            mom(
                "prune",
                str(ckpt),
                "--metric",
                "loss",
                "--calib-tokens",
                "256",
                "--seq-len",
                "128",
                "--keep-mha",
                "75%",
                "--keep-ffn",
                "--data",
                str(text),
                "-o",
                str(out / "pruned"),
                "--device",
                "cpu",
            ),
        ),
    ]
    rows = []
    for name, cmd in steps:
        if only and name not in only:
            continue
        out.mkdir(exist_ok=True)
        rows.append(timed(name, cmd, threads))
        shutil.rmtree(work / "hf-copy", ignore_errors=True)
        shutil.rmtree(out)
    return rows


def smollm2_prune(work: Path, cache: Path, calib: Path, threads: int) -> dict:
    from bench.fetch import smollm2_gguf

    gguf = smollm2_gguf(cache)
    ckpt = work / "smollm2-mom"
    timed("smollm2 decompose", mom("decompose", str(gguf), "-o", str(ckpt)), threads)
    row = timed(
        "smollm2 prune (defaults)",
        mom(
            "prune",
            str(ckpt),
            "--keep-mha",
            "22",
            "--keep-ffn",
            "--data",
            str(calib),
            "-o",
            str(work / "smollm2-pruned"),
            "--device",
            "cpu",
        ),
        threads,
    )
    return row


def print_table(rows: list[dict], size: int) -> None:
    print(f"checkpoint: {size / 1e9:.2f} GB of safetensors (bf16)")
    print(f"{'step':<26}{'wall s':>9}{'CPU s':>9}{'peak RSS GB':>13}{'RSS/ckpt':>10}{'goal':>9}  result")
    for r in rows:
        goal, ratio = GOALS.get(r["step"]), r["peak_rss"] / size
        result = "FAILED" if not r["ok"] else "-" if goal is None else "MET" if ratio <= goal else "NOT MET"
        print(
            f"{r['step']:<26}{r['seconds']:>9.1f}{r['cpu_seconds']:>9.1f}{r['peak_rss'] / 1e9:>13.2f}{ratio:>9.3f}x"
            f"{'<= ' + str(goal) if goal else '':>9}  {result}"
        )


def main(argv: list[str] | None = None) -> int:
    from bench.fetch import DEFAULT_CACHE, pydocs_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a 1.1B shape instead of 7B")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="any shape (overrides --small)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="bench/fetch.py's cache (GGUF, text)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--only-smollm2", action="store_true")
    p.add_argument("--steps", default=None, help=f"comma-separated, of {', '.join(STEP_NAMES)} (decompose always runs)")
    args = p.parse_args(argv)
    calib, _ = pydocs_text(args.cache)
    work = Path(tempfile.mkdtemp(prefix="mom-bench-scale-", dir=args.dir))
    results: dict = {}
    try:
        if not args.only_smollm2:
            name = args.shape or ("1b" if args.small else "7b")
            shape = SHAPES[name]
            log(f"writing a {name}-shaped bf16 Llama under {work}")
            start = time.perf_counter()
            size = write_llama(work / "src", shape, calib)
            log(f"written: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f}s")
            only = set(args.steps.split(",")) | {"decompose"} if args.steps else None  # the others read its output
            rows = scale_steps(work, work / "src", calib, args.threads, only)
            print_table(rows, size)
            results["scale"] = {"checkpoint_bytes": size, "shape": shape, "rows": rows}
        if not args.skip_smollm2:
            row = smollm2_prune(work, args.cache, calib, args.threads)
            print(
                f"SmolLM2-135M: mom prune --keep-mha 22 --keep-ffn (defaults: greedy) took {row['seconds'] / 60:.1f} min "
                f"wall, {row['cpu_seconds'] / 60:.1f} min of CPU, on {args.threads} threads (goal <= 10 min)"
                f"{'' if row['ok'] else ' FAILED'}; the load average was {os.getloadavg()[0]:.1f}"
            )
            results["smollm2_prune"] = row
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
