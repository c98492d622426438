"""PEER kernel benchmark: mom_cli.modeling.peer.PeerLayer against PEER_pytorch, retrieval scaling, gather bandwidth.

Run from the repository root with the project's venv active:

    python bench/bench_peer.py                     # full run, CPU, float32
    python bench/bench_peer.py --quick             # smoke run (small sizes, one repetition)
    python bench/bench_peer.py --threads 1         # steadier CPU timings on a shared machine
    python bench/bench_peer.py --device cuda

Every figure is a ratio of two things measured in the same run; nothing is hard-coded and nothing
is asserted. Each measurement runs in its own subprocess (one at a time), so that peak memory is
that of one layer alone. Printed: the measurements, then a table of figures with goals.

    1. vs peer-pytorch   PEER_pytorch.PEER as the paper (non_competing_scores=False, softmax over
                         k, GELU, no biases) and PeerLayer as the paper (shared keys, query
                         BatchNorm, softmax, GELU), same d, N, h, k, d_key, input, loss;
                         one training step = forward + backward of mean(out^2), grads set to None
       forward+backward tokens/s, ours / theirs                        goal >= 2
       peak memory of a step above the built layer, ours / theirs      goal <= 0.5
         (parameter gradients, activations, transients; CPU: peak RSS - RSS before the first
          step, CUDA: max_memory_allocated - memory_allocated)
       the same less the parameter gradients' size (both hold the same dense N x d gradients:
         what remains is the activation memory the implementations differ in)  goal <= 0.5
       whole-process peak ratio as info
       the same two figures for PeerLayer(sparse_grad=True): the expert tables' gradients are
         sparse COO over the retrieved rows (as nn.Embedding(sparse=True); train with SGD or
         SparseAdam), so a step holds no dense N x d gradient
    2. scaling           inference forward time per token at N = 1024^2 over N = 128^2    goal <= 2
    3. bandwidth         bytes of expert rows the gathers read per second (input side: gathered
                         dot, output side: embedding_bag), at N = 1024^2 with the layer's own
                         retrieved indices, over the bytes per second of a large tensor copy
                         (dst.copy_(src) of 512 MiB)                                goal >= 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Figure, load_note, log, print_table, sync, time_call  # noqa: E402
from mom_cli.modeling.peer import PeerLayer, _gathered_dot  # noqa: E402

D, HEADS, TOPK, KEY_DIM = 512, 8, 16, 256  # d_key: full query width; PEER_pytorch's dim_key is one half


@dataclass
class Sizes:
    n_vs: int  # N against peer-pytorch
    batch: int
    seq: int
    n_small: int  # scaling: N small and large
    n_large: int
    reps: int
    rounds: int  # vs peer-pytorch: rounds of (theirs, ours) subprocesses


def pick_sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(64**2, 2, 128, 32**2, 128**2, 1, 1)
    return Sizes(512**2, 4, 512, 128**2, 1024**2, 3, 3)


def spread(times: list[float], per: float = 1.0, unit: str = "ms") -> str:
    """Median with the range, so that a noisy machine shows."""
    f = 1e3 if unit == "ms" else 1e6
    m = [t / per * f for t in times]
    return f"{statistics.median(m):.2f} {unit} [{min(m):.2f}-{max(m):.2f}]"


# ----------------------------------------------------------------------------- children


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(impl: str, n: int, device: str) -> torch.nn.Module:
    """theirs: PEER_pytorch as the paper; ours: PeerLayer as the paper; sparse: the same PeerLayer with
    sparse expert-table gradients (sparse_grad=True, as nn.Embedding(sparse=True))."""
    if impl == "theirs":
        from PEER_pytorch import PEER

        return PEER(
            D, heads=HEADS, num_experts=n, num_experts_per_head=TOPK, dim_key=KEY_DIM // 2, non_competing_scores=False
        ).to(device)
    return PeerLayer(
        D, n, HEADS, TOPK, KEY_DIM, activation="gelu", gate="softmax", in_bias=False, sparse_grad=impl == "sparse"
    ).to(device)


def grad_bytes(params: list[torch.nn.Parameter]) -> int:
    """Bytes the parameter gradients hold (a sparse gradient: its values and indices)."""
    total = 0
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            total += g._values().numel() * g._values().element_size() + g._indices().numel() * 8
        else:
            total += g.numel() * g.element_size()
    return total


def child_step(impl: str, n: int, batch: int, seq: int, reps: int, device: str) -> dict:
    """Training steps of one implementation: times and memory."""
    torch.manual_seed(0)
    layer = build(impl, n, device).train()
    x = torch.randn(batch, seq, D, device=device)
    params = list(layer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        layer(x).pow(2).mean().backward()

    sync(device)
    if device == "cuda":
        rest = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        rest = rss_mib()
    first = time_call(step, device)  # warm-up, and the memory peak of a step
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    grads = grad_bytes(params) / 2**20
    times = [time_call(step, device) for _ in range(reps)]
    return {
        "rest_mib": rest,
        "peak_mib": peak,
        "grads_mib": grads,
        "first_s": first,
        "times": times,
        "tokens": batch * seq,
    }


def child_forward(n: int, batch: int, seq: int, reps: int, device: str, bandwidth: bool) -> dict:
    """Inference forward per token; with bandwidth, also the gathers' and a copy's bytes per second."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    layer = build("ours", n, device).eval()
    built = time.perf_counter() - t0
    x = torch.randn(batch * seq, D, device=device)
    res: dict = {"build_s": built, "tokens": batch * seq}
    with torch.inference_mode():
        layer(x[:64])  # warm-up
        res["times"] = [time_call(lambda: layer(x), device) for _ in range(reps)]
        res["retrieve_times"] = [time_call(lambda: layer.retrieve(x), device) for _ in range(reps)]
        if bandwidth:
            scores, idx = layer.retrieve(x)
            idx = idx.flatten(1)
            coef = scores.softmax(-1).flatten(1)
            row_bytes = idx.numel() * D * layer.w_in.element_size()
            res["gather_bytes"] = row_bytes
            res["gather_in"] = [
                time_call(lambda: _gathered_dot(layer.w_in, idx, x, layer.chunk_size), device) for _ in range(reps + 1)
            ][1:]
            res["gather_out"] = [
                time_call(
                    lambda: torch.nn.functional.embedding_bag(idx, layer.w_out, per_sample_weights=coef, mode="sum"),
                    device,
                )
                for _ in range(reps + 1)
            ][1:]
            del layer
            src = torch.randn(128 * 2**20, device=device)  # 512 MiB
            dst = torch.empty_like(src)
            res["copy_bytes"] = src.numel() * src.element_size()
            res["copy"] = [time_call(lambda: dst.copy_(src), device) for _ in range(reps + 2)][1:]
    return res


def run_child(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--device", args.device, *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child {' '.join(extra)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- figures


def bench_vs_peer_pytorch(args: argparse.Namespace, s: Sizes) -> list[Figure]:
    common = ["--n", str(s.n_vs), "--batch", str(s.batch), "--seq", str(s.seq), "--reps", str(s.reps)]
    idle = run_child(args, "--child", "idle")
    # alternate the two in separate rounds, so that drift in machine speed hits both alike
    rounds = [
        {impl: run_child(args, "--child", "step", "--impl", impl, *common) for impl in ("theirs", "ours", "sparse")}
        for _ in range(s.rounds)
    ]
    r = rounds[0]
    for later in rounds[1:]:
        for impl in r:
            r[impl]["times"] += later[impl]["times"]
    tps = {k: v["tokens"] / statistics.median(v["times"]) for k, v in r.items()}
    extra = {k: v["peak_mib"] - v["rest_mib"] for k, v in r.items()}
    act = {k: extra[k] - v["grads_mib"] for k, v in r.items()}
    total = {k: v["peak_mib"] - (idle["peak_mib"] if args.device == "cpu" else 0.0) for k, v in r.items()}
    for k, v in r.items():
        log(
            f"vs-pp    {k:>6}: step {spread(v['times'])} (first {v['first_s'] * 1e3:.0f} ms), {tps[k]:.0f} tokens/s; "
            f"memory before the step {v['rest_mib']:.0f} MiB, peak {v['peak_mib']:.0f} MiB, step extra {extra[k]:.0f} MiB "
            f"= parameter gradients {v['grads_mib']:.0f} MiB + activations and transients {act[k]:.0f} MiB"
        )
    log(
        f"vs-pp    ours/theirs tokens/s: ratio of medians {tps['ours'] / tps['theirs']:.2f}, of best steps "
        f"{min(r['theirs']['times']) / min(r['ours']['times']):.2f}"
    )
    if args.device == "cpu":
        log(f"vs-pp    idle `import torch, PEER_pytorch, mom_cli.modeling.peer` peak RSS {idle['peak_mib']:.0f} MiB")
    speed, mem, mem_total = (
        tps["ours"] / tps["theirs"],
        extra["ours"] / extra["theirs"],
        total["ours"] / total["theirs"],
    )
    mem_act = act["ours"] / act["theirs"]
    speed_sp, mem_sp = tps["sparse"] / tps["theirs"], extra["sparse"] / extra["theirs"]
    n_txt = f"N={int(s.n_vs**0.5)}^2"
    return [
        Figure(f"fwd+bwd tokens/s ours/peer-pytorch ({n_txt})", speed, ">= 2", speed >= 2),
        Figure(f"step peak memory ours/peer-pytorch ({n_txt})", mem, "<= 0.5", mem <= 0.5),
        Figure("  same, less the parameter gradients (activations)", mem_act, "<= 0.5", mem_act <= 0.5),
        Figure("  whole-process peak (minus idle) ours/peer-pytorch", mem_total, "info", None),
        Figure("sparse table grads: fwd+bwd tokens/s / peer-pytorch", speed_sp, ">= 2", speed_sp >= 2),
        Figure("sparse table grads: step peak memory / peer-pytorch", mem_sp, "<= 0.5", mem_sp <= 0.5),
    ]


def bench_scaling_and_bandwidth(args: argparse.Namespace, s: Sizes) -> list[Figure]:
    common = ["--batch", str(s.batch), "--seq", str(s.seq), "--reps", str(s.reps)]
    small = run_child(args, "--child", "forward", "--n", str(s.n_small), *common)
    large = run_child(args, "--child", "forward", "--n", str(s.n_large), "--bandwidth", *common)
    per_tok = {}
    for name, n, r in (("small", s.n_small, small), ("large", s.n_large, large)):
        per_tok[name] = statistics.median(r["times"]) / r["tokens"]
        log(
            f"scaling  N={int(n**0.5)}^2: forward {spread(r['times'], r['tokens'], 'us')}/token, of which retrieval "
            f"{spread(r['retrieve_times'], r['tokens'], 'us')}/token (layer built in {r['build_s']:.1f} s)"
        )
    ratio = per_tok["large"] / per_tok["small"]

    gb = large["gather_bytes"]
    t_in, t_out = statistics.median(large["gather_in"]), statistics.median(large["gather_out"])
    copy_bw = large["copy_bytes"] / statistics.median(large["copy"])
    gather_bw = 2 * gb / (t_in + t_out)
    log(
        f"bandwidth copy {large['copy_bytes'] / 2**20:.0f} MiB: {spread(large['copy'])} = {copy_bw / 1e9:.2f} GB/s; "
        f"expert rows {gb / 2**20:.0f} MiB per side: gathered dot {spread(large['gather_in'])} = {gb / t_in / 1e9:.2f} GB/s, "
        f"embedding_bag {spread(large['gather_out'])} = {gb / t_out / 1e9:.2f} GB/s"
    )
    frac = gather_bw / copy_bw
    return [
        Figure(f"forward time/token N={int(s.n_large**0.5)}^2 / N={int(s.n_small**0.5)}^2", ratio, "<= 2", ratio <= 2),
        Figure("expert gather bytes/s / copy bytes/s", frac, ">= 0.5", frac >= 0.5),
        Figure("  input side (gathered dot) / copy", gb / t_in / copy_bw, "info", None),
        Figure("  output side (embedding_bag) / copy", gb / t_out / copy_bw, "info", None),
    ]


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and one repetition (smoke run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine",
    )
    # internal: one measurement in a subprocess
    p.add_argument("--child", choices=("idle", "step", "forward"), help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "theirs", "sparse"), default="ours", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def child_main(args: argparse.Namespace) -> None:
    if args.child == "idle":
        import PEER_pytorch  # noqa: F401

        res = {"peak_mib": peak_rss_mib()}
    elif args.child == "step":
        res = child_step(args.impl, args.n, args.batch, args.seq, args.reps, args.device)
    else:
        res = child_forward(args.n, args.batch, args.seq, args.reps, args.device, args.bandwidth)
    print(json.dumps(res))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    start = time.perf_counter()
    s = pick_sizes(args.quick)
    log(
        f"bench_peer: device {args.device}, float32, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
        f"d={D}, h={HEADS}, k={TOPK}, d_key={KEY_DIM}, sizes {json.dumps(s.__dict__)}"
    )
    log(f"start: {load_note()}")
    figures = bench_vs_peer_pytorch(args, s)
    figures += bench_scaling_and_bandwidth(args, s)
    print_table(figures)
    log(f"\nend: {load_note()}; wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
