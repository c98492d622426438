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
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_foundation import DTYPES, spread, text_tokens  # noqa: E402
from bench.common import (  # noqa: E402
    HF_DIR,
    Figure,
    bench_parser,
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


@torch.inference_mode()
def bench_forward(hf, mom, x: torch.Tensor, reps: int, device: str) -> tuple[list[float], list[float]]:
    return paired_times(
        lambda: mom(input_ids=x, use_cache=False).logits, lambda: hf(input_ids=x, use_cache=False).logits, reps, device
    )


def bench_train(hf, mom, x: torch.Tensor, reps: int, device: str) -> tuple[list[float], list[float]]:
    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=x, labels=x, use_cache=False).loss.backward()

        return run

    for m in (hf, mom):
        m.train()
    try:
        return paired_times(step(mom), step(hf), reps, device)
    finally:
        for m in (hf, mom):
            m.zero_grad(set_to_none=True)
            m.eval()


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


def main() -> None:
    p = bench_parser(__doc__, "one plan, small sizes")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import mom_cli

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = pick_sizes(args.quick, args.device)
    dtype, dev = DTYPES[args.dtype], args.device
    log(
        f"bench_routed: device {dev}, dtype {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, sizes {json.dumps(sizes.__dict__)}"
    )
    log(f"start: {load_note()}")
    src = prepare_hf()
    plans = PLANS[:1] if args.quick else PLANS
    dirs = {plan: prepare_plan(src, *plan) for plan in plans}
    hf = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=dtype).to(dev).eval()
    ids = text_tokens(sizes.batch * sizes.seq_len)
    x = ids.view(sizes.batch, sizes.seq_len).to(dev)
    xt = ids[: sizes.train_batch * sizes.train_seq].view(sizes.train_batch, sizes.train_seq).to(dev)
    prompt = ids[: sizes.prompt][None].to(dev)
    gen_seq = sizes.prompt + sizes.new_tokens // 2  # the mean attention length while decoding
    goal_fwd = 0.8 if dev == "cuda" else 0.9
    figures, rows = [], []
    for (h, k), path in dirs.items():
        mom = mom_cli.load(path, dtype=dtype).to(dev).eval()
        spread_routers(mom)
        skip, top = skip_share(mom, x)
        name = f"H={h},K={k}"
        log(f"timing {name}: {load_note()}; SKIP share {skip:.3f}, busiest module-step share {top:.3f}")
        fr = mom_flops(mom, sizes.seq_len) / dense_flops(hf.config, sizes.seq_len)
        t_mom, t_hf = bench_forward(hf, mom, x, sizes.reps, dev)
        tr, eff = efficiency(fr, t_mom, t_hf)
        log(f"forward  {name}: MoM {spread(t_mom)}, dense {spread(t_hf)}; FLOPs ratio {fr:.3f}, time ratio {tr:.3f}")
        figures.append(Figure(f"forward efficiency {name}", eff, f">= {goal_fwd}", eff >= goal_fwd))
        tm, th = bench_train(hf, mom, xt, sizes.reps, dev)
        tr_t, eff_t = efficiency(fr, tm, th)
        log(f"train    {name}: MoM {spread(tm)}, dense {spread(th)}; time ratio {tr_t:.3f}")
        figures.append(Figure(f"train-step efficiency {name}", eff_t, ">= 0.8", eff_t >= 0.8))
        fr_g = mom_flops(mom, gen_seq) / dense_flops(hf.config, gen_seq)
        tps_mom, tps_hf, full = bench_generate(hf, mom, prompt, sizes.new_tokens, sizes.gen_reps, dev)
        eff_g = tps_mom / tps_hf * fr_g
        log(
            f"generate {name}: MoM {tps_mom:.1f} tok/s, dense {tps_hf:.1f} tok/s; FLOPs ratio {fr_g:.3f}"
            + ("" if full else " (a model stopped early)")
        )
        figures.append(Figure(f"generation efficiency {name}", eff_g, ">= 0.8", eff_g >= 0.8))
        rows.append((name, fr, tr, eff, tr_t, eff_t, tps_mom / tps_hf, eff_g, skip))
        del mom
    log("")
    log(
        "| plan | FLOPs ÷ dense | fwd time ÷ dense | fwd eff. | train time ÷ dense | train eff. | gen tok/s ÷ dense | gen eff. | SKIP share |"
    )
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |")
    print_table(figures)
    log(f"\nend: {load_note()}; wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
