"""Shared by the tests: decompose a fixture model in-process and compare logits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from mom_cli.surgery.decompose import PlanOptions, decompose


def decomposed(src: Path, out: Path, **plan) -> Path:
    return decompose(str(src), out, PlanOptions(**plan))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def ids(batch: int = 2, seq: int = 24, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def remote_code_check(out: Path, x: torch.Tensor, expect: torch.Tensor, tmp: Path, then: str = "") -> list[str]:
    """Load the trust_remote_code export `out` in a fresh Python where `mom_cli` cannot be imported,
    and print the max |logit difference| on `x` against `expect`, then whatever `then` prints
    (it sees the model `m` and the input `x`). Returns the printed words."""
    torch.save(x, tmp / "x.pt")
    torch.save(expect, tmp / "expect.pt")
    script = f"""
        import sys; sys.modules['mom_cli'] = None
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        x = torch.load({str(tmp / "x.pt")!r})
        with torch.no_grad():
            print((m(x).logits - torch.load({str(tmp / "expect.pt")!r})).abs().max().item())
        """
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script) + textwrap.dedent(then)],
        cwd=tmp,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split()
