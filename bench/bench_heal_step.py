"""One step of `mom heal`'s end-to-end stage on SmolLM2-135M with PEER layers 10-19, timed each way
the stage can run it, in one run, against the whole-model step in float32.

Run from the repository root with the project's venv active:

    python bench/bench_heal_step.py --threads 2
    python bench/bench_heal_step.py --device cuda

Rows (a micro-batch of --batch-size x --seq-len tokens of the Python docs; the least of --reps):

    teacher forward            the source model alone, float32 and under bf16 autocast; the KL of its
                               bf16 next-token distributions to its float32 ones (nats per token)
    step, whole model          teacher forward, student forward from the embeddings, backward (float32)
    step, from the first region  the student starts at layer 10's FFN from the teacher's state there
    step, bf16 autocast        the same, as `mom heal --dtype auto` runs it on a CPU with native bf16
                               (on a GPU heal also loads the teacher in bf16; here it stays float32)

The conversion is not calibrated: calibration changes the weights, not the work of a step.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Figure, bench_parser, load_note, log, prepare_hf, prepare_mom, print_table, time_call  # noqa: E402
from bench.fetch import pydocs_text  # noqa: E402


def parse_args():
    p = bench_parser(__doc__, "two repetitions")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reps", type=int, default=4)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from mom_cli.surgery.convert_peer import ConvertOptions, convert_peer
    from mom_cli.training import distributed
    from mom_cli.training import heal as H
    from mom_cli.training import train as tr

    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 2 if args.quick else args.reps
    log(
        f"bench_heal_step: device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; start: {load_note()}"
    )
    hf_dir = prepare_hf()
    mom_dir = prepare_mom(hf_dir)
    calib, _ = pydocs_text()
    with tempfile.TemporaryDirectory(dir=mom_dir.parent) as tmp:
        peer = Path(tmp) / "peer"
        convert_peer(mom_dir, peer, ConvertOptions(layers="10-19", heads=8, topk=96, device=args.device))
        opts = H.HealOptions(
            data=str(calib), teacher=str(hf_dir), budget="1M", seq_len=args.seq_len, batch_size=args.batch_size,
            eval_tokens=args.seq_len, device=args.device, dtype="fp32",
        )  # fmt: skip
        run = H.Heal(peer, Path(tmp) / "out", opts, H.check_options(opts), distributed.Dist(), args.device)
        params = [run.named[n].requires_grad_(True) for n in run.trainable]
        x = torch.from_numpy(run.blocks[: args.batch_size].astype("int64")).to(args.device)
        bf16 = lambda: torch.autocast(args.device, dtype=torch.bfloat16)  # noqa: E731
        fp32 = lambda: torch.autocast(args.device, enabled=False)  # noqa: E731

        def teacher(ctx):
            def go():
                with torch.no_grad(), ctx():
                    return run.teacher(input_ids=x, use_cache=False).logits

            return go

        def step(losses, ctx):
            def go():
                with ctx():
                    parts = losses(x)
                parts["loss"].backward()
                for p in params:
                    p.grad = None

            return go

        whole = lambda x: tr.step_losses(run.model, run.teacher, x, run.coef)  # noqa: E731
        shortcut = lambda x: H.global_losses(run, run.model, x)  # noqa: E731
        cases = {
            "teacher forward, float32": teacher(fp32),
            "teacher forward, bf16 autocast": teacher(bf16),
            "step, whole model (float32)": step(whole, fp32),
            "step, from the first region (float32)": step(shortcut, fp32),
            "step, from the first region, bf16 autocast": step(shortcut, bf16),
        }
        times = {name: [] for name in cases}
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(reps):  # interleaved, so that drift in machine speed hits every case alike
            for name, fn in cases.items():
                times[name].append(time_call(fn, args.device))
        best = {name: min(t) for name, t in times.items()}
        with torch.no_grad():
            ref, low = teacher(fp32)(), teacher(bf16)()
        kl = tr.kl_to_teacher(low, ref).item()
    figures = [Figure(f"{name} (s)", t, "-", None) for name, t in best.items()]
    base = best["step, whole model (float32)"]
    figures += [Figure(f"{name} / whole-model step", best[name] / base, "-", None) for name in list(cases)[3:]]
    figures.append(
        Figure(
            "teacher forward, bf16 / float32",
            best["teacher forward, bf16 autocast"] / best["teacher forward, float32"],
            "-",
            None,
        )
    )
    figures.append(Figure("KL(teacher fp32 || teacher bf16), nats per token", kl, "-", None))
    print_table(figures)


if __name__ == "__main__":
    main()
