"""Optimisers and the learning-rate schedule of `train-routers`.

Dense parameters use AdamW (fused on GPUs). PEER expert tables hold one row per expert, and a step
retrieves only some experts, so they use `RowSparseAdam`: a lazy AdamW in which a row whose
gradient is zero this step is left alone (parameters, moments and its own step count), and a row
that was retrieved gets an ordinary AdamW update with bias correction by its own step count. A
rarely retrieved expert is then not dragged by stale momentum or weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RowSparseAdam(torch.optim.Optimizer):
    """AdamW that updates only the rows (first dimension) whose gradient is non-zero this step."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                rows = g.reshape(g.shape[0], -1).ne(0).any(dim=1)  # the retrieved rows
                if not bool(rows.any()):
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["row_steps"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                idx = rows.nonzero().squeeze(1)
                steps = state["row_steps"].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))[idx]
                gr = g.index_select(0, idx)
                m = state["exp_avg"].index_select(0, idx).mul_(beta1).add_(gr, alpha=1 - beta1)
                v = state["exp_avg_sq"].index_select(0, idx).mul_(beta2).addcmul_(gr, gr, value=1 - beta2)
                state["exp_avg"].index_copy_(0, idx, m)
                state["exp_avg_sq"].index_copy_(0, idx, v)
                shape = (-1,) + (1,) * (p.dim() - 1)
                bc1 = (1 - beta1**steps).view(shape)
                bc2 = (1 - beta2**steps).view(shape)
                w = p.index_select(0, idx)
                w.mul_(1 - group["lr"] * group["weight_decay"])
                w.sub_(group["lr"] * (m / bc1) / ((v / bc2).sqrt() + group["eps"]))
                p.index_copy_(0, idx, w)
        return None


def schedule(kind: str, warmup: int, steps: int):
    """LR multiplier per step: linear warm-up, then constant or cosine down to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or steps <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay for matrices only: not biases, norms, the routers' step bias or PEER sub-keys."""
    return p.dim() >= 2 and not name.endswith(("step_bias", "sub_keys"))


def adamw(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, fused=True if device.startswith("cuda") else None)
