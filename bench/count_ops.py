"""How many tensor operations a routed forward runs, against the dense model: on a GPU each is a
kernel launch, and at small batches the launches, not the FLOPs, set the time.

Run from the repository root with the project's venv active, after bench_routed.py prepared its plans:

    python bench/count_ops.py                 # H15K1, H15K2, H30K2 and the dense model, bf16 forward
    python bench/count_ops.py --train         # a training step (forward and backward)

Counts the aten operations that reach the CPU kernels in one bfloat16 forward of 1 x 64 tokens
(router heads spread as in bench_routed.py), views excluded. The CPU takes the GPU's routing and
grouped-dispatch path in bf16, with two differences that make the count an upper bound for CUDA:
the CPU splits a GRU cell and an RMS norm into several operations where CUDA runs one fused
kernel, and it zeroes a segment matmul's tail without a mask.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_routed import PLANS, prepare_plan, spread_routers  # noqa: E402
from bench.common import HF_DIR, bench_parser, log, prepare_hf  # noqa: E402

VIEWS = {
    "view", "unsqueeze", "squeeze", "transpose", "t", "permute", "select", "slice", "expand",
    "split", "unsafe_split", "split_with_sizes", "_unsafe_view", "alias", "detach", "as_strided",
    "unbind", "reshape",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count(model: torch.nn.Module, x: torch.Tensor, train: bool) -> collections.Counter[str]:
    def run() -> None:
        if train:
            model.train()
            model.zero_grad(set_to_none=True)
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
        else:
            model.eval()
            with torch.no_grad():
                model(input_ids=x, use_cache=False)

    run()  # warm-up: caches (stacked weights, constants) are built outside the count
    with OpCounter() as counter:
        run()
    return counter.counts


def main() -> None:
    p = bench_parser(__doc__, "H15K1 only")
    p.add_argument("--train", action="store_true", help="count a training step instead of a forward")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    import mom_cli

    torch.set_num_threads(args.threads or 1)
    src = prepare_hf()
    x = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.bfloat16)
    layers = dense.config.num_hidden_layers
    base = sum(count(dense, x, args.train).values())
    what = "training step" if args.train else "forward"
    log(f"dense: {base} ops per {what}, {base / layers:.1f} per layer")
    for h, k in PLANS[:1] if args.quick else PLANS:
        model = mom_cli.load(prepare_plan(src, h, k), dtype=torch.bfloat16)
        spread_routers(model)
        counts = count(model, x, args.train)
        n = sum(counts.values())
        top = ", ".join(f"{op} {c}" for op, c in counts.most_common(8))
        log(f"H={h},K={k}: {n} ops ({n / base:.2f}x dense), {n / h:.1f} per step; most: {top}")
        del model


if __name__ == "__main__":
    main()
