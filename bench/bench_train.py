"""Training benchmark: `train-routers --train all` against plain `transformers` training of the source.

Run from the repository root with the project's venv active:

    python bench/bench_train.py                         # CPU, float32 (about 10 minutes on 2 shared cores)
    python bench/bench_train.py --quick                 # smoke run: short sequences, few steps
    python bench/bench_train.py --device cuda           # GPU: bf16 autocast, fused AdamW

The model is SmolLM2-135M-Instruct (prepared as in bench_foundation.py): the source in transformers
(LlamaForCausalLM) and its exact MoM decomposition (identity routing, the same computation). Both
train every parameter with AdamW on the same token blocks of the Python docs, with the same batch,
sequence length, learning rate, autocast dtype and device:

    transformers  model(input_ids, labels) -> loss.backward() -> clip -> AdamW.step()
    mom           mom_cli.training.train.train(..., TrainOptions(train="all")): the loop `mom train-routers` runs

Each side runs in its own subprocess, one after the other, so that its peak memory is its own.
Printed: training tokens/s (median over the steps after the first) as a ratio mom / transformers,
goal >= 0.85 on a GPU (CPU figures are informational), and the peak memory ratio (GPU: peak
allocated; CPU: peak RSS of the process). Nothing is hard-coded and nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    HF_DIR,
    MOM_DIR,
    Figure,
    bench_parser,
    load_note,
    log,
    prepare_hf,
    prepare_mom,
    print_table,
    sync,
)
from bench.fetch import pydocs_text  # noqa: E402

LR = 1e-4


def parse_args() -> argparse.Namespace:
    p = bench_parser(__doc__, "short sequences and few steps")
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per side (default: cpu 6, quick 3, cuda 30)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: cpu 2, cuda 8")
    p.add_argument("--seq-len", type=int, default=None, help="default: cpu 256, quick 64, cuda 1024")
    p.add_argument("--side", choices=("hf", "mom"), default=None, help=argparse.SUPPRESS)  # one side, in a subprocess
    return p.parse_args()


def sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    cuda = args.device == "cuda"
    steps = args.steps or (3 if args.quick else 30 if cuda else 6)
    batch = args.batch_size or (8 if cuda else 2)
    seq = args.seq_len or (64 if args.quick else 1024 if cuda else 256)
    return steps, batch, seq


def dtype_name(device: str) -> str:
    return "bf16" if device == "cuda" else "fp32"


# ----------------------------------------------------------------------------- one side (subprocess)


def run_hf(data: Path, steps: int, batch: int, seq: int, device: str) -> list[float]:
    """Plain transformers training on the blocks train-routers reads; tokens/s of each step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mom_cli.io import tokencache
    from mom_cli.training import distributed
    from mom_cli.training.train import Batches

    tok = AutoTokenizer.from_pretrained(HF_DIR)
    blocks = tokencache.open_blocks(tokencache.ensure(str(data), tok), seq)
    order = Batches(blocks, batch, 1, distributed.Dist(), seed=0)  # the same blocks, step by step
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True if device == "cuda" else None)
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else torch.autocast(device, enabled=False)
    rates = []
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        for x in order.micro_batches(step):
            x = x.to(device)
            with amp:
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        rates.append(batch * seq / (time.perf_counter() - t0))
    return rates


def run_mom(data: Path, heldout: Path, steps: int, batch: int, seq: int, device: str) -> list[float]:
    from mom_cli.training.train import TrainOptions, train

    with tempfile.TemporaryDirectory(prefix="mom-bench-train-") as tmp:
        out = Path(tmp) / "out"
        opts = TrainOptions(
            data=str(data),
            train="all",
            steps=steps,
            batch_size=batch,
            seq_len=seq,
            lr=LR,
            device=device,
            dtype=dtype_name(device),
            eval_data=str(heldout),
            eval_tokens=seq,
        )
        train(MOM_DIR, out, opts)  # held-out text apart: the training blocks are exactly transformers' ones
        lines = [json.loads(x) for x in (out / "train_metrics.jsonl").read_text().splitlines()]
    return [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]


def one_side(args: argparse.Namespace) -> None:
    """Child process: train one side, print its per-step tokens/s and peak memory as JSON."""
    import mom_cli.console as console

    console.QUIET = True
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, batch, seq = sizes(args)
    calib, heldout = pydocs_text()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = (
        run_hf(calib, steps, batch, seq, args.device)
        if args.side == "hf"
        else run_mom(calib, heldout, steps, batch, seq, args.device)
    )
    peak = (
        torch.cuda.max_memory_allocated()
        if args.device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print(json.dumps({"rates": rates, "peak_bytes": peak}))


# ----------------------------------------------------------------------------- the comparison


def measure(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--device", args.device]
    for flag, value in (
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--seq-len", args.seq_len),
        ("--threads", args.threads),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    if args.quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    rate = statistics.median(out["rates"][1:] or out["rates"])  # the first step warms up
    log(
        f"{side:>4}: {rate:.1f} tokens/s (median of steps 2..{len(out['rates'])}: "
        f"{', '.join(f'{r:.0f}' for r in out['rates'])}), peak memory {out['peak_bytes'] / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return {"rate": rate, "peak": out["peak_bytes"]}


def main() -> None:
    args = parse_args()
    if args.side:
        one_side(args)
        return
    start = time.perf_counter()
    steps, batch, seq = sizes(args)
    log(
        f"bench_train: device {args.device}, autocast {dtype_name(args.device)}, torch {torch.__version__}, "
        f"{steps} steps of batch {batch} x {seq} tokens per side, --train all, AdamW lr {LR}"
    )
    log(f"start: {load_note()}")
    prepare_mom(prepare_hf())
    pydocs_text()
    hf = measure("hf", args)
    mom = measure("mom", args)
    speed = mom["rate"] / hf["rate"]
    memory = mom["peak"] / hf["peak"]
    kind = "peak allocated" if args.device == "cuda" else "peak RSS"
    on_gpu = args.device == "cuda"
    figures = [
        Figure(
            f"train tokens/s mom / transformers ({args.device})",
            speed,
            ">= 0.85 (GPU)",
            speed >= 0.85 if on_gpu else None,
        ),
        Figure(f"{kind} mom / transformers ({args.device})", memory, "informational", None),
    ]
    print_table(figures)
    if not on_gpu:
        log("CPU figures: the goal is set for a GPU; on CPU they are informational.")
    log(f"end: {load_note()}; wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
