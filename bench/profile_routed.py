"""Where a routed forward's (or training step's) time goes, kernel by kernel, against the dense model.

Run from the repository root with the project's venv active, after bench_routed.py prepared its plans:

    python bench/profile_routed.py --device cuda --dtype bfloat16              # one GPU, H=15,K=1 forward
    python bench/profile_routed.py --device cuda --dtype bfloat16 --plan 15x2 --part train
    python bench/profile_routed.py --device cuda --dtype bfloat16 --part train --graphs   # replays of CUDA graphs
    python bench/profile_routed.py --threads 1                                 # CPU (kernel time is CPU time there)

SmolLM2-135M decomposed with --depth H --top-k K (router heads spread as in bench_routed.py), and
the `transformers` dense model: one forward (or training step) of 4 x 256 tokens of real text each,
under torch.profiler, after warm-up. For each side: wall time, kernel time and kernel launches, then
the kernels that took the most time, with their counts. A GPU side whose wall time is far above its
kernel time is bound by launches (Python and the CPU side), not by the GPU. With --graphs, each
side is captured as one CUDA graph and a replay is profiled: the kernels bench_routed.py --graphs
times, with no launch cost between them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_foundation import DTYPES, text_tokens  # noqa: E402
from bench.bench_routed import forward_step, mom_dir, prepare_plan, spread_routers, train_step, training  # noqa: E402
from bench.common import HF_DIR, bench_parser, cuda_graph, log, prepare_hf, sync  # noqa: E402

_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def profile_side(name: str, fn, dev: str, rows: int) -> None:
    """Warm up, time 5 runs, then profile one and log its kernel table."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    sync(dev)
    wall = (time.perf_counter() - t0) / 5
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(dev)
    events = prof.key_averages()
    if dev != "cuda":
        log(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))
        log(f"{name}: wall {wall * 1e3:.2f} ms")
        return
    launches = sum(e.count for e in events if e.key in _LAUNCHES)
    # the kernels themselves: the aten ops that launched them carry the same time once more
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels)
    log(f"\n{name}: wall {wall * 1e3:.2f} ms, kernel time {total / 1e3:.2f} ms, {launches} kernel launches")
    log(f"{'us':>9} {'share':>6} {'count':>6} {'us each':>8}  kernel")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        t = e.self_device_time_total
        log(f"{t:9.0f} {t / total:6.1%} {e.count:6d} {t / e.count:8.1f}  {e.key[:110]}")


def main() -> None:
    p = bench_parser(__doc__, "64 tokens")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--plan", default="15x1", help="HxK (default 15x1)")
    p.add_argument("--part", choices=("forward", "train"), default="forward")
    p.add_argument("--rows", type=int, default=25, help="rows of each kernel table")
    p.add_argument("--graphs", action="store_true", help="profile a replay of each side captured as one CUDA graph")
    args = p.parse_args()
    if args.graphs and args.device != "cuda":
        p.error("--graphs needs --device cuda")
    from transformers import AutoModelForCausalLM

    import mom_cli

    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = args.device, DTYPES[args.dtype]
    h, k = (int(v) for v in args.plan.split("x"))
    prepare_plan(prepare_hf(), h, k)
    mom = mom_cli.load(mom_dir(h, k), dtype=dtype).to(dev).eval()
    spread_routers(mom)
    hf = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=dtype).to(dev).eval()
    batch, seq = (1, 64) if args.quick else (4, 256)
    x = text_tokens(batch * seq).view(batch, seq).to(dev)
    log(f"profile: H={h},K={k} {args.part}, {batch}x{seq} tokens, {args.dtype} on {dev}, torch {torch.__version__}")
    graphed = cuda_graph if args.graphs else lambda fn: fn
    how = ", replayed from a CUDA graph" if args.graphs else ""
    for name, model in ((f"MoM H={h},K={k}", mom), ("dense", hf)):
        if args.part == "train":
            with training(model):
                profile_side(f"{name} training step{how}", graphed(train_step(model, x)), dev, args.rows)
        else:
            profile_side(f"{name} forward{how}", graphed(forward_step(model, x)), dev, args.rows)


if __name__ == "__main__":
    main()
