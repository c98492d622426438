"""`mom train-routers`: the paper's second phase, training a decomposed model's routers (and, when
asked, its PEER experts or everything) on text.

    objective  next-token loss + aux_loss_coef * load balancing; with a teacher (`distill`): the
               KL divergence from the teacher's next-token distribution + aux_loss_coef * balancing
    what       `routers`: router parameters and the PEER query networks and sub-keys;
               `routers+peer`: + PEER expert tables (RowSparseAdam: only retrieved rows change);
               `all`: every parameter. Frozen parameters get no gradient and no optimizer state.
               `lora` (a rank): + LoRA adapters on the MHA/FFN projections (see `lora`), merged
               into the written weights: the cheap alternative to `all`.
    ranks      under torchrun, `strategy` ddp (whole model per rank) or fsdp (FSDP2: parameters,
               gradients and optimizer moments sharded over ranks); see `distributed`.
    data       token blocks of `seq_len` from `tokencache`, in an order fixed by the seed: global
               step s takes blocks [s*G, (s+1)*G) of a per-epoch permutation (G = batch x accum x
               ranks), and rank r takes its own slice of them. The data position is the step.
    state      `OUT.train-state/` beside the output: state.pt (written atomically every
               `save_every` steps), train_metrics.jsonl; `resume` continues from it. It is removed
               when the output is written (`keep_state` keeps it).
    output     a normal MoM checkpoint at OUT (atomic), with provenance, train_metrics.jsonl and
               routing_stats.json recorded over the last steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mom_cli import console
from mom_cli.analysis.evaluate import heldout_loss
from mom_cli.console import log, warn
from mom_cli.errors import MomError, UsageError, one_line
from mom_cli.io import tokencache
from mom_cli.io.atomic import releases_locks
from mom_cli.io.loading import DTYPES
from mom_cli.training import distributed, lora, optim

TRAIN_MODES = ("routers", "routers+peer", "all")
SCHEDULES = ("cosine", "constant")
PEER_RETRIEVAL = (".peer.query.", ".peer.query_bn.")
PEER_EXPERTS = tuple(f".peer.{n}" for n in ("w_in", "b_in", "w_gate", "b_gate", "w_out", "b_out"))
STATE_FILE = "state.pt"
METRICS_FILE = "train_metrics.jsonl"
DEFAULT_LR = {"routers": 1e-3, "routers+peer": 1e-3, "all": 1e-4}


@dataclass
class TrainOptions:
    data: str
    train: str = "routers"
    steps: int | None = None  # default: one pass over the data (or --tokens)
    tokens: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    lr: float | None = None  # default by mode (DEFAULT_LR)
    warmup: int | None = None  # default: 5% of the steps
    schedule: str = "cosine"
    weight_decay: float = 0.0
    aux_loss_coef: float | None = None  # default: the checkpoint's config
    distill: str | None = None  # a model reference, or "source" for the provenance's source model
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    eval_data: str | None = None
    eval_every: int = 0
    eval_tokens: int = 32768
    save_every: int = 0
    resume: bool = False
    keep_state: bool = False
    seed: int = 0
    lora: int | None = None  # rank of LoRA adapters on the module projections, trained and merged
    strategy: str = "ddp"  # under torchrun: ddp, or fsdp (sharded; see distributed.shard)
    max_grad_norm: float = 1.0
    stop_after: int | None = None  # library only: stop after this step as if killed (nothing saved)


# Options that --resume lets change: they decide where, how fast and what is logged or kept, not
# the weights the run produces. Every other option is in the run's fingerprint.
RESUME_SAFE = (
    "device",
    "compile",
    "grad_checkpointing",
    "eval_every",
    "save_every",
    "resume",
    "keep_state",
    "stop_after",
    "strategy",
)


@dataclass
class TrainResult:
    path: Path | None  # None on ranks other than 0, and when stopped early
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    loss_first: float | None
    loss_last: float | None
    eval_ppl_before: float | None
    eval_ppl_after: float | None
    trainable_params: int
    main: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "main"}


# ----------------------------------------------------------------------------- what trains


def group_of(name: str) -> str:
    """router | peer_retrieval | peer_experts | other, by their parameter names."""
    if "_router." in name:
        return "router"
    if lora.is_adapter(name):
        return "lora"
    if any(s in name for s in PEER_RETRIEVAL) or name.endswith(".peer.sub_keys"):
        return "peer_retrieval"
    if name.endswith(PEER_EXPERTS):
        return "peer_experts"
    return "other"


def one_module_per_step(config) -> bool:
    """Every block has as many steps as modules and each router picks one: the routing decompose
    starts from, each step on its own layer's modules. Balancing load across a step's choices is
    then the opposite of what the model computes: with top-1 a step that moves off its module loses
    that layer (measured in the README's convert-peer section)."""
    blocks = config.blocks
    return (
        bool(blocks) and config.router_top_k == 1 and all(b["steps"] == len(b["mha"]) == len(b["ffn"]) for b in blocks)
    )


def select_trainable(
    model: nn.Module, mode: str
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Set requires_grad per `mode` (LoRA adapters, where attached, always train); returns
    (dense AdamW params, row-sparse PEER expert params)."""
    wanted = {
        "routers": {"router", "peer_retrieval"},
        "routers+peer": {"router", "peer_retrieval", "peer_experts"},
        "all": {"router", "peer_retrieval", "peer_experts", "other"},
    }[mode] | {"lora"}
    dense, rows = [], []
    for name, p in model.named_parameters():
        g = group_of(name)
        p.requires_grad_(g in wanted)
        if g not in wanted:
            continue
        (rows if g == "peer_experts" and mode != "all" else dense).append((name, p))
    return dense, rows


# ----------------------------------------------------------------------------- checks


def check_options(opts: TrainOptions) -> None:
    if opts.train not in TRAIN_MODES:
        raise UsageError(f"unknown --train {opts.train!r}: use one of {', '.join(TRAIN_MODES)}")
    if opts.schedule not in SCHEDULES:
        raise UsageError(f"unknown --schedule {opts.schedule!r}: use cosine or constant")
    if opts.steps is not None and opts.tokens is not None:
        raise UsageError("give --steps or --tokens, not both")
    small = [
        (n, v)
        for n, v in (
            ("--batch-size", opts.batch_size),
            ("--grad-accum", opts.grad_accum),
            ("--steps", opts.steps),
            ("--tokens", opts.tokens),
        )
        if v is not None and v < 1
    ]
    if small or opts.seq_len < 2:
        raise UsageError(
            f"{small[0][0] if small else '--seq-len'} is too small: batch sizes, steps and tokens must be >= 1, --seq-len >= 2"
        )
    if min(opts.eval_every, opts.save_every, opts.warmup or 0) < 0 or (opts.lr is not None and opts.lr <= 0):
        raise UsageError("--eval-every, --save-every and --warmup must be >= 0, and --lr > 0")
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {opts.dtype!r}: use bf16, fp16, fp32 or auto")
    if opts.strategy not in distributed.STRATEGIES:
        raise UsageError(f"unknown --strategy {opts.strategy!r}: use ddp or fsdp")
    if opts.lora is not None and (opts.lora < 1 or opts.train == "all"):
        raise UsageError(
            "--lora RANK (>= 1) adapts the modules instead of training them whole: use it with "
            "--train routers or routers+peer, not --train all"
        )
    if opts.lora is not None and opts.strategy == "fsdp":
        raise UsageError("--lora cannot run with --strategy fsdp (adapters are not sharded); use --strategy ddp")
    if opts.strategy == "fsdp" and opts.train == "routers+peer":
        raise UsageError(
            "--train routers+peer cannot run with --strategy fsdp (the row-sparse PEER optimizer "
            "needs whole expert tables); use --strategy ddp, or --train all"
        )


def check_strategy(opts: TrainOptions, d: distributed.Dist) -> None:
    """FSDP shards over torchrun's processes: alone it would only be slower than no sharding."""
    if opts.strategy == "fsdp" and not d.active:
        raise UsageError(
            "--strategy fsdp shards the model over processes: launch with "
            "torchrun --nproc-per-node N -m mom_cli train-routers ..., or drop --strategy fsdp"
        )


def amp_dtype(name: str, device: str, cpu_bf16: bool = False) -> torch.dtype:
    """The autocast dtype (float32: no autocast). Trained weights and optimizer state are float32.
    `auto` is bf16 on GPUs that have it, and with `cpu_bf16` also on CPUs that compute it natively."""
    cuda = device.startswith("cuda")
    if name == "auto":
        native = torch.cuda.is_bf16_supported() if cuda else cpu_bf16 and native_cpu_bf16()
        return torch.bfloat16 if native else torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and not cuda:
        raise UsageError("--dtype fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if dtype == torch.bfloat16 and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bf16 support; use --dtype fp16 or fp32")
    return dtype


def native_cpu_bf16() -> bool:
    """This CPU multiplies bf16 natively (AVX512-BF16 or AMX): oneDNN's bf16 matmuls then run about
    twice as fast as float32 (measured on a 2-core AMD EPYC: 4.3 against 9.5 ms for 1024x576 @ 576x1536)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent in some builds
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


# ----------------------------------------------------------------------------- data


@dataclass
class Batches:
    """Deterministic global batches of token blocks; this rank's micro-batches of each step."""

    blocks: np.ndarray  # (n, seq_len) int32, memory-mapped
    batch_size: int
    grad_accum: int
    dist: distributed.Dist
    seed: int
    _perms: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.dist.world

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}  # a step spans at most two
            self._perms[epoch] = torch.randperm(self.blocks.shape[0], generator=g).numpy()
        return self._perms[epoch]

    def micro_batches(self, step: int) -> Iterator[torch.Tensor]:
        n, g = self.blocks.shape[0], self.global_batch
        ids = [self._order(pos // n)[pos % n] for pos in range(step * g, (step + 1) * g)]
        mine = ids[self.dist.rank * self.batch_size * self.grad_accum :][: self.batch_size * self.grad_accum]
        for a in range(self.grad_accum):
            rows = sorted(mine[a * self.batch_size : (a + 1) * self.batch_size])  # sorted: sequential reads
            yield torch.from_numpy(np.stack([self.blocks[i] for i in rows]).astype(np.int64))


def load_blocks(spec: str, tokenizer: Any, seq_len: int, d: distributed.Dist, max_tokens: int | None) -> np.ndarray:
    """Rank 0 tokenises (once, cached); the other ranks wait, then map the same file."""
    if d.main:
        path = tokencache.ensure(spec, tokenizer, max_tokens)
    distributed.barrier(d)
    if not d.main:
        path = tokencache.ensure(spec, tokenizer, max_tokens)
    return tokencache.open_blocks(path, seq_len, len(tokenizer))


def split_data(opts: TrainOptions, tokenizer: Any, d: distributed.Dist) -> tuple[np.ndarray, np.ndarray | None]:
    """(training blocks, held-out blocks or None). Without --eval-data, the last blocks of DATA
    (up to 10% of them and --eval-tokens) are held out for the periodic perplexity."""
    cap = None
    if opts.tokens is not None or opts.steps is not None:  # only `hf:` data is capped: it may be endless
        per_step = opts.batch_size * opts.grad_accum * d.world * opts.seq_len
        cap = (opts.tokens or opts.steps * per_step) + opts.eval_tokens + opts.seq_len
    train = load_blocks(opts.data, tokenizer, opts.seq_len, d, cap)
    n_eval = -(-opts.eval_tokens // opts.seq_len)
    if opts.eval_data is not None:
        held = load_blocks(opts.eval_data, tokenizer, opts.seq_len, d, n_eval * opts.seq_len)[:n_eval]
        if held.shape[0] == 0:
            raise UsageError(
                f"--eval-data {opts.eval_data} is shorter than one sequence of --seq-len {opts.seq_len}; give more text"
            )
        return train, held
    n_eval = min(n_eval, train.shape[0] // 10)
    global_batch = opts.batch_size * opts.grad_accum * d.world
    if n_eval == 0 or train.shape[0] - n_eval < global_batch:
        return train, None
    return train[:-n_eval], train[-n_eval:]


# ----------------------------------------------------------------------------- teacher


def source_model(ckpt: Path, config: Any, flag: str) -> str:
    """The model the checkpoint was made from, as its provenance records it."""
    prov = config.mom_provenance
    if not prov or not prov[0].get("source"):
        raise UsageError(f"{ckpt} records no source model; pass the teacher: {flag}")
    return prov[0]["source"]


def load_teacher(ref: str, config: Any, device: str, amp: torch.dtype, flag: str) -> nn.Module:
    """A frozen teacher in eval mode, refused unless it shares the student's vocabulary."""
    from mom_cli.io.loading import load_model

    try:
        teacher, _ = load_model(ref, device, amp if device.startswith("cuda") else torch.float32)
    except UsageError as e:
        raise UsageError(f"cannot load the distillation teacher {ref}: {e}; pass {flag}") from e
    if teacher.config.vocab_size != config.vocab_size:
        raise UsageError(
            f"teacher {ref} has a vocabulary of {teacher.config.vocab_size}, the model "
            f"{config.vocab_size}; distil from a model with the same tokenizer"
        )
    teacher.requires_grad_(False)
    if not device.startswith("cuda") and amp != torch.float32:
        store_matmul_weights(teacher, amp)
    log(f"distilling from {ref}")
    return teacher


def store_matmul_weights(model: nn.Module, amp: torch.dtype) -> None:
    """Keep a frozen `transformers` model's Linear weights in autocast's dtype. Autocast rounds
    them to it on every call anyway (it caches casts of trainable leaves only), so the forward is
    bitwise the same and skips the copies: SmolLM2-135M's forward, 1 CPU thread, 1.46 -> 1.13 s.
    Embeddings and norms stay float32, so the residual stream does too; a head tied to the
    embeddings gets its own rounded copy. mom's own models are left alone: a PEER layer turns
    autocast off around its query."""
    if not type(model).__module__.startswith("transformers."):
        return
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            for name in ("weight", "bias"):
                w = getattr(mod, name)
                if w is not None and w.dtype == torch.float32:  # not quantized or already rounded
                    setattr(mod, name, nn.Parameter(w.detach().to(amp), requires_grad=False))


# ----------------------------------------------------------------------------- objective


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between next-token distributions (logits)."""
    return _Distill.apply(student, teacher, None)[0]


def distill_losses(logits: torch.Tensor, target: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL to the teacher's logits, mean over tokens; the LM loss of x's next tokens, detached)."""
    nxt = torch.full_like(x, -1)
    nxt[:, :-1] = x[:, 1:]
    return _Distill.apply(logits, target, nxt.reshape(-1))


# Rows of logits per chunk: 16 MiB of float32 each, which the allocator reuses from chunk to chunk
# and step to step. Whole-batch float32 copies (200 MB each for 1,024 tokens of a 49,152-word
# vocabulary) are mapped afresh at every step, and their page faults cost more than the arithmetic
# (a CPU heal step, profiled: 0.27 s in one exp). A GPU's caching allocator has no such cost.
CPU_CHUNK_FLOATS = 1 << 22
GPU_CHUNK_FLOATS = 1 << 28


class _Distill(torch.autograd.Function):
    """KL(teacher || student) per token, averaged, in float32 whatever the logits' dtype, with the
    student's gradient, softmax(student) - softmax(teacher), made in the same pass. It is kept in
    the logits' dtype (what reaches the head's backward anyway), but in float32 for fp16 logits,
    whose range would lose small differences before GradScaler's scale reaches them. `nxt`: each
    row's next token (-1 for none), for the LM loss, which is only logged; None skips it."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, nxt: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if target.shape != logits.shape:
            raise ValueError(f"student logits {tuple(logits.shape)} and teacher logits {tuple(target.shape)} differ")
        v = logits.shape[-1]
        s_rows, t_rows = logits.reshape(-1, v), target.reshape(-1, v)
        n = s_rows.shape[0]
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty_like(s_rows, dtype=torch.float32 if logits.dtype == torch.float16 else None)
        kl = torch.zeros((), dtype=torch.float32, device=logits.device)
        lm = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = max(1, (GPU_CHUNK_FLOATS if logits.is_cuda else CPU_CHUNK_FLOATS) // v)
        for i in range(0, n, step):
            s = F.log_softmax(s_rows[i : i + step].float(), dim=-1)
            t = F.log_softmax(t_rows[i : i + step].float(), dim=-1)
            if nxt is not None:
                ids = nxt[i : i + step]
                picked = s.gather(-1, ids.clamp(min=0)[:, None]).squeeze(1)
                lm -= torch.where(ids >= 0, picked, 0.0).sum()
            p = t.exp()
            kl += t.sub_(s).mul_(p).sum()  # sum of p (log p - log q)
            if grad is not None:
                grad[i : i + step] = s.exp_().sub_(p)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.n = logits.shape, n
        if nxt is not None:
            lm = lm / (nxt >= 0).sum().clamp(min=1)
        ctx.mark_non_differentiable(lm)
        return kl / n, lm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_kl: torch.Tensor, _g_lm: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None
        return (grad * (g_kl.float() / ctx.n)).view(ctx.shape), None, None


def step_losses(model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, coef: float) -> dict[str, torch.Tensor]:
    """The objective of one micro-batch and its parts (the parts detached, for logging)."""
    out = model(input_ids=x, use_cache=False)
    target = None
    if teacher is not None:
        with torch.no_grad():
            target = teacher(input_ids=x, use_cache=False).logits
    return objective(out.logits, target, x, out.aux_loss, coef)


def objective(
    logits: torch.Tensor, target: torch.Tensor | None, x: torch.Tensor, aux_loss: torch.Tensor | None, coef: float
) -> dict[str, torch.Tensor]:
    """KL to the teacher's logits `target` (or, without one, the LM loss on x), plus `coef` times the
    routers' aux loss; the parts detached, for logging."""
    if target is None:
        parts = {"lm_loss": F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())}
        loss = parts["lm_loss"]
    else:
        kl, lm = distill_losses(logits, target, x)  # one pass over the vocabulary serves both
        parts = {"kl": kl, "lm_loss": lm}
        loss = kl
    if aux_loss is not None:
        parts["aux_loss"] = aux_loss
        loss = loss + coef * aux_loss
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


# ----------------------------------------------------------------------------- the run


def prepare_state_dir(
    work: Path, what: str, resume: bool, force: bool, dist: Any, load_state: Callable[[Path], None]
) -> None:
    """A run's saved-state folder (train-routers, heal): locked against a second run, then resumed
    from, refused (a state exists and neither --resume nor --force), or started afresh."""
    from mom_cli.io.atomic import lock

    if dist.main:
        lock(work, f"{what} state")
    state = work / STATE_FILE
    if resume:
        if not state.exists():
            raise UsageError(f"--resume: no saved {what} state at {work}; run without --resume to start")
        load_state(state)
    elif state.exists() and not force:
        raise UsageError(
            f"a saved {what} state exists at {work}; pass --resume to continue it, or --force to start over"
        )
    elif dist.main:
        shutil.rmtree(work, ignore_errors=True)
    distributed.barrier(dist)
    if dist.main:
        work.mkdir(exist_ok=True)


class Run:
    """Everything one training run holds: model, teacher, data, optimizers, state dir, metrics."""

    def __init__(self, ckpt: Path, out: Path, opts: TrainOptions, d: distributed.Dist, device: str) -> None:
        from mom_cli.io.checkpoint import read_mom
        from mom_cli.io.loading import load_model
        from mom_cli.io.text import check_seq_len

        self.ckpt, self.out, self.opts, self.dist, self.device = ckpt, out, opts, d, device
        self.config, _ = read_mom(ckpt)
        check_seq_len(opts.seq_len, self.config.max_position_embeddings)
        self.amp = amp_dtype(opts.dtype, device)
        # Under a bf16/fp16 autocast the frozen weights stay as stored (a bf16 7B model is 13.5 GB,
        # 27 GB in float32); what trains, and its optimizer state, is float32 all the same.
        frozen = torch.float32 if self.amp == torch.float32 or opts.train == "all" else None
        self.model, self.tokenizer = load_model(str(ckpt), device, frozen)
        self.model.train()
        self.lora = None
        if opts.lora is not None:
            self.lora = lora.attach(self.model, opts.lora)  # in place: self.model keeps its class
        self.dense, self.rows = select_trainable(self.model, opts.train)
        for _, p in (*self.dense, *self.rows):
            p.data = p.data.float()
        if not self.dense and not self.rows:
            raise UsageError(
                f"{ckpt} has nothing to train with --train {opts.train} (no routers or PEER layers: "
                "a plain stack); decompose with --depth/--top-k or use --train all"
            )
        if opts.grad_checkpointing:
            self.model.activation_checkpointing_enable()
        if opts.compile:
            self._compile()
        self.coef = self.config.aux_loss_coef if opts.aux_loss_coef is None else opts.aux_loss_coef
        self.teacher = self._teacher() if opts.distill else None
        self._data()
        self.ddp = distributed.wrap(d, self.model, device, opts.strategy)
        self.sharded = distributed.is_sharded(self.model)
        self.used = distributed.UsedParams(self.model) if self.sharded else None
        self.dense, self.rows = select_trainable(self.model, opts.train)  # FSDP made them DTensors
        self._optimizers()
        self.work = out.parent / f"{out.name}.train-state"
        self.done = 0  # steps completed
        self.recorder = None

    def _data(self) -> None:
        opts = self.opts
        train, self.heldout = split_data(opts, self.tokenizer, self.dist)
        self.batches = Batches(train, opts.batch_size, opts.grad_accum, self.dist, opts.seed)
        if train.shape[0] < self.batches.global_batch:
            raise UsageError(
                f"data {opts.data} gives {train.shape[0]} blocks of --seq-len {opts.seq_len}, fewer than one "
                f"global batch ({self.batches.global_batch} = batch x accum x ranks); give more text or "
                "a smaller --batch-size/--seq-len"
            )
        self.tokens_per_step = self.batches.global_batch * opts.seq_len
        self.steps = self._total_steps(train.shape[0])

    def _optimizers(self) -> None:
        """AdamW for dense parameters, RowSparseAdam for PEER expert tables; one schedule for both."""
        opts = self.opts
        self.lr = opts.lr or DEFAULT_LR[opts.train]
        self.warmup = opts.warmup if opts.warmup is not None else self.steps // 20
        self.opt = optim.adamw(self.dense, self.lr, opts.weight_decay, self.device) if self.dense else None
        self.row_opt = (
            optim.RowSparseAdam([p for _, p in self.rows], lr=self.lr, weight_decay=opts.weight_decay)
            if self.rows
            else None
        )
        factor = optim.schedule(opts.schedule, self.warmup, self.steps)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (self.opt, self.row_opt) if o is not None]
        self.scaler = torch.amp.GradScaler(self.device.split(":")[0], enabled=self.amp == torch.float16)

    def _total_steps(self, n_blocks: int) -> int:
        if self.opts.steps is not None:
            return self.opts.steps
        if self.opts.tokens is not None:
            return -(-self.opts.tokens // self.tokens_per_step)
        return max(1, n_blocks // self.batches.global_batch)  # one pass over the data

    def _compile(self) -> None:
        """Compile each routed block and plain layer: a block's H steps (routing, grouped dispatch,
        attention) trace as one graph, with no host reads."""
        from mom_cli.modeling.modeling_mom import MomBlock, PlainLayer

        for module in self.model.modules():
            if isinstance(module, (MomBlock, PlainLayer)):
                module.compile()

    def _teacher(self) -> nn.Module:
        ref = self.opts.distill
        if ref == "source":
            ref = source_model(self.ckpt, self.config, "--distill MODEL")
        return load_teacher(ref, self.config, self.device, self.amp, "--distill MODEL")

    # ------------------------------------------------------------------- state

    def fingerprint(self) -> dict[str, Any]:
        """What must match for `resume` to continue the same run: every option but RESUME_SAFE, and
        the values derived from them and from the data (steps, lr, warmup, global batch)."""
        o = self.opts
        # grad_accum and the number of ranks enter through the global batch: one process with
        # accumulation 2 and two processes without it run the same micro-batches, the same steps.
        fp: dict[str, Any] = {k: v for k, v in asdict(o).items() if k not in (*RESUME_SAFE, "grad_accum")}
        fp.update(
            checkpoint=str(self.ckpt.resolve()),
            data=tokencache.cache_path(o.data, self.tokenizer).name if not o.data.startswith("hf:") else o.data,
            steps=self.steps,
            global_batch=self.batches.global_batch,
            lr=self.lr,
            warmup=self.warmup,
            aux_loss_coef=self.coef,
            dtype=str(self.amp),
        )
        return fp

    def prepare_state_dir(self, force: bool) -> None:
        prepare_state_dir(self.work, "training", self.opts.resume, force, self.dist, self.load_state)

    def save_state(self) -> None:
        params = distributed.full_params(self.dist, [*self.dense, *self.rows])  # collectives under FSDP
        opt = distributed.full_optim_state(self.dist, self.model, self.opt) if self.opt else None
        if not self.dist.main:
            return
        state = {
            "step": self.done,
            "fingerprint": self.fingerprint(),
            "params": params,
            "opt": opt,
            "row_opt": self.row_opt.state_dict() if self.row_opt else None,
            "scheds": [s.state_dict() for s in self.scheds],
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }
        save_state_file(self.work / STATE_FILE, state)

    def load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
        except Exception as e:
            raise MomError(f"cannot read the training state {path}: {one_line(e, 160)}; start over with --force") from e
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise MomError(
                f"the training state {path} does not have the structure this run needs "
                f"({type(e).__name__}: {one_line(e, 80)}); start over with --force"
            ) from e
        log(f"resuming {self.work} at step {self.done}/{self.steps}")

    def _restore(self, state: dict) -> None:
        saved, now = state["fingerprint"], self.fingerprint()
        diff = [f"{k} ({saved.get(k)} saved, {now[k]} now)" for k in now if saved.get(k) != now[k]]
        if diff:
            raise UsageError(
                f"--resume: the saved run differs in {', '.join(diff[:3])}; run with its options, "
                "or --force without --resume to start over"
            )
        distributed.load_params(self.dense + self.rows, state["params"])
        if self.opt:
            distributed.load_optim_state(self.model, self.opt, state["opt"])
        if self.row_opt:
            self.row_opt.load_state_dict(state["row_opt"])
        for s, sd in zip(self.scheds, state["scheds"]):
            s.load_state_dict(sd)
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.done = int(state["step"])

    # ------------------------------------------------------------------- steps

    def autocast(self):
        if self.amp == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.amp)

    def train_step(self, step: int) -> dict[str, float]:
        params = [p for _, p in (*self.dense, *self.rows)]
        sums: dict[str, torch.Tensor] = {}
        for a, x in enumerate(self.batches.micro_batches(step)):
            last = a == self.opts.grad_accum - 1
            sync = nullcontext() if last or not self.dist.active else distributed.no_sync(self.ddp)
            with sync:
                with self.autocast():
                    parts = step_losses(self.ddp, self.teacher, x.to(self.device), self.coef)
                self.scaler.scale(parts["loss"] / self.opts.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / self.opts.grad_accum
        if self.sharded:
            distributed.drop_unused_grads([*self.dense, *self.rows], self.used)
        for o in (self.opt, self.row_opt):
            if o is not None:
                self.scaler.unscale_(o)
        if self.opts.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.opts.max_grad_norm)
        for o in (self.opt, self.row_opt):
            if o is not None:
                self.scaler.step(o)
        self.scaler.update()
        for s in self.scheds:
            s.step()
        for o in (self.opt, self.row_opt):
            if o is not None:
                o.zero_grad(set_to_none=True)
        names = sorted(sums)
        values = distributed.mean(self.dist, torch.stack([sums[k] for k in names])).tolist()
        return dict(zip(names, values))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Held-out perplexity on rank 0; the other ranks wait at the next step's all-reduce, except
        under FSDP, where every forward is a collective: every rank runs it, rank 0 reports."""
        if self.heldout is None or not (self.dist.main or self.sharded):
            return None
        self.model.eval()
        recorder, self.model.model.recorder = self.model.model.recorder, None  # routing of training steps only
        try:
            loss, _ = heldout_loss(self.model, self.heldout, self.opts.batch_size, self.device, self.autocast)
        finally:
            self.model.train()
            self.model.model.recorder = recorder
        return math.exp(loss) if self.dist.main else None


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_state_file(path: Path, state: dict[str, Any]) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the save leaves the previous state


# ----------------------------------------------------------------------------- metrics


def complete_lines(path: Path) -> list[dict[str, Any]]:
    """The metrics up to the first line a kill cut short (or damaged): a resumed run goes on from there."""
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:  # what follows the last newline is incomplete
        try:
            value = json.loads(line)
        except ValueError:
            break
        if not isinstance(value, dict) or not isinstance(value.get("step"), int):
            break
        out.append(value)
    return out


class Metrics:
    """train_metrics.jsonl in the state dir (rank 0), plus TensorBoard when it is installed."""

    def __init__(self, work: Path, main: bool, resume_step: int, name: str = METRICS_FILE) -> None:
        self.path = work / name
        self.main = main
        self.tb = None
        if not main:
            return
        if self.path.exists():  # drop what was logged after the saved state
            kept = [ln for ln in complete_lines(self.path) if ln["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(ln) + "\n" for ln in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work / "tensorboard"))
        except ImportError:
            pass

    def write(self, line: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:  # one write per line: a kill leaves at most a partial last line
            f.write(json.dumps(line) + "\n")
        if self.tb is not None:
            for k, v in line.items():
                if k not in ("step", "tokens") and isinstance(v, (int, float)):  # not the stage or region names
                    self.tb.add_scalar(k, v, line["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_bar(label: str = "training"):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        console=console.stderr,
        disable=console.QUIET,
        transient=True,
    )


# ----------------------------------------------------------------------------- output


def write_output(run: Run, weights: dict[str, torch.Tensor], stats: dict | None, stat_tokens: int, force: bool) -> None:
    """The trained model as a normal MoM checkpoint (rank 0), with metrics and routing statistics."""
    from mom_cli.analysis import routing_stats
    from mom_cli.io import provenance
    from mom_cli.io.atomic import atomic_dir
    from mom_cli.io.checkpoint import copy_extras, write_checkpoint
    from mom_cli.modeling.configuration_mom import MomConfig

    o = run.opts
    args = {k: v for k, v in asdict(o).items() if k not in ("stop_after",)}
    args.update(
        steps=run.steps,
        tokens=run.steps * run.tokens_per_step,
        lr=run.lr,
        warmup=run.warmup,
        aux_loss_coef=run.coef,
        ranks=run.dist.world,
    )
    new = MomConfig.from_dict(run.config.to_dict())
    new.mom_provenance = [*run.config.mom_provenance, provenance.record("train-routers", args, str(run.ckpt))]
    new.aux_loss_coef = run.coef
    tensors = planned_weights(run.ckpt, new, weights)
    with atomic_dir(run.out, force) as tmp:
        write_checkpoint(tmp, new, tensors, lambda dst: copy_extras(run.ckpt, dst))
        shutil.copy2(run.work / METRICS_FILE, tmp / METRICS_FILE)
        if (run.work / "tensorboard").is_dir():
            shutil.copytree(run.work / "tensorboard", tmp / "tensorboard")
        if stats:
            routing_stats.save(tmp, stats, stat_tokens)
    if not o.keep_state:
        shutil.rmtree(run.work, ignore_errors=True)


def planned_weights(ckpt: Path, config: Any, weights: dict[str, torch.Tensor]) -> list:
    """The output tensors of `config` from `weights`, each in the dtype the checkpoint stored it in."""
    from mom_cli.io.checkpoint import param_shapes
    from mom_cli.io.tensorio import PlannedTensor, SafetensorsReader

    reader = SafetensorsReader(ckpt)
    stored = reader.keys()
    return [
        PlannedTensor(
            name, shape, reader.dtype(name) if name in stored else torch.float32, lambda name=name: weights[name]
        )
        for name, shape in param_shapes(config).items()
    ]


def reduced_stats(run: Run) -> dict | None:
    """The routing statistics of the recorded steps, summed over ranks."""
    if run.recorder is None:
        return None
    return {
        key: (distributed.total(run.dist, c), distributed.total(run.dist, m))
        for key, (c, m) in sorted(run.recorder.stats.items())
    }


# ----------------------------------------------------------------------------- the command


@releases_locks
def train(ckpt: Path, out: Path, opts: TrainOptions, force: bool = False) -> TrainResult:
    """Train `ckpt` per `opts` and write the result to `out` (see the module docstring)."""
    from mom_cli.io.atomic import check_output
    from mom_cli.io.loading import pick_device

    ckpt, out = Path(ckpt), Path(out)
    check_options(opts)
    check_output(out, force)  # fail before training for hours
    d = distributed.from_env()
    if not d.main:  # rank 0 speaks for the job
        console.QUIET = True
    check_strategy(opts, d)
    device = distributed.init(d, pick_device(opts.device))
    try:
        torch.manual_seed(opts.seed)
        run = Run(ckpt, out, opts, d, device)
        run.prepare_state_dir(force)
        return _loop(run, force)
    finally:
        distributed.shutdown(d)


def _loop(run: Run, force: bool) -> TrainResult:
    from mom_cli.modeling.modeling_mom import RoutingRecorder

    o, d = run.opts, run.dist
    metrics = Metrics(run.work, d.main, run.done)
    record_from = run.steps - max(1, min(50, run.steps // 10))  # routing statistics over the last steps
    n_trainable = sum(p.numel() for _, p in (*run.dense, *run.rows))
    adapters = f" + LoRA rank {o.lora}" if o.lora else ""
    log(
        f"train-routers {run.ckpt}: --train {o.train}{adapters} ({n_trainable:,} parameters), {run.steps} steps of "
        f"{run.tokens_per_step} tokens, {d.world} process(es) on {run.device}, autocast {run.amp}"
    )
    if run.coef > 0 and one_module_per_step(run.config) and d.main:
        warn(
            f"{run.ckpt} runs one module per step (depth = pool size, top-1, as decompose leaves it): the "
            f"load-balancing loss (--aux-loss-coef {run.coef:g}) pushes every step off its own module, which can "
            "wreck the model; pass --aux-loss-coef 0 to train with this routing kept"
        )
    before = run.evaluate() if run.done == 0 else None
    if before is not None:
        metrics.write({"step": 0, "tokens": 0, "eval_loss": math.log(before), "eval_ppl": before})
    first = last = None
    start = time.perf_counter()
    start_step = run.done
    with progress_bar() as bar:
        task = bar.add_task("training", total=run.steps, completed=run.done, loss="-", tps="-")
        for step in range(run.done, run.steps):
            if step >= record_from and run.recorder is None:
                run.recorder = run.model.model.recorder = RoutingRecorder()
            t0 = time.perf_counter()
            m = run.train_step(step)
            if not math.isfinite(m["loss"]):
                raise MomError(
                    f"the loss became {m['loss']} at step {step + 1}; lower --lr (or use --dtype bf16/fp32), "
                    f"and --resume from the last saved state if there is one"
                )
            run.done = step + 1
            tps = run.tokens_per_step / (time.perf_counter() - t0)
            first = m["loss"] if first is None else first
            last = m["loss"]
            metrics.write(
                {
                    "step": run.done,
                    "tokens": run.done * run.tokens_per_step,
                    "loss": m["loss"],
                    "lm_loss": m["lm_loss"],
                    "aux_loss": m.get("aux_loss"),
                    "kl": m.get("kl"),
                    "lr": run.scheds[0].get_last_lr()[0],
                    "tokens_per_s": tps,
                }
            )
            bar.update(task, completed=run.done, loss=f"{m['loss']:.4f}", tps=f"{tps:.0f}")
            if o.eval_every and run.done % o.eval_every == 0 and run.done < run.steps:
                _log_eval(run, metrics)
            if o.save_every and run.done % o.save_every == 0:
                run.save_state()
            if run.done == o.stop_after:
                return _result(run, None, first, last, before, None, time.perf_counter() - start, start_step)
    seconds = time.perf_counter() - start  # the training steps only: not evaluation or writing
    run.model.model.recorder = None
    after = _log_eval(run, metrics)
    stats = reduced_stats(run)
    metrics.close()
    stat_tokens = (run.steps - max(record_from, start_step)) * run.tokens_per_step
    if run.lora is not None:  # the checkpoint stores plain weights: W + B·A
        lora.merge(run.lora)
    weights = distributed.full_state_dict(d, run.model)  # a collective under FSDP
    if d.main:
        write_output(run, weights, stats, stat_tokens, force)
    distributed.barrier(d)
    return _result(run, run.out if d.main else None, first, last, before, after, seconds, start_step)


def _log_eval(run: Run, metrics: Metrics) -> float | None:
    ppl = run.evaluate()
    if ppl is not None:
        metrics.write(
            {"step": run.done, "tokens": run.done * run.tokens_per_step, "eval_loss": math.log(ppl), "eval_ppl": ppl}
        )
        log(f"step {run.done}: held-out perplexity {ppl:.4f}")
    return ppl


def _result(run: Run, path: Path | None, first, last, before, after, seconds: float, start_step: int) -> TrainResult:
    tokens = (run.done - start_step) * run.tokens_per_step
    return TrainResult(
        path,
        run.done,
        run.done * run.tokens_per_step,
        seconds,
        tokens / seconds if seconds else 0.0,
        first,
        last,
        before,
        after,
        sum(p.numel() for _, p in (*run.dense, *run.rows)),
        run.dist.main,
    )
