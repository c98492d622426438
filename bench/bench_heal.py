"""Healing benchmark: SmolLM2-135M after each lossy surgery, then `mom heal` for a wall-time budget.

Run from the repository root with the project's venv active:

    python bench/bench_heal.py --threads 2                    # every row: about 2.5 hours on 2 cores
    python bench/bench_heal.py --rows peer50 --budget-scale 0.2 --threads 1
    python bench/bench_heal.py --rows half --eval-every 20 --threads 2   # the held-out curve
    python bench/bench_heal.py --device cuda                  # the same rows and wall times on a GPU

Rows (each heals for its own wall-time budget; `--budget-scale` multiplies every budget):

    peer25     convert-peer layers 10-19, h*k = 25% of d_ff, calibrated   goal: increase <= 1.25x the oracle's 30 min
    peer50     convert-peer layers 10-19, h*k = 50% of d_ff, calibrated   goal: ppl <= 1.03x dense   30 min
    prune8     prune 8 of 30 MHA modules (greedy)                         goal: ppl <= 1.15x dense   30 min
    prune15    prune 15 of 30 MHA modules                                 goal: ppl <= 1.5x dense    60 min
    half       decompose --depth 15 --top-k 2 (half depth)                prints the curve            30 min

Calibration (convert-peer, prune) and healing read the Python docs' calibration text; perplexity is
on the held-out Python-docs text, which neither reads. `dense` is the source model on the same
held-out tokens, measured in the same run. For the PEER rows the oracle is measured there too: the
converted checkpoint with each token keeping exactly its h*k experts of largest contribution
|a_i(x)| ||v_i|| in each converted layer (bench_convert_peer.py's oracle: the limit of any
retrieval of the unhealed experts). With `--device cuda` nothing is scaled: the same wall times
simply buy more tokens.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_foundation import Figure, bench_parser, load_note, log, prepare_hf, prepare_mom, print_table  # noqa: E402
from bench.fetch import pydocs_text  # noqa: E402

ROWS = {  # name: (budget in minutes, goal as "after / dense" at most, or None)
    "peer25": (30, None),  # its goal is on the increase over dense: ORACLE_GOAL times the oracle's
    "peer50": (30, 1.03),
    "prune8": (30, 1.15),
    "prune15": (60, 1.5),
    "half": (30, None),
}
ORACLE_GOAL = {"peer25": 1.25}  # (after - dense) / (oracle - dense) at most


def parse_args():
    p = bench_parser(__doc__, "100k calibration tokens less and 2-minute budgets")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every row's wall-time budget")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument(
        "--eval-every", type=int, default=0, help="held-out perplexity every N steps too (the curve; off the budget)"
    )
    p.add_argument("--retrieval-loss", type=float, default=1.0, help="mom heal --retrieval-loss (0: off)")
    p.add_argument("--local-share", type=float, default=None, help="mom heal --local-share (default: its own)")
    p.add_argument("--global-lr", type=float, default=None, help="mom heal --global-lr (default: its own)")
    p.add_argument(
        "--calib-tokens", type=int, default=None, help="convert-peer and prune calibration tokens (default: theirs)"
    )
    return p.parse_args()


def surgery(row: str, mom_dir: Path, hf_dir: Path, calib: Path, heldout: Path, out: Path, args) -> Path:
    """The checkpoint the row heals, made the way the commands make it."""
    dev = "cuda" if args.device == "cuda" else "cpu"
    if row.startswith("peer"):
        from mom_cli.surgery.convert_peer import ConvertOptions, convert_peer

        k = {"peer25": 48, "peer50": 96}[row]  # h = 8 heads: h*k = 384 or 768 of d_ff = 1536
        opts = ConvertOptions(
            layers="10-19",
            heads=8,
            topk=k,
            calibrate=str(calib),
            **({} if args.calib_tokens is None else {"calib_tokens": args.calib_tokens}),
            seq_len=args.seq_len,
            eval_data=str(heldout),
            eval_tokens=2048,
            device=dev,
        )
        return convert_peer(mom_dir, out, opts).path
    if row.startswith("prune"):
        from mom_cli.surgery.prune import PruneOptions, prune

        keep = {"prune8": "22", "prune15": "15"}[row]
        opts = PruneOptions(
            data=str(calib),
            keep_mha=keep,
            metric="greedy" if row == "prune8" else None,
            calib_tokens=args.calib_tokens,  # None: sized to the model (2,048 tokens for SmolLM2-135M)
            seq_len=args.seq_len,
            eval_data=str(heldout),
            eval_tokens=2048,
            device=dev,
        )
        prune(mom_dir, out, opts)
        return out
    from mom_cli.surgery.decompose import PlanOptions, decompose

    decompose(str(hf_dir), out, PlanOptions(depth=15, top_k=2))
    return out


def oracle_perplexity(ckpt: Path, calib: Path, heldout: Path, args) -> float:
    """The held-out perplexity of `ckpt` with every PEER layer replaced by its oracle, on the blocks
    `mom heal` evaluates (the same text, --eval-tokens and --seq-len)."""
    import functools
    import math

    from mom_cli.analysis.evaluate import perplexity
    from mom_cli.io.loading import load_model
    from mom_cli.modeling.peer import PeerLayer
    from mom_cli.surgery.peer_calibrate import oracle_ffn
    from mom_cli.training import distributed
    from mom_cli.training.train import TrainOptions, split_data

    dev = "cuda" if args.device == "cuda" else "cpu"
    model, tok = load_model(str(ckpt), dev, torch.float32)
    opts = TrainOptions(
        data=str(calib),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_data=str(heldout),
        eval_tokens=args.eval_tokens,
    )
    _, held = split_data(opts, tok, distributed.Dist())
    for layer in model.modules():
        if isinstance(layer, PeerLayer):
            layer.forward = functools.partial(oracle_ffn, layer, m=layer.heads * layer.topk)
    with torch.no_grad():
        loss, _ = perplexity(model.eval(), torch.from_numpy(held.astype("int64")), args.batch_size, dev)
    return math.exp(loss)


def main() -> None:
    args = parse_args()
    from transformers.utils import logging as hf_logging

    from mom_cli.training.heal import HealOptions, heal

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"bench_heal: unknown rows {unknown}; use {', '.join(ROWS)}")
    start = time.perf_counter()
    log(
        f"bench_heal: device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, rows "
        f"{rows}, budget scale {args.budget_scale}; start: {load_note()}"
    )
    hf_dir = prepare_hf()
    mom_dir = prepare_mom(hf_dir)
    calib, heldout = pydocs_text()
    figures, results = [], {}
    with tempfile.TemporaryDirectory(dir=mom_dir.parent) as tmp:
        for row in rows:
            minutes, goal = ROWS[row]
            budget = f"{minutes * 60 * args.budget_scale:.0f}s"
            t0 = time.perf_counter()
            ckpt = surgery(row, mom_dir, hf_dir, calib, heldout, Path(tmp) / row, args)
            log(f"{row}: surgery {time.perf_counter() - t0:.0f} s; healing for {budget}")
            oracle = oracle_perplexity(ckpt, calib, heldout, args) if row.startswith("peer") else None
            if oracle is not None:
                log(f"{row}: the oracle's held-out perplexity {oracle:.3f}")
            r = heal(
                ckpt,
                Path(tmp) / f"{row}-healed",
                HealOptions(
                    data=str(calib),
                    teacher=str(hf_dir),
                    budget=budget,
                    seq_len=args.seq_len,
                    batch_size=args.batch_size,
                    eval_data=str(heldout),
                    eval_tokens=args.eval_tokens,
                    eval_every=args.eval_every,
                    retrieval_loss=args.retrieval_loss,
                    device=args.device,
                    **({} if args.local_share is None else {"local_share": args.local_share}),
                    **({} if args.global_lr is None else {"global_lr": args.global_lr}),
                ),
            )
            dense, before, after = r.eval_ppl_teacher, r.eval_ppl_before, r.eval_ppl_after
            results[row] = r.as_dict()
            log(
                f"{row}: held-out perplexity dense {dense:.3f}, after surgery {before:.3f} ({before / dense:.3f}x), "
                f"after heal {after:.3f} ({after / dense:.3f}x); local {r.local_tokens:,} tokens in {r.local_seconds:.0f} s, "
                f"end-to-end {r.global_tokens:,} tokens in {r.global_seconds:.0f} s"
            )
            for reg in r.regions:
                log(
                    f"  {reg['name']} ({reg['cause']}): {reg['metric']} {reg['error_before']:.4g} -> {reg['error_after']:.4g}"
                )
            curve = ", ".join(f"{t:,}: {ppl:.4g}" for t, ppl in r.curve)
            log(f"  held-out curve (tokens: perplexity): {curve}")
            figures.append(Figure(f"{row}: ppl after surgery / dense", before / dense, "-", None))
            if oracle is not None:
                results[row]["oracle_ppl"] = oracle
                figures.append(Figure(f"{row}: oracle ppl / dense", oracle / dense, "-", None))
                excess = (after - dense) / (oracle - dense) if oracle > dense else float("inf")
                goal_x = ORACLE_GOAL.get(row)
                figures.append(
                    Figure(
                        f"{row}: increase after heal / oracle's increase",
                        excess,
                        "-" if goal_x is None else f"<= {goal_x}",
                        None if goal_x is None else excess <= goal_x,
                    )
                )
            figures.append(
                Figure(
                    f"{row}: ppl after heal ({budget}) / dense",
                    after / dense,
                    "-" if goal is None else f"<= {goal}",
                    None if goal is None else after / dense <= goal,
                )
            )
    print_table(figures)
    log("\n" + json.dumps(results, default=str))
    log(f"\nend: {load_note()}; wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
