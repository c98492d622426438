"""Routed runtime benchmark: does compute saved by routing become time saved?

Run from the repository root with the project's venv active:

    python bench/bench_routed.py --threads 1              # CPU, float32
    python bench/bench_routed.py --quick                  # smoke run (small sizes, one plan)
    python bench/bench_routed.py --device cuda --dtype bfloat16

SmolLM2-135M (the GGUF from bench/fetch.py, dequantised once by bench_foundation) is decomposed
into one routed block per plan, and the router heads are set to seeded random values so that the
tokens spread over the modules (and SKIP), as they do after training. Every figure is measured
against the `transformers` dense model in the same run, alternating the two:

    forward     efficiency = (MoM FLOPs / dense FLOPs) / (MoM time / dense time), 4x256 tokens
    generate    greedy cached decoding after the prompt (one token per step),
                (MoM tokens/s / dense tokens/s) * (MoM FLOPs / dense FLOPs)
    train step  forward + backward of the language-model loss (every parameter trainable), same
                efficiency as forward (a training step costs 3x the forward FLOPs on both sides)

With --graphs (CUDA), the forward and the training step are also timed with each side captured
as one CUDA graph and replayed, so that neither pays for kernel launches from Python; --compile
first compiles both models with torch.compile (inductor), so that both fuse their small kernels.

FLOPs per token are `mom info`'s (routers included; top-K modules at every step, so SKIP choices
make the MoM's count an upper bound: the share of SKIP choices is printed beside it). Goals: forward
>= 0.9 (CPU) or >= 0.8 (GPU), generation >= 0.8, training >= 0.8.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_foundation import DTYPES, spread, text_tokens  # noqa: E402
from bench.common import (  # noqa: E402
    HF_DIR,
    Figure,
    bench_parser,
    cuda_graph,
    load_note,
    log,
    paired_times,
    prepare_hf,
    print_table,
)

PLANS = ((15, 1), (15, 2), (30, 2))  # (H, K)


@dataclass
class Sizes:
    batch: int
    seq_len: int
    reps: int
    train_batch: int
    train_seq: int
    prompt: int
    new_tokens: int
    gen_reps: int


def pick_sizes(quick: bool, device: str) -> Sizes:
    if quick:
        return Sizes(1, 64, 2, 1, 64, 8, 8, 1)
    if device == "cuda":
        return Sizes(4, 256, 10, 4, 256, 32, 64, 3)
    return Sizes(4, 256, 3, 2, 256, 32, 24, 2)


def mom_dir(h: int, k: int) -> Path:
    return HF_DIR.parent / f"smollm2-135m-mom-h{h}k{k}"


def prepare_plan(src: Path, h: int, k: int) -> Path:
    """`mom decompose --depth H --top-k K`, once per plan (redone when mom_cli is newer)."""
    out = mom_dir(h, k)
    cfg = out / "config.json"
    newest = max(p.stat().st_mtime for p in (ROOT / "mom_cli").rglob("*.py"))
    if not cfg.is_file() or cfg.stat().st_mtime < newest:
        log(f"prepare: mom decompose --depth {h} --top-k {k} -> {out.name}")
        cmd = [
            sys.executable,
            "-m",
            "mom_cli",
            "decompose",
            str(src),
            "-o",
            str(out),
            "--depth",
            str(h),
            "--top-k",
            str(k),
            "--force",
            "-q",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def spread_routers(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random router heads: every token's route depends on the token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.model.blocks:
            for router in (block.mha_router, block.ffn_router):
                w = router.head.weight
                w.copy_(torch.randn(w.shape, generator=g).to(w.dtype))


def dense_flops(config, seq_len: int) -> int:
    """FLOPs per token of the dense model, counted as `mom info` counts a MoM: 2 per weight of
    every layer and the head, plus 4 * seq * heads * head_dim per attention call."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d, f, nh, kv = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
    layer = d * nh * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
    return (
        2 * (config.num_hidden_layers * layer + config.vocab_size * d)
        + 4 * seq_len * nh * hd * config.num_hidden_layers
    )


def mom_flops(model, seq_len: int) -> int:
    from mom_cli.analysis.info import summary

    return summary(model.config, seq_len=seq_len)["flops_per_token"]


def skip_share(model, x: torch.Tensor) -> tuple[float, float]:
    """(share of routing choices that are SKIP, largest share one module gets at one step)."""
    from mom_cli import RoutingRecorder

    model.model.recorder = rec = RoutingRecorder()
    with torch.inference_mode():
        model(input_ids=x, use_cache=False)
    model.model.recorder = None
    counts = [c for c, _ in rec.stats.values()]
    total = sum(c.sum().item() for c in counts)
    return sum(c[-1].item() for c in counts) / total, max((c[:-1].max() / c.sum()).item() for c in counts)


def efficiency(flops_ratio: float, t_mom: list[float], t_hf: list[float]) -> tuple[float, float]:
    time_ratio = statistics.median(t_mom) / statistics.median(t_hf)
    return time_ratio, flops_ratio / time_ratio


def bench_forward(hf, mom, x: torch.Tensor, reps: int, device: str) -> tuple[list[float], list[float]]:
    return paired_times(forward_step(mom, x), forward_step(hf, x), reps, device)


def forward_step(model, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(input_ids=x, use_cache=False).logits

    return run


def train_step(model, x: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of the language-model loss, every parameter trainable."""

    def run():
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()

    return run


@contextmanager
def training(*models):
    for m in models:
        m.train()
    try:
        yield
    finally:
        for m in models:
            m.zero_grad(set_to_none=True)
            m.eval()


def bench_train(hf, mom, x: torch.Tensor, reps: int, device: str) -> tuple[list[float], list[float]]:
    with training(hf, mom):
        return paired_times(train_step(mom, x), train_step(hf, x), reps, device)


def bench_graphed(hf, mom, x: torch.Tensor, reps: int, step) -> tuple[list[float], list[float]] | None:
    """`step` of each model captured as one CUDA graph, replays timed in pairs. A side whose capture
    fails (a host read, an uncapturable kernel) is logged and timed eagerly instead; None when the
    MoM's capture fails."""
    replays = {}
    for name, model in (("MoM", mom), ("dense", hf)):
        try:
            replays[name] = cuda_graph(step(model, x))
        except Exception as e:
            log(f"{name} CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            torch.cuda.synchronize()
            log(f"where {name} syncs with the host: {first_sync(step(model, x))}")
    if "MoM" not in replays:
        return None
    if "dense" not in replays:
        log("the dense model runs eagerly in this comparison")
    try:
        return paired_times(replays["MoM"], replays.get("dense", step(hf, x)), reps, "cuda")
    finally:
        replays.clear()
        torch.cuda.empty_cache()


def first_sync(fn) -> str:
    """The source line of fn's first host sync (torch's sync debug mode raises there)."""
    import traceback

    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none seen"
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "site-packages/torch" not in f.filename]
        return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in reversed(frames[-4:]))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def compiled(model):
    """The model with its forward compiled by inductor (static shapes), as a user would."""
    model.forward = torch.compile(model.forward, dynamic=False)
    return model


@torch.inference_mode()
def bench_generate(hf, mom, prompt: torch.Tensor, new: int, reps: int, device: str) -> tuple[float, float, bool]:
    """Cached decoding speed, without the prompt: (new - 1) tokens over the time of generating
    `new` tokens minus the time of generating 1 (which is the prefill). Returns (MoM tokens/s,
    dense tokens/s, whether both generated `new` tokens)."""
    outs = {}

    def gen(model, name, n):
        kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}

        def run():
            outs[name] = model.generate(prompt, use_cache=True, **kw)

        return run

    t_mom, t_hf = paired_times(gen(mom, "mom", new), gen(hf, "hf", new), reps, device)
    full = all(o.shape[1] == prompt.shape[1] + new for o in outs.values())
    p_mom, p_hf = paired_times(gen(mom, "mom1", 1), gen(hf, "hf1", 1), reps, device)
    rate = lambda t, p: (new - 1) / max(statistics.median(t) - statistics.median(p), 1e-9)
    return rate(t_mom, p_mom), rate(t_hf, p_hf), full


def parse_plans(text: str) -> tuple[tuple[int, int], ...]:
    """'15x1,30x2' -> ((15, 1), (30, 2))."""
    return tuple(tuple(int(v) for v in part.split("x")) for part in text.split(","))  # type: ignore[misc]


def main() -> None:
    p = bench_parser(__doc__, "one plan, small sizes")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--plans", type=parse_plans, default=PLANS, help="HxK,... (default: 15x1,15x2,30x2)")
    p.add_argument("--parts", default="forward,train,generate", help="which timings (comma-separated)")
    p.add_argument("--graphs", action="store_true", help="also time each side replayed from a CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile both models first (no generation)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import mom_cli

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.graphs and args.device != "cuda":
        p.error("--graphs needs --device cuda")
    parts = set(args.parts.split(",")) - ({"generate"} if args.compile else set())
    if args.compile and args.device == "cuda":
        # torch 2.11's inductor gave cuDNN attention a query whose last dimension was not
        # contiguous (a cuDNN frontend error at run time); both sides use the other SDPA kernels.
        torch.backends.cuda.enable_cudnn_sdp(False)
    sizes = pick_sizes(args.quick, args.device)
    dtype, dev = DTYPES[args.dtype], args.device
    log(
        f"bench_routed: device {dev}, dtype {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, sizes {json.dumps(sizes.__dict__)}"
        + (", torch.compile on both sides" if args.compile else "")
    )
    log(f"start: {load_note()}")
    src = prepare_hf()
    plans = args.plans[:1] if args.quick else args.plans
    dirs = {plan: prepare_plan(src, *plan) for plan in plans}
    hf = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=dtype).to(dev).eval()
    if args.compile:
        hf = compiled(hf)
    ids = text_tokens(sizes.batch * sizes.seq_len)
    x = ids.view(sizes.batch, sizes.seq_len).to(dev)
    xt = ids[: sizes.train_batch * sizes.train_seq].view(sizes.train_batch, sizes.train_seq).to(dev)
    prompt = ids[: sizes.prompt][None].to(dev)
    gen_seq = sizes.prompt + sizes.new_tokens // 2  # the mean attention length while decoding
    goal_fwd = 0.8 if dev == "cuda" else 0.9
    nan = float("nan")
    figures, rows, graph_rows = [], [], []
    for (h, k), path in dirs.items():
        mom = mom_cli.load(path, dtype=dtype).to(dev).eval()
        spread_routers(mom)
        skip, top = skip_share(mom, x)
        if args.compile:
            mom = compiled(mom)
        name = f"H={h},K={k}"
        log(f"timing {name}: {load_note()}; SKIP share {skip:.3f}, busiest module-step share {top:.3f}")
        fr = mom_flops(mom, sizes.seq_len) / dense_flops(hf.config, sizes.seq_len)
        row = {"fr": fr}
        if "forward" in parts:
            t_mom, t_hf = bench_forward(hf, mom, x, sizes.reps, dev)
            row["tr"], row["eff"] = efficiency(fr, t_mom, t_hf)
            log(
                f"forward  {name}: MoM {spread(t_mom)}, dense {spread(t_hf)}; FLOPs ratio {fr:.3f}, time ratio {row['tr']:.3f}"
            )
            figures.append(Figure(f"forward efficiency {name}", row["eff"], f">= {goal_fwd}", row["eff"] >= goal_fwd))
        if "train" in parts:
            tm, th = bench_train(hf, mom, xt, sizes.reps, dev)
            row["tr_t"], row["eff_t"] = efficiency(fr, tm, th)
            log(f"train    {name}: MoM {spread(tm)}, dense {spread(th)}; time ratio {row['tr_t']:.3f}")
            figures.append(Figure(f"train-step efficiency {name}", row["eff_t"], ">= 0.8", row["eff_t"] >= 0.8))
        if "generate" in parts:
            fr_g = mom_flops(mom, gen_seq) / dense_flops(hf.config, gen_seq)
            tps_mom, tps_hf, full = bench_generate(hf, mom, prompt, sizes.new_tokens, sizes.gen_reps, dev)
            row["gen"], row["eff_g"] = tps_mom / tps_hf, tps_mom / tps_hf * fr_g
            log(
                f"generate {name}: MoM {tps_mom:.1f} tok/s, dense {tps_hf:.1f} tok/s; FLOPs ratio {fr_g:.3f}"
                + ("" if full else " (a model stopped early)")
            )
            figures.append(Figure(f"generation efficiency {name}", row["eff_g"], ">= 0.8", row["eff_g"] >= 0.8))
        rows.append((name, *(row.get(c, nan) for c in ("fr", "tr", "eff", "tr_t", "eff_t", "gen", "eff_g")), skip))
        if args.graphs:
            graph_rows.append((name, fr, *graphed_figures(hf, mom, x, xt, fr, sizes.reps, parts, name, figures)))
        del mom
    log("")
    log(
        "| plan | FLOPs ÷ dense | fwd time ÷ dense | fwd eff. | train time ÷ dense | train eff. | gen tok/s ÷ dense | gen eff. | SKIP share |"
    )
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |")
    if graph_rows:
        log("\nCUDA graphs on both sides:\n")
        log("| plan | FLOPs ÷ dense | fwd time ÷ dense | fwd eff. | train time ÷ dense | train eff. |")
        log("|---|---|---|---|---|---|")
        for r in graph_rows:
            log(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |")
    print_table(figures)
    log(f"\nend: {load_note()}; wall time {time.perf_counter() - start:.1f} s")


def graphed_figures(hf, mom, x, xt, fr: float, reps: int, parts: set[str], name: str, figures: list) -> list[float]:
    """Forward and training step with both sides replayed from CUDA graphs: [time ratio, efficiency] each."""
    out = []
    for part, step, inputs, label in (
        ("forward", forward_step, x, "forward"),
        ("train", train_step, xt, "train-step"),
    ):
        times = None
        if part in parts:
            if part == "train":
                with training(hf, mom):
                    times = bench_graphed(hf, mom, inputs, reps, step)
            else:
                times = bench_graphed(hf, mom, inputs, reps, step)
        if times is None:
            out += [float("nan")] * 2
            continue
        tr, eff = efficiency(fr, *times)
        log(f"graphed {part:8} {name}: MoM {spread(times[0])}, dense {spread(times[1])}; time ratio {tr:.3f}")
        figures.append(Figure(f"{label} efficiency {name}, CUDA graphs", eff, ">= 0.8", eff >= 0.8))
        out += [tr, eff]
    return out


if __name__ == "__main__":
    main()
