"""Prune benchmark: which metric removes SmolLM2-135M's attention modules best, and what it buys.

Run from the repository root with the project's venv active:

    python bench/bench_prune.py                 # CPU, float32 (tens of minutes on 2 cores)
    python bench/bench_prune.py --quick         # smoke run: fewer tokens, same steps
    python bench/bench_prune.py --device cuda

One run, one calibration text and one held-out text (the Python docs, from bench/fetch.py), the
identity-routed MoM of SmolLM2-135M-Instruct (30 MHA modules, prepared as in bench_foundation.py):

    1. scores   cosine (LLM-Drop), block-influence (ShortGPT), loss (one-shot), greedy (mom's default)
    2. quality  held-out perplexity after removing 25% and 50% of the MHA modules with each metric;
                goal: the default metric is lowest at both points
    3. speed    forward time and cached-generation time of the 50%-pruned checkpoint (default
                metric), as ratios to the unpruned one

Every figure is measured in this run; nothing is hard-coded and nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Figure,
    bench_parser,
    generate_once,
    load_note,
    log,
    paired_times,
    prepare_hf,
    prepare_mom,
    print_table,
    token_blocks,
)
from bench.fetch import pydocs_text  # noqa: E402

METRICS = ("greedy", "loss", "cosine", "block-influence")
DEFAULT = "greedy"
SHARES = (25, 50)  # percent of the MHA modules removed


def parse_args() -> argparse.Namespace:
    p = bench_parser(__doc__, "fewer tokens and repetitions")
    p.add_argument("--calib-tokens", type=int, default=None, help="default 1024 (quick: 512)")
    p.add_argument("--eval-tokens", type=int, default=None, help="default 8192 (quick: 1024)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--greedy-width", type=int, default=8, help="as `mom prune --greedy-width` (default 8)")
    return p.parse_args()


def plans(measurer, refs, n_removed: dict[int, int], width: int) -> dict[str, dict[int, list]]:
    """For each metric and share, the modules it removes (as `mom prune` would choose them)."""
    from mom_cli.surgery.prune import greedy_plan, loss_scores, lowest, probe_scores

    base = measurer.loss()
    t0 = time.perf_counter()
    one_shot = loss_scores(measurer, refs, base)
    log(f"scores   loss (one-shot): {measurer.passes} passes, {time.perf_counter() - t0:.0f} s")
    scores = {
        "loss": one_shot,
        "cosine": probe_scores(measurer, refs, whole_step=False),
        "block-influence": probe_scores(measurer, refs, whole_step=True),
    }
    out: dict[str, dict[int, list]] = {m: {} for m in METRICS}
    for share, n in n_removed.items():
        for metric, s in scores.items():
            out[metric][share] = lowest(s, {"mha": n})
        t0, p0 = time.perf_counter(), measurer.passes
        plan = greedy_plan(measurer, refs, {"mha": n}, base, width, first=one_shot)
        out["greedy"][share] = plan.removed
        log(
            f"scores   greedy to {n} removals: {measurer.passes - p0} new passes "
            f"(repeats are remembered), {time.perf_counter() - t0:.0f} s{'; ' + plan.note if plan.note else ''}"
        )
    for metric in ("cosine", "block-influence", "loss"):
        ranked = sorted(scores[metric], key=scores[metric].get)
        log(f"ranking  {metric:>15}: origin layers {[r.origin for r in ranked]}")
    return out


@torch.inference_mode()
def speed(full_dir: Path, pruned_dir: Path, ids: torch.Tensor, device: str, reps: int) -> list[Figure]:
    import mom_cli

    full = mom_cli.load(full_dir).to(device).eval()
    pruned = mom_cli.load(pruned_dir).to(device).eval()
    x = ids[None, :512].to(device)
    t_full, t_pruned = paired_times(lambda: full(x, use_cache=False), lambda: pruned(x, use_cache=False), reps, device)
    fwd = statistics.median(t_pruned) / statistics.median(t_full)
    log(
        f"speed    forward 1x{x.shape[1]}: unpruned {statistics.median(t_full) * 1e3:.0f} ms, "
        f"pruned {statistics.median(t_pruned) * 1e3:.0f} ms, ratio {fwd:.3f}"
    )
    prompt, pad = ids[None, :32].to(device), 0
    generate_once(full, prompt, 4, pad, device), generate_once(pruned, prompt, 4, pad, device)  # warm-up
    g_full = [generate_once(full, prompt, 64, pad, device)[1] for _ in range(reps)]
    g_pruned = [generate_once(pruned, prompt, 64, pad, device)[1] for _ in range(reps)]
    gen = statistics.median(g_pruned) / statistics.median(g_full)
    log(
        f"speed    cached generation of 64 tokens: unpruned {statistics.median(g_full):.2f} s, "
        f"pruned {statistics.median(g_pruned):.2f} s, ratio {gen:.3f}"
    )
    return [
        Figure("forward time pruned/unpruned (50% MHA)", fwd, "< 1", fwd < 1),
        Figure("cached generate time pruned/unpruned", gen, "< 1", gen < 1),
    ]


def main() -> None:
    args = parse_args()
    from transformers.utils import logging as hf_logging

    import mom_cli  # noqa: F401  (registers the mom model type)
    from mom_cli import console
    from mom_cli.io import provenance
    from mom_cli.io.loading import load_model
    from mom_cli.surgery.prune import Measurer, pooled_modules, remove_modules

    hf_logging.disable_progress_bar()
    console.QUIET = True  # the library's progress bars; this script prints its own lines
    if args.threads:
        torch.set_num_threads(args.threads)
    calib_n = args.calib_tokens or (512 if args.quick else 1024)
    eval_n = args.eval_tokens or (1024 if args.quick else 8192)
    seq = min(args.seq_len, calib_n)
    start = time.perf_counter()
    log(
        f"bench_prune: device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"calibration {calib_n} tokens, held-out {eval_n} tokens, seq_len {seq}, greedy width {args.greedy_width}"
    )
    log(f"start: {load_note()}")
    mom_dir = prepare_mom(prepare_hf())
    calib_file, heldout_file = pydocs_text()
    model, tok = load_model(str(mom_dir), args.device)
    calib = Measurer(model, token_blocks(calib_file, tok, calib_n, seq), 4, args.device)
    heldout = Measurer(model, token_blocks(heldout_file, tok, eval_n, seq), 4, args.device)
    refs = [r for r in pooled_modules(model.config) if r.kind == "mha"]
    n_removed = {share: round(len(refs) * share / 100) for share in SHARES}

    chosen = plans(calib, refs, n_removed, args.greedy_width)
    dense = math.exp(heldout.loss())
    log(f"quality  held-out perplexity of the unpruned model (= the source model): {dense:.3f}")
    figures, table = [], {}
    for share, n in n_removed.items():
        table[share] = {m: math.exp(heldout.loss(chosen[m][share])) for m in METRICS}
        row = ", ".join(f"{m} {p:.3f}" for m, p in table[share].items())
        log(f"quality  {share}% of MHA removed ({n} of {len(refs)}): held-out perplexity {row}")
        best_other = min(p for m, p in table[share].items() if m != DEFAULT)
        figures.append(
            Figure(
                f"{share}% MHA: default ppl / best other",
                table[share][DEFAULT] / best_other,
                "<= 1",
                table[share][DEFAULT] <= best_other,
            )
        )
        for m in METRICS:
            figures.append(Figure(f"{share}% MHA: {m} ppl / unpruned", table[share][m] / dense, "-", None))
        log(f"quality  {share}% removed by {DEFAULT}: origin layers {sorted(r.origin for r in chosen[DEFAULT][share])}")

    del model
    with tempfile.TemporaryDirectory(dir=mom_dir.parent) as tmp:
        pruned_dir = Path(tmp) / "pruned"
        record = provenance.record("prune", {"metric": DEFAULT, "bench": True}, str(mom_dir))
        remove_modules(mom_dir, pruned_dir, chosen[DEFAULT][50], record)
        ids = heldout.batches.reshape(-1)
        figures += speed(mom_dir, pruned_dir, ids, args.device, 3 if args.quick else 5)

    print_table(figures)
    log("\n" + json.dumps({"heldout_perplexity": {"unpruned": dense, **{f"{s}%": t for s, t in table.items()}}}))
    log(f"\nend: {load_note()}; wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
