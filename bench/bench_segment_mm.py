"""The routed step's segment matmul on a GPU: the Triton kernel's tile configurations against
torch._grouped_mm and one dense matmul of the same rows, kernel time only.

Run from the repository root on a CUDA machine with the project's venv active:

    python bench/bench_segment_mm.py                 # SmolLM2-135M's projections, 31 groups
    python bench/bench_segment_mm.py --rows 1024,8192

Each call is captured 20 times in a CUDA graph and the graph replayed, so launches cost nothing
and the figure is what the kernels take (the eager routed step at these sizes is bound by the CPU
that launches them; see mom_cli/modeling/segment_kernel.py). Rows are spread over 31 groups by a
seeded multinomial draw, as a routed step of 30 modules and a zero group spreads them. The first
Triton column is `tile_sizes`' choice; the others are the configurations it was chosen from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cuda_graph, log  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (out, in)
CONFIGS = [
    None,
    (32, 128, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (64, 128, 64, 4, 4),
    (64, 128, 128, 4, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 8, 3),
]


def graphed_us(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds per call of fn, from replays of one CUDA graph of `calls` calls."""
    replay = cuda_graph(lambda: [fn() for _ in range(calls)])
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * calls) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows", default="1024,2048", help="routed rows per step, comma-separated (4x256 tokens, top-1: 1024)"
    )
    p.add_argument("--groups", type=int, default=31)
    args = p.parse_args()
    from mom_cli.modeling import segment_kernel as sk

    if not torch.cuda.is_available() or sk.triton is None:
        sys.exit("bench_segment_mm: needs a CUDA GPU and Triton")
    torch.manual_seed(0)
    dev, dt, g = "cuda", torch.bfloat16, args.groups
    log(f"bench_segment_mm: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {g} groups")
    log("triton configurations (BM, BN, BK, warps, stages): " + ", ".join(str(c or "tile_sizes") for c in CONFIGS))
    for rows in (int(r) for r in args.rows.split(",")):
        offs = torch.distributions.Multinomial(rows, torch.ones(g)).sample().int().cumsum(0).int().to(dev)
        for name, (n, k) in SHAPES.items():
            a, w = torch.randn(rows, k, device=dev, dtype=dt), torch.randn(g, n, k, device=dev, dtype=dt)
            ref = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
            err = (sk.segment_mm(a, w, offs, True).float() - ref.float()).abs().max().item()
            base = graphed_us(lambda: torch._grouped_mm(a, w.transpose(1, 2), offs=offs))
            dense = graphed_us(lambda: a @ w[0].T)
            times = [graphed_us(lambda c=c: sk.segment_mm(a, w, offs, True, c)) for c in CONFIGS]
            log(
                f"rows {rows:5d} {name:8} grouped_mm {base:5.1f} us, one dense mm {dense:5.1f} us; "
                f"triton {sk.tile_sizes(rows, g, n, k)} {times[0]:5.1f} us ({base / times[0]:.2f}x), "
                f"max |diff| {err:.3g}; all: " + " ".join(f"{t:.1f}" for t in times)
            )


if __name__ == "__main__":
    main()
