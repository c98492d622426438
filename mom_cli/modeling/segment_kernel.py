"""A routed step's segment matmul as one Triton kernel, for GPUs.

Rows [offs[g-1], offs[g]) of `a` (R, in) times w[g].T, with w (G, out, in) of any strides: the
forward projection (w) and its input gradient (w transposed, a view) are the same kernel.

Why not torch._grouped_mm alone: after routing, a step gives each of ~30 modules a few dozen
rows, and its CUTLASS kernel tiles every group with 64 or 128 rows and a 2-CTA cluster (measured
on an H200: 31 us per call at 1024 rows, three times the time it takes to stream the weights).
Here the row tile follows the rows per group, and the tile table is built inside the kernel from
`offs` (each program finds its group by a prefix sum over the group sizes), so nothing is read on
the host and a CUDA graph can capture it.

This file is copied into `trust_remote_code` exports with `modeling_mom.py`, and needs nothing but
torch; without Triton (CPU-only installs) `usable` is False and the caller keeps its other paths,
as it does after the kernel once failed to build or launch (`disable`), or with the environment
variable MOM_SEGMENT_KERNEL=0. With TRITON_INTERPRET=1 set before import, `segment_mm` runs on
CPU tensors: how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # a CPU-only install (ImportError), or a broken one: the other paths serve
    triton = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_off: str | None = None if os.environ.get("MOM_SEGMENT_KERNEL", "1") != "0" else "MOM_SEGMENT_KERNEL=0"

# Below this many rows, an eager step is bound by the CPU that launches its kernels, and Triton's
# Python launcher costs more per call than an aten op's (about the 20 us the kernel itself runs
# at 1024 rows on an H200); CUDA graphs remove launches, so under capture the kernel always wins.
# At 8192 rows, timed eagerly on the H200, it took 32 / 28 / 95 / 51 us for SmolLM2's q/k/v, o,
# gate/up and down projections against torch._grouped_mm's 43 / 34 / 95 / 73.
EAGER_MIN_ROWS = 4096


def disable(reason: str) -> None:
    """Stop using the kernel in this process (it failed to build or launch: no C compiler for
    Triton's launcher, an unsupported GPU); callers then keep their other paths."""
    global _off
    _off = reason


def usable(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernel takes these operands and pays: a GPU, one float dtype, a CUDA graph
    being captured or a batch of at least EAGER_MIN_ROWS rows (cached generation, one token a
    step, keeps the aten kernels), and no torch.compile (which knows torch._grouped_mm)."""
    if triton is None or _off is not None or not a.is_cuda or torch.compiler.is_compiling():
        return False
    if a.device.index != torch.cuda.current_device():
        return False  # Triton launches on the current device (a model spread over GPUs)
    if a.dtype not in _DTYPES or w.dtype != a.dtype or a.dim() != 2 or w.dim() != 3:
        return False
    if a.dtype == torch.bfloat16 and _capability(a.device.index) < (8, 0):
        return False  # Triton's bf16 dot needs Ampere or newer
    return a.shape[0] >= EAGER_MIN_ROWS or torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=16)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tile_sizes(rows: int, groups: int, out_features: int, in_features: int) -> tuple[int, int, int, int, int]:
    """(rows, columns, depth) of a tile, warps and pipeline stages, from `bench/bench_segment_mm.py`
    on an H200 (bf16, 31 groups of SmolLM2's projections, kernel time under CUDA graphs):

    - rows: the power of two that holds a group's mean row count, 16 to 64 (64 beat 128 at 66
      rows a group: 20.1 against 25.4 us for the down projection);
    - columns: 64 when the output is at most 640 wide (o_proj, 576 columns: 7.1 against 7.9 us),
      so no tile is half empty, else 128;
    - four stages when the depth is 1024 or more (down_proj, 1536 deep: 19.4 against 21.7 us)."""
    per_group = max(1, rows // max(groups, 1))
    bm = min(64, max(16, 1 << (per_group - 1).bit_length()))
    bn = 64 if out_features <= 640 else 128
    return bm, bn, 64, 4, 4 if in_features >= 1024 else 3


def segment_mm(
    a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, full: bool, tiles: tuple[int, ...] | None = None
) -> torch.Tensor:
    """The segment matmul (see the module docstring). `full`: offs[-1] is the row count; otherwise
    the rows past it are zero. `tiles`: (BM, BN, BK, warps, stages), for benchmarks; default `tile_sizes`."""
    rows, groups, n, k = a.shape[0], w.shape[0], w.shape[1], w.shape[2]
    if a.shape[1] != k or offs.shape != (groups,) or offs.dtype != torch.int32 or offs.stride(0) != 1:
        raise ValueError(f"segment_mm: a {tuple(a.shape)}, w {tuple(w.shape)}, offs {tuple(offs.shape)} {offs.dtype}")
    y = (torch.empty if full else torch.zeros)(rows, n, dtype=a.dtype, device=a.device)
    if rows == 0:
        return y
    bm, bn, bk, warps, stages = tiles or tile_sizes(rows, groups, n, k)
    # every group adds at most one partial row tile; programs past the last tile return at once
    grid = (triton.cdiv(rows, bm) + groups, triton.cdiv(n, bn))
    fp32 = a.dtype == torch.float32
    _kernel[grid](
        a,
        w,
        y,
        offs,
        groups,
        n,
        k,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        y.stride(0),
        BM=bm,
        BN=bn,
        BK=bk,
        BG=triton.next_power_of_2(groups),
        # as torch's matmul: float32 exactly unless TF32 is allowed
        PRECISION="tf32" if fp32 and torch.backends.cuda.matmul.allow_tf32 else "ieee",
        num_warps=warps,
        num_stages=stages,
    )
    return y


if triton is not None:

    @triton.jit
    def _kernel(
        a_ptr,
        w_ptr,
        y_ptr,
        offs_ptr,
        n_groups,
        N,
        K,
        s_am,
        s_ak,
        s_wg,
        s_wn,
        s_wk,
        s_ym,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        BG: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # This program's group and row tile: groups' tiles are numbered in order, so the group is
        # the count of groups whose tiles all come before this one.
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        gi = tl.arange(0, BG)
        live = gi < n_groups
        ends = tl.load(offs_ptr + gi, mask=live, other=0)
        starts = tl.load(offs_ptr + gi - 1, mask=live & (gi > 0), other=0)
        tiles = tl.where(live, (ends - starts + BM - 1) // BM, 0)
        last = tl.cumsum(tiles, 0)
        g = tl.sum((last <= pid_m).to(tl.int32), 0)
        mine = gi == g
        row0 = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - tl.sum(tl.where(mine, last - tiles, 0), 0)) * BM
        row_end = tl.sum(tl.where(mine, ends, 0), 0)  # 0 past the last group: no rows, no loop
        depth = tl.where(g < n_groups, K, 0)

        rows = row0 + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        row_ok = rows < row_end
        col_ok = cols < N
        a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * s_am + ks[None, :] * s_ak
        w_ptrs = w_ptr + tl.minimum(g, n_groups - 1).to(tl.int64) * s_wg + cols[None, :] * s_wn + ks[:, None] * s_wk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, depth, BK):
            k_ok = k0 + ks < K
            x = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(x, wt, acc, input_precision=PRECISION)
            a_ptrs += BK * s_ak
            w_ptrs += BK * s_wk
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * s_ym + cols[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
