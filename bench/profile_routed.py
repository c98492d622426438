"""Where a routed forward's time goes: wall time against kernel time, and the number of launches.

Run from the repository root with the project's venv active, after bench_routed.py prepared its plans:

    python bench/profile_routed.py --device cuda --dtype bfloat16      # one GPU
    python bench/profile_routed.py --threads 1                         # CPU (kernel time is CPU time there)

SmolLM2-135M decomposed with --depth 15 --top-k 1 (router heads spread as in bench_routed.py), one
forward of 4 x 256 tokens of real text under torch.profiler, after warm-up. A GPU forward whose wall
time is far above its kernel time is bound by launches (Python and the CPU side), not by the GPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_foundation import DTYPES, text_tokens  # noqa: E402
from bench.bench_routed import mom_dir, prepare_plan, spread_routers  # noqa: E402
from bench.common import bench_parser, log, prepare_hf, sync  # noqa: E402


def main() -> None:
    p = bench_parser(__doc__, "64 tokens")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--rows", type=int, default=14, help="rows of the profiler's tables")
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile

    import mom_cli

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    prepare_plan(prepare_hf(), 15, 1)
    model = mom_cli.load(mom_dir(15, 1), dtype=DTYPES[args.dtype]).to(dev).eval()
    spread_routers(model)
    batch, seq = (1, 64) if args.quick else (4, 256)
    x = text_tokens(batch * seq).view(batch, seq).to(dev)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=x, use_cache=False)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(5):
            model(input_ids=x, use_cache=False)
        sync(dev)
        wall = (time.perf_counter() - t0) / 5
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=activities) as prof:
            model(input_ids=x, use_cache=False)
            sync(dev)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3 if dev == "cuda" else None
    sort_by = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
    if dev == "cuda":
        log(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows // 2, max_name_column_width=40))
    log(
        f"routed forward H=15,K=1, {batch}x{seq} tokens, {args.dtype} on {dev}: wall {wall * 1e3:.1f} ms"
        + (f", kernel time {kernel_ms:.1f} ms, {launches} kernel launches" if kernel_ms is not None else "")
    )


if __name__ == "__main__":
    main()
