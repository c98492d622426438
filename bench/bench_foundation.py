"""Foundation benchmark: MoM at identity routing against the transformers model it came from.

Run from the repository root with the project's venv active:

    python bench/bench_foundation.py                      # full run, CPU, float32
    python bench/bench_foundation.py --quick              # smoke run (small sizes, few repetitions)
    python bench/bench_foundation.py --device cuda --dtype bfloat16
    python bench/bench_foundation.py --threads 1          # steadier CPU timings on a shared machine

Every figure is a ratio against a baseline measured in the same run; nothing is hard-coded and
nothing is asserted. Printed: each figure, its goal and whether it was met, then a table.

    1. prepare   SmolLM2-135M-Instruct (GGUF, from bench/fetch.py) -> bench/.cache/smollm2-135m-hf
                 (safetensors, float32) -> `mom decompose` -> bench/.cache/smollm2-135m-mom
    2. forward   MoM / transformers forward time at identity routing      goal <= 1.15
                 max |logit difference|                                   goal <= 1e-4 (float32)
    3. generate  MoM / transformers greedy tokens/s, 64 new tokens         goal >= 0.8
                 identical generated tokens                               goal: yes
    4. memory    (peak RSS of `mom decompose` / `mom export` - idle torch+transformers RSS)
                 / checkpoint size on disk                                goal <= 0.5 each
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    HF_DIR,
    MOM_DIR,
    Figure,
    bench_parser,
    generate_once,
    load_note,
    log,
    paired_times,
    prepare_hf,
    prepare_mom,
    print_table,
)
from bench.fetch import pydocs_text  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Peak RSS (KiB) of the command in argv[1:]: the wrapper's RUSAGE_CHILDREN sees only that child.
RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


@dataclass
class Sizes:
    forward_batches: tuple[int, ...]
    seq_len: int
    forward_reps: int
    prompt_len: int
    new_tokens: int
    gen_reps: int


def pick_sizes(quick: bool, device: str) -> Sizes:
    if quick:
        return Sizes((1, 2), 64, 3, 16, 16, 1)
    if device == "cuda":
        return Sizes((1, 8), 1024, 20, 32, 64, 5)
    return Sizes((1, 4), 256, 7, 32, 64, 3)


# ----------------------------------------------------------------------------- 1. prepare


# ----------------------------------------------------------------------------- models and inputs


def load_models(device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    import mom_cli

    hf = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=dtype).to(device).eval()
    mom = mom_cli.load(MOM_DIR, dtype=dtype).to(device).eval()
    return hf, mom


def text_tokens(n: int) -> torch.Tensor:
    """The first n tokens of the held-out English text (real text, not random ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(HF_DIR)
    _, heldout = pydocs_text()
    text = heldout.read_text(encoding="utf-8", errors="replace")[: 40 * n]
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        raise RuntimeError(f"held-out text gives only {ids.numel()} tokens, need {n}")
    return ids[:n]


# ----------------------------------------------------------------------------- 2. forward


def spread(times: list[float]) -> str:
    """Median in ms with the range, so that a noisy machine shows."""
    return f"{statistics.median(times) * 1e3:.1f} ms [{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}]"


@torch.inference_mode()
def bench_forward(hf, mom, ids: torch.Tensor, sizes: Sizes, device: str, fp32: bool) -> list[Figure]:
    figures = []
    worst = 0.0
    for b in sizes.forward_batches:
        x = ids[: b * sizes.seq_len].view(b, sizes.seq_len).to(device)
        run_hf = lambda: hf(input_ids=x, use_cache=False).logits  # noqa: E731
        run_mom = lambda: mom(input_ids=x, use_cache=False).logits  # noqa: E731
        diff = (run_hf().float() - run_mom().float()).abs().max().item()
        worst = max(worst, diff)
        t_hf, t_mom = paired_times(run_hf, run_mom, sizes.forward_reps, device)
        ratio = statistics.median(t_mom) / statistics.median(t_hf)
        log(
            f"forward  batch {b} x {sizes.seq_len}: transformers {spread(t_hf)}, MoM {spread(t_mom)}, "
            f"ratio of medians {ratio:.3f}; max |logit diff| {diff:.2e}"
        )
        figures.append(
            Figure(f"forward time MoM/transformers, batch {b}x{sizes.seq_len}", ratio, "<= 1.15", ratio <= 1.15)
        )
    tol = 1e-4 if fp32 else None
    figures.append(
        Figure(
            "forward max |logit diff|",
            worst,
            "<= 1e-4" if fp32 else "info (bf16)",
            worst <= tol if tol is not None else None,
        )
    )
    return figures


# ----------------------------------------------------------------------------- 3. generate


@torch.inference_mode()
def bench_generate(hf, mom, ids: torch.Tensor, sizes: Sizes, device: str) -> list[Figure]:
    prompt = ids[: sizes.prompt_len][None].to(device)
    pad = hf.config.eos_token_id if isinstance(hf.config.eos_token_id, int) else 0
    generate_once(hf, prompt, 4, pad, device), generate_once(mom, prompt, 4, pad, device)  # warm-up
    rates: dict[str, list[float]] = {"hf": [], "mom": []}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(sizes.gen_reps):
        for name, model in (("hf", hf), ("mom", mom)):
            toks, secs = generate_once(model, prompt, sizes.new_tokens, pad, device)
            rates[name].append(toks.numel() / secs)
            outs[name] = toks.cpu()
    r_hf, r_mom = statistics.median(rates["hf"]), statistics.median(rates["mom"])
    same = outs["hf"].shape == outs["mom"].shape and bool((outs["hf"] == outs["mom"]).all())
    ratio = r_mom / r_hf
    log(
        f"generate {sizes.prompt_len}-token prompt, {outs['hf'].numel()}/{outs['mom'].numel()} new tokens: "
        f"transformers {r_hf:.1f} tok/s [{min(rates['hf']):.1f}-{max(rates['hf']):.1f}], "
        f"MoM {r_mom:.1f} tok/s [{min(rates['mom']):.1f}-{max(rates['mom']):.1f}], "
        f"ratio of medians {ratio:.3f}; identical tokens: {same}"
    )
    if not same:
        log(f"  transformers: {outs['hf'].tolist()}\n  MoM:          {outs['mom'].tolist()}")
    return [
        Figure("generate tokens/s MoM/transformers", ratio, ">= 0.8", ratio >= 0.8),
        Figure("generated tokens identical", same, "yes", same),
    ]


# ----------------------------------------------------------------------------- 4. memory


def peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of a subprocess; raises if it fails."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(res.stderr or '').strip().splitlines()[-1:]}")
    return int(res.stdout.strip().splitlines()[-1]) / 1024, secs


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors directories hold the same tensor names with bitwise-equal values."""
    from safetensors import safe_open

    def load(d: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    ta, tb = load(a), load(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def bench_memory(src: Path) -> list[Figure]:
    size_mib = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**20
    py = sys.executable
    idle, _ = peak_rss_mib([py, "-c", "import torch, transformers"])
    cli, _ = peak_rss_mib([py, "-m", "mom_cli", "--help"])
    log(
        f"memory   checkpoint on disk {size_mib:.1f} MiB; idle peak RSS: `import torch, transformers` {idle:.1f} MiB "
        f"(the baseline), `mom --help` {cli:.1f} MiB"
    )
    figures = []
    with tempfile.TemporaryDirectory(prefix="mom-bench-") as tmp:
        mom_out, plain_out = Path(tmp) / "tmp1", Path(tmp) / "tmp2"
        steps = {
            "decompose": [py, "-m", "mom_cli", "decompose", str(src), "-o", str(mom_out), "--force", "-q"],
            "export": [py, "-m", "mom_cli", "export", str(mom_out), "-o", str(plain_out), "--force", "-q"],
        }
        for name, cmd in steps.items():
            peak, secs = peak_rss_mib(cmd)
            ratio = (peak - idle) / size_mib
            log(
                f"memory   {name}: peak RSS {peak:.1f} MiB, extra {peak - idle:.1f} MiB, "
                f"ratio {ratio:.3f} of checkpoint size, {secs:.1f} s"
            )
            figures.append(Figure(f"{name} extra peak RSS / checkpoint size", ratio, "<= 0.5", ratio <= 0.5))
        same = same_tensors(src, plain_out)
        log(f"memory   export round trip gives the source's tensors bit for bit: {same}")
        figures.append(Figure("decompose+export round trip bitwise equal", same, "yes", same))
    return figures


# ----------------------------------------------------------------------------- report


def parse_args() -> argparse.Namespace:
    p = bench_parser(__doc__, "small sizes and few repetitions")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    sizes = pick_sizes(args.quick, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log(
        f"bench_foundation: device {args.device}, dtype {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, sizes {json.dumps(sizes.__dict__)}"
    )
    log(f"start: {load_note()}")
    src = prepare_hf()
    prepare_mom(src)
    log(f"prepare: ready in {time.perf_counter() - start:.1f} s")

    hf, mom = load_models(args.device, DTYPES[args.dtype])
    ids = text_tokens(max(sizes.forward_batches) * sizes.seq_len)
    log(f"timing: {load_note()}")
    figures = bench_forward(hf, mom, ids, sizes, args.device, args.dtype == "float32")
    figures += bench_generate(hf, mom, ids, sizes, args.device)
    del hf, mom
    figures += bench_memory(src)

    print_table(figures)
    log(f"\nend: {load_note()}; wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
