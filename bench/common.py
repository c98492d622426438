"""What the bench scripts share: the SmolLM2 model they measure (prepared once, cached), the
common options, timing helpers, and the table of figures each prints.

Run the benches from the repository root with the project's venv active; see each bench's docstring.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fetch import DEFAULT_CACHE, smollm2_gguf  # noqa: E402

HF_DIR = DEFAULT_CACHE / "smollm2-135m-hf"
MOM_DIR = DEFAULT_CACHE / "smollm2-135m-mom"


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_note() -> str:
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    busy = " (busy machine: timings are noisy)" if load > 0.5 * cpus else ""
    return f"load average {load:.2f} on {cpus} CPUs{busy}"


@dataclass
class Figure:
    name: str
    value: float | bool | None
    goal: str
    met: bool | None  # None: informational, or could not be measured

    def shown(self) -> str:
        if isinstance(self.value, bool):
            return "yes" if self.value else "no"
        if self.value is None:
            return "n/a"
        return f"{self.value:.3g}" if abs(self.value) < 1e-2 else f"{self.value:.3f}"

    def verdict(self) -> str:
        return {True: "MET", False: "NOT MET", None: "-"}[self.met]


def print_table(figures: list[Figure]) -> None:
    w = max(len(f.name) for f in figures)
    log("")
    log(f"{'figure':<{w}}  {'value':>10}  {'goal':<12}  result")
    log(f"{'-' * w}  {'-' * 10}  {'-' * 12}  -------")
    for f in figures:
        log(f"{f.name:<{w}}  {f.shown():>10}  {f.goal:<12}  {f.verdict()}")
    log("")
    for f in figures:
        if f.met is not None:
            log(f"goal {'MET    ' if f.met else 'NOT MET'}: {f.name} = {f.shown()} (goal {f.goal})")


def bench_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """The options every bench script has: --quick (what it shrinks: `quick`), --device, --threads."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{quick} (smoke run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine",
    )
    return p


def prepare_hf() -> Path:
    """Dequantise the GGUF once into a float32 safetensors directory (with its tokenizer)."""
    if (HF_DIR / "config.json").is_file() and any(HF_DIR.glob("*.safetensors")):
        return HF_DIR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    log(f"prepare: {gguf.name} -> {HF_DIR}")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild it plain.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(HF_DIR)
    tok.save_pretrained(HF_DIR)
    return HF_DIR


def mom_is_stale() -> bool:
    """Decompose again when the checkpoint is missing or older than any mom_cli source file."""
    cfg = MOM_DIR / "config.json"
    if not cfg.is_file() or not any(MOM_DIR.glob("*.safetensors")):
        return True
    newest = max(p.stat().st_mtime for p in (ROOT / "mom_cli").rglob("*.py"))
    return newest > cfg.stat().st_mtime


def prepare_mom(src: Path) -> Path:
    if mom_is_stale():
        log(f"prepare: mom decompose {src.name} -> {MOM_DIR.name}")
        cmd = [sys.executable, "-m", "mom_cli", "decompose", str(src), "-o", str(MOM_DIR), "--force", "-q"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return MOM_DIR


def token_blocks(path: Path, tokenizer, n: int, seq_len: int) -> torch.Tensor:
    """The first n tokens of a text file as (n // seq_len, seq_len) blocks, as the commands read DATA."""
    from mom_cli.io.text import blocks, token_stream

    return blocks(token_stream(str(path), tokenizer, n), seq_len)


def time_call(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """fn captured as one CUDA graph; the returned callable replays it (one launch, no Python).

    fn must read the same input tensors on every call and never ask the host for a value. It runs
    `warmup` times on a side stream first, as torch's capture recipe asks (lazy initialisation,
    cached stacks). Gradients that fn's backward creates live in the graph's memory pool."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def paired_times(
    a: Callable[[], object], b: Callable[[], object], reps: int, device: str
) -> tuple[list[float], list[float]]:
    """Seconds of each run of a and b, alternated so that drift in machine speed hits both alike."""
    for _ in range(2):  # warm-up
        a(), b()
    ta, tb = [], []
    for _ in range(reps):
        ta.append(time_call(a, device))
        tb.append(time_call(b, device))
    return ta, tb


def generate_once(model, prompt: torch.Tensor, new_tokens: int, pad_id: int, device: str) -> tuple[torch.Tensor, float]:
    """Greedy generation: (the new tokens, seconds)."""
    mask = torch.ones_like(prompt)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id
    )
    sync(device)
    return out[0, prompt.shape[1] :], time.perf_counter() - t0
