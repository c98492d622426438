"""The `mom` command line: parses options, calls the library, prints the result.

stdout carries only results (an output path, or JSON with --json); everything for people goes
to stderr. Errors are one line, exit 2 for usage and 1 for failures; --debug shows tracebacks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

from mom_cli import console
from mom_cli.cli import render
from mom_cli.cli.argv import options_from_context
from mom_cli.errors import MomError, UsageError

app = typer.Typer(
    name="mom",
    help="Model surgery for pretrained Transformers: Mixture-of-Modules, PEER experts, pruning.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
DEBUG = False

Force = typer.Option(False, "--force", help="Replace an existing output.")
Json = typer.Option(False, "--json", help="Print a JSON result on stdout.")


def _show_version(value: bool) -> None:
    if value:
        from mom_cli.io.provenance import version

        print(f"mom {version()}")
        raise typer.Exit()


@app.callback()
def _global(
    version: bool = typer.Option(
        False, "--version", "-V", is_eager=True, callback=_show_version, help="Print mom's version and exit."
    ),
) -> None:
    """Model surgery for pretrained Transformers: Mixture-of-Modules, PEER experts, pruning."""


def checkpoint_arg(value: str) -> str:
    """`-` means: read the path from stdin (the previous command of a pipe printed it)."""
    if value != "-":
        return value
    line = sys.stdin.readline().strip()
    if not line:
        raise UsageError("expected a checkpoint path on stdin from the previous command, got nothing (did it fail?)")
    return line


def _json(value: object) -> str:
    """JSON as the standard has it: NaN and infinities (which json.dumps writes bare) become null."""

    def finite(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), default=str, allow_nan=False)


def _piped() -> bool:
    """stdout is a pipe or file of the shell (not a terminal, not a recipe step's capture)."""
    try:
        return not os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def emit(path: Path, as_json: bool, **extra: object) -> None:
    if as_json:
        print(_json({"path": str(path), **extra}))
    else:
        print(path)


@app.command()
def decompose(
    source: str = typer.Argument(
        ..., help="Hub id, local transformers directory, .gguf file, or an alias such as smollm2-135m."
    ),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output directory (default: SOURCE-mom beside the input)."
    ),
    pool_size: Optional[int] = typer.Option(
        None, "--pool-size", help="M: modules per pool (default: all middle layers, one block)."
    ),
    depth: Optional[int] = typer.Option(None, "--depth", help="H: routed steps per block (default: M)."),
    top_k: int = typer.Option(1, "--top-k", help="K: modules each router picks per step."),
    bottom: int = typer.Option(0, "--bottom", help="Plain layers kept below the blocks."),
    top: int = typer.Option(0, "--top", help="Plain layers kept above the blocks."),
    router: str = typer.Option("gru", "--router", help="gru (state across steps, as the paper) or mlp."),
    router_hidden: int = typer.Option(256, "--router-hidden", help="Router hidden size."),
    temperature: float = typer.Option(0.2, "--temperature", help="Softmax temperature of the routing weights."),
    no_skip: bool = typer.Option(False, "--no-skip", help="No SKIP module in the pools."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as the source), float32, float16 or bfloat16."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest weights file before sharding."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Read pickled .bin weights (weights_only) if no safetensors."
    ),
    no_verify: bool = typer.Option(
        False, "--no-verify", help="Skip checking each layer against the source's own transformers layer."
    ),
    force: bool = Force,
    as_json: bool = Json,
) -> None:
    """Turn a pretrained Transformer into a Mixture-of-Modules checkpoint.

    The default plan keeps the function: step h of the one block picks module h.

    Example: mom decompose gpt2 -o gpt2-mom --depth 6 --top-k 2
    """
    from mom_cli.io.loading import parse_dtype
    from mom_cli.io.tensorio import parse_size
    from mom_cli.surgery.decompose import PlanOptions, default_output
    from mom_cli.surgery.decompose import decompose as run

    _quiet_third_party()
    source = checkpoint_arg(source)
    opts = options_from_context(PlanOptions, skip=not no_skip)
    out = output or default_output(source, "-mom")
    path = run(source, out, opts, parse_dtype(dtype), force, allow_pickle, parse_size(shard_size), verify=not no_verify)
    if _piped():  # piped on: say where the checkpoint stays once the pipe is done with it
        console.log(f"the checkpoint is at {Path(path).resolve()}; it stays there after the pipe")
    emit(path, as_json)


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="MoM checkpoint directory, or - to read it from stdin."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Output directory (or .safetensors file with --format safetensors)."
    ),
    fmt: str = typer.Option(
        "hf", "--format", help="hf (standard family format when possible, else trust_remote_code) or safetensors."
    ),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest weights file before sharding."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as stored), float32, float16 or bfloat16."),
    push_to_hub: Optional[str] = typer.Option(
        None,
        "--push-to-hub",
        metavar="REPO",
        help="Then upload the directory to this Hugging Face Hub model repo (created if needed).",
    ),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    force: bool = Force,
    as_json: bool = Json,
) -> None:
    """Write a MoM checkpoint in a format other tools load.

    Example: mom decompose gpt2 | mom export - -o gpt2-plain
    """
    from mom_cli.io.loading import parse_dtype
    from mom_cli.io.tensorio import parse_size
    from mom_cli.surgery.export import export as run
    from mom_cli.surgery.export import push_to_hub as push

    ckpt = Path(checkpoint_arg(checkpoint))
    if push_to_hub is not None:  # before the export: a bad repo id must not cost an export first
        from mom_cli.surgery.export import check_repo_id

        check_repo_id(push_to_hub)
        if output.suffix == ".safetensors":
            raise UsageError("--push-to-hub uploads a model directory: give a directory as -o")
    path, kind = run(ckpt, output, fmt, parse_dtype(dtype), parse_size(shard_size), force)
    extra = {"hub": push(path, push_to_hub, private)} if push_to_hub is not None else {}
    if extra:
        console.log(f"pushed to {extra['hub']}")
    emit(path, as_json, format=fmt, kind=kind, **extra)


@app.command("eval")
def eval_(
    model: list[str] = typer.Argument(
        ...,
        metavar="MODEL...",
        help="MoM checkpoints, transformers directories, hub ids, "
        ".gguf files, or - (the first); --tasks compares them side by side.",
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="Perplexity on .txt/.jsonl/.parquet, a folder, or hf:NAME[:CONFIG[:SPLIT]]."
    ),
    tasks: Optional[str] = typer.Option(
        None,
        "--tasks",
        metavar="T1,T2",
        help="lm-evaluation-harness tasks: names (hellaswag,arc_easy) or .yaml task files (offline).",
    ),
    num_fewshot: Optional[int] = typer.Option(
        None, "--num-fewshot", help="Few-shot examples per task (default: the task's)."
    ),
    limit: Optional[float] = typer.Option(None, "--limit", help="Examples per task (below 1: a share of each task)."),
    record: bool = typer.Option(
        False, "--record", help="Write the task scores into the MoM checkpoint's provenance and model card."
    ),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence (--data)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Evaluate at most this many tokens (--data)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward pass."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as stored), float32, float16 or bfloat16."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickled .bin weights (weights_only)."),
    as_json: bool = Json,
) -> None:
    """Perplexity on text (--data), or lm-evaluation-harness tasks (--tasks) side by side.

    Example: mom eval gpt2 gpt2-pruned --tasks hellaswag,arc_easy --limit 200
    """
    from mom_cli.io.loading import parse_dtype, pick_device

    _quiet_third_party()
    refs = [checkpoint_arg(m) if i == 0 else m for i, m in enumerate(model)]
    if (data is None) == (tasks is None):
        raise UsageError("give --data (perplexity) or --tasks (lm-eval tasks), one of the two")
    if batch_size < 1 or (limit is not None and limit <= 0) or (num_fewshot is not None and num_fewshot < 0):
        raise UsageError("--batch-size must be >= 1, --limit > 0 and --num-fewshot >= 0")
    if tasks is not None:
        from mom_cli.analysis.tasks import TaskOptions, check_recordable, comparison, evaluate_models
        from mom_cli.analysis.tasks import record as record_scores

        if record and len(refs) > 1:
            raise UsageError("--record writes one checkpoint's scores: give one model")
        if record:
            check_recordable(refs[0])
        opts = TaskOptions(
            [t.strip() for t in tasks.split(",")],
            num_fewshot,
            limit,
            batch_size,
            pick_device(device),
            parse_dtype(dtype),
            allow_pickle,
        )
        results = evaluate_models(refs, opts)
        if record:
            record_scores(results[0])
        if as_json:
            for r in results:
                print(_json(r.as_dict()))
        else:
            render.print_tasks(comparison(results), [r.model for r in results])
        return
    if record:
        raise UsageError("--record writes task scores: use it with --tasks")
    if len(refs) > 1:
        raise UsageError("--data measures one model at a time; --tasks compares several")
    from mom_cli.analysis.evaluate import check_eval_options, evaluate
    from mom_cli.io.loading import load_model

    check_eval_options(seq_len, batch_size, max_tokens)  # before minutes of loading
    dev = pick_device(device)
    m, tok = load_model(refs[0], dev, parse_dtype(dtype), allow_pickle)
    result = evaluate(m, tok, refs[0], data, seq_len, max_tokens, batch_size, dev)
    if as_json:
        print(_json(result.as_dict()))
    else:
        console.log(f"{result.tokens} tokens in {result.seconds:.1f}s ({result.tokens_per_second:.0f} tokens/s)")
        print(f"perplexity {result.perplexity:.4f}")


@app.command()
def info(
    checkpoint: str = typer.Argument(..., help="MoM checkpoint directory, or -."),
    seq_len: int = typer.Option(1024, "--seq-len", help="Context length for the attention FLOPs."),
    as_json: bool = Json,
) -> None:
    """Plan, pools, parameters (total, active per token), FLOPs per token and provenance.

    Example: mom info gpt2-mom --json
    """
    from mom_cli.analysis.info import summary
    from mom_cli.io.checkpoint import read_mom

    config, reader = read_mom(Path(checkpoint_arg(checkpoint)))
    s = summary(config, seq_len, reader.get)
    if as_json:
        print(_json(s))
        return
    render.print_info(s)


@app.command()
def prune(
    checkpoint: str = typer.Argument(..., help="MoM checkpoint directory, or - to read it from stdin."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output directory (default: CKPT-pruned beside it)."
    ),
    keep_mha: Optional[str] = typer.Option(
        None,
        "--keep-mha",
        metavar="[N|P%]",
        help="MHA modules to keep: a count or a share; the flag alone keeps all. Default 50%.",
    ),
    keep_ffn: Optional[str] = typer.Option(
        None, "--keep-ffn", metavar="[N|P%]", help="FFN modules to keep; the flag alone (or no flag) keeps all of them."
    ),
    metric: Optional[str] = typer.Option(
        None,
        "--metric",
        help="greedy, loss, cosine, block-influence or usage (default: greedy when affordable, else loss).",
    ),
    data: str = typer.Option(..., "--data", help="Calibration text: .txt/.jsonl/.parquet, a folder, or hf:NAME."),
    calib_tokens: Optional[int] = typer.Option(
        None,
        "--calib-tokens",
        help="Calibration tokens the scores are measured on (default: sized to the model, 256 to 8192).",
    ),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward pass."),
    eval_data: Optional[str] = typer.Option(
        None, "--eval-data", help="Held-out text (default: DATA after the calibration tokens)."
    ),
    greedy_width: int = typer.Option(
        8, "--greedy-width", help="Candidates greedy re-measures per round after the first."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="Draw scores and perplexity against modules removed (.png)."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as stored), float32, float16 or bfloat16."),
    force: bool = Force,
    as_json: bool = Json,
) -> None:
    """Measure which MHA and FFN modules are redundant and remove them.

    Example: mom prune gpt2-mom --keep-ffn --keep-mha 50% --data docs/ -o gpt2-half-attn
    """
    from mom_cli.io.loading import parse_dtype, pick_device
    from mom_cli.surgery.decompose import default_output
    from mom_cli.surgery.prune import PruneOptions
    from mom_cli.surgery.prune import prune as run

    _quiet_third_party()
    ckpt = Path(checkpoint_arg(checkpoint))
    out = output or default_output(str(ckpt), "-pruned")
    opts = options_from_context(PruneOptions, device=pick_device(device), dtype=parse_dtype(dtype))
    _emit_report(run(ckpt, out, opts, force).as_dict(), out, as_json, render.print_prune)


def _emit_report(report: dict, out: Path, as_json: bool, show: Callable[[dict], None]) -> None:
    """--json: the report on stdout; otherwise its table on stderr (`show`) and the output path on stdout."""
    if as_json:
        print(_json(report))
        return
    show(report)
    print(out)


@app.command("convert-peer")
def convert_peer(
    checkpoint: str = typer.Argument(..., help="MoM checkpoint directory, or - to read it from stdin."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output directory (default: CKPT-peer beside it)."
    ),
    layers: str = typer.Option(
        ...,
        "--layers",
        metavar="SPEC",
        help="FFN modules by source layer: 10-19, 0,4,8, all (every dense pooled one) or middle (their middle third).",
    ),
    experts: Optional[int] = typer.Option(
        None, "--experts", help="N experts, a perfect square (default: the smallest >= d_ff)."
    ),
    heads: int = typer.Option(8, "--heads", help="h query heads sharing the pool."),
    topk: Optional[int] = typer.Option(None, "--topk", help="k experts per head (default: h*k = 50% of d_ff)."),
    key_dim: int = typer.Option(128, "--key-dim", help="d_key: query/key width, two halves of d_key/2."),
    gate: Optional[str] = typer.Option(
        None,
        "--gate",
        help="softmax, sigmoid or none (default: none with --init neurons, "
        "the FFN's own sum; softmax with --init random, as the paper).",
    ),
    init: str = typer.Option(
        "neurons", "--init", help="neurons (expert i = a trained neuron) or random (a fresh layer, as the paper)."
    ),
    no_query_bn: bool = typer.Option(False, "--no-query-bn", help="No BatchNorm on the query (the paper has it)."),
    per_head_keys: bool = typer.Option(
        False, "--per-head-keys", help="Each head its own sub-keys (default: shared, as the paper)."
    ),
    drop_neurons: Optional[str] = typer.Option(
        None,
        "--drop-neurons",
        metavar="SPEC",
        help="Neurons left out when N < d_ff: weakest (keep the N strongest) or indexes (0-99,512).",
    ),
    calibrate: Optional[str] = typer.Option(
        None,
        "--calibrate",
        metavar="DATA",
        help="Train retrieval to reproduce each dense layer on this text (.txt/.jsonl/.parquet, folder, hf:).",
    ),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", help="Calibration tokens."),
    calib_steps: int = typer.Option(30, "--calib-steps", help="Calibration steps per layer."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward pass."),
    eval_data: Optional[str] = typer.Option(
        None, "--eval-data", help="Held-out text (default: DATA after the calibration tokens)."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as stored), float32, float16 or bfloat16."),
    force: bool = Force,
    as_json: bool = Json,
) -> None:
    """Replace dense FFN modules with PEER layers whose experts are the trained neurons.

    Example: mom convert-peer smol-mom --layers 10-19 --calibrate docs/ -o smol-peer
    """
    from mom_cli.io.loading import parse_dtype, pick_device
    from mom_cli.surgery.convert_peer import ConvertOptions
    from mom_cli.surgery.convert_peer import convert_peer as run
    from mom_cli.surgery.decompose import default_output

    _quiet_third_party()
    ckpt = Path(checkpoint_arg(checkpoint))
    out = output or default_output(str(ckpt), "-peer")
    opts = options_from_context(
        ConvertOptions,
        query_bn=not no_query_bn,
        shared_keys=not per_head_keys,
        device=pick_device(device),
        dtype=parse_dtype(dtype),
    )
    _emit_report(run(ckpt, out, opts, force).as_dict(), out, as_json, render.print_convert_peer)


@app.command("train-routers")
def train_routers(
    checkpoint: str = typer.Argument(..., help="MoM checkpoint directory, or - to read it from stdin."),
    data: str = typer.Option(
        ..., "--data", help="Training text: .txt/.jsonl/.parquet, a folder, or hf:NAME[:CONFIG[:SPLIT]]."
    ),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output directory (default: CKPT-trained beside it)."
    ),
    train: str = typer.Option(
        "routers",
        "--train",
        help="routers (+ PEER queries and keys), routers+peer (+ PEER expert tables, sparse updates) or all.",
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: one pass over DATA)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Train on this many tokens instead of --steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per micro-batch, per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence."),
    lr: Optional[float] = typer.Option(
        None, "--lr", help="Peak learning rate (default: 1e-3 for routers, 1e-4 for all)."
    ),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warm-up steps (default: 5% of the steps)."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine (down to 10% of --lr) or constant."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay of weight matrices."),
    aux_loss_coef: Optional[float] = typer.Option(
        None, "--aux-loss-coef", help="Load-balancing loss weight (default: the checkpoint's, 0.01)."
    ),
    distill: Optional[str] = typer.Option(
        None,
        "--distill",
        metavar="[TEACHER]",
        help="Train toward a teacher's logits (KL); "
        "the flag alone (or `source`) uses the source model in the provenance.",
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="Autocast dtype: bf16, fp16, fp32, or auto (bf16 on GPUs, fp32 on CPU)."
    ),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the dense modules."),
    grad_checkpointing: bool = typer.Option(
        False, "--grad-checkpointing", help="Recompute activations in backward (long sequences)."
    ),
    eval_data: Optional[str] = typer.Option(
        None, "--eval-data", help="Held-out text (default: the last blocks of DATA)."
    ),
    eval_every: int = typer.Option(
        0, "--eval-every", help="Held-out perplexity every N steps (always at start and end)."
    ),
    eval_tokens: int = typer.Option(32768, "--eval-tokens", help="Held-out tokens per evaluation."),
    save_every: int = typer.Option(0, "--save-every", help="Save the training state every N steps (OUT.train-state/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the saved training state."),
    keep_state: bool = typer.Option(False, "--keep-state", help="Keep OUT.train-state/ after the run completes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order."),
    lora: Optional[int] = typer.Option(
        None,
        "--lora",
        metavar="RANK",
        help="Also train rank-RANK LoRA adapters on "
        "the MHA/FFN projections (cheaper than --train all), merged into the output.",
    ),
    strategy: str = typer.Option(
        "ddp",
        "--strategy",
        help="Under torchrun: ddp (the whole model on every process) or "
        "fsdp (parameters, gradients and optimizer state sharded over the processes).",
    ),
    force: bool = Force,
    as_json: bool = Json,
) -> None:
    """Train the routers (and, when asked, PEER experts or everything) of a MoM checkpoint.

    Scale out with: torchrun --nproc-per-node N -m mom_cli train-routers ...

    Example: mom train-routers smol-c15 --data docs/ --distill --steps 500 --seq-len 256 -o smol-c15-trained
    """
    from mom_cli.surgery.decompose import default_output
    from mom_cli.training.train import TrainOptions
    from mom_cli.training.train import train as run

    _quiet_third_party()
    ckpt = Path(checkpoint_arg(checkpoint))
    out = output or default_output(str(ckpt), "-trained")
    opts = options_from_context(TrainOptions, compile=compile_)
    result = run(ckpt, out, opts, force)
    if not result.main:  # other torchrun ranks: rank 0 prints the result
        return
    if as_json:
        print(_json(result.as_dict()))
        return
    if result.loss_first is not None:
        console.log(
            f"{result.tokens:,} tokens in {result.seconds:.1f}s ({result.tokens_per_second:.0f} tokens/s); "
            f"loss {result.loss_first:.4f} -> {result.loss_last:.4f}"
        )
    print(result.path)


@app.command()
def heal(
    checkpoint: str = typer.Argument(
        ..., help="MoM checkpoint directory made by a lossy surgery, or - to read it from stdin."
    ),
    data: str = typer.Option(
        ..., "--data", help="Healing text: .txt/.jsonl/.parquet, a folder, or hf:NAME[:CONFIG[:SPLIT]]."
    ),
    teacher: Optional[str] = typer.Option(
        None, "--teacher", metavar="MODEL", help="The model to distil from (default: the source in the provenance)."
    ),
    budget: Optional[str] = typer.Option(
        None,
        "--budget",
        metavar="TOKENS|DURATION",
        help="Tokens (2M, 500k) or wall time (30m, 90s, 2h; lowercase m = minutes). Default: one pass over DATA.",
    ),
    train: str = typer.Option(
        "auto",
        "--train",
        help="auto (PEER experts+queries+keys; modules after a pruned one; a block's "
        "routers and modules), retrieval (PEER queries and keys, routers) or all (everything in a region).",
    ),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output directory (default: CKPT-healed beside it)."
    ),
    local_share: float = typer.Option(
        0.3,
        "--local-share",
        help="Share of the budget for the local stage (the rest: end-to-end); 0.7 suits a depth change.",
    ),
    local_inputs: str = typer.Option(
        "student",
        "--local-inputs",
        help="Local stage: a region learns from the student's own state at its input, which the regions "
        "before it changed (student), or from the teacher's (teacher; regions independent, as under torchrun).",
    ),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per step."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate of the local stage."),
    retrieval_loss: float = typer.Option(
        1.0,
        "--retrieval-loss",
        help="Local stage: weight of the PEER retrieval term (queries and keys learn to find the experts "
        "that contribute most); 0 for the output error alone.",
    ),
    global_lr: float = typer.Option(1e-3, "--global-lr", help="Peak learning rate of the end-to-end stage."),
    schedule: str = typer.Option(
        "cosine", "--schedule", help="cosine (down to 10% of the peak) or constant, over each stage's budget."
    ),
    cache_size: str = typer.Option(
        "4G", "--cache-size", help="Most bytes of teacher hidden states cached on disk (bf16)."
    ),
    eval_data: Optional[str] = typer.Option(
        None, "--eval-data", help="Held-out text (default: the last blocks of DATA)."
    ),
    eval_tokens: int = typer.Option(
        32768, "--eval-tokens", help="Held-out tokens for the perplexity before and after."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="Autocast dtype: bf16, fp32, or auto (bf16 on GPUs and on CPUs with native bf16, AVX512-BF16 or "
        "AMX; fp32 otherwise).",
    ),
    save_every: int = typer.Option(0, "--save-every", help="Save the state every N steps (OUT.heal-state/)."),
    eval_every: int = typer.Option(
        0, "--eval-every", help="Held-out perplexity every N steps too, outside the time budget (the curve)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the saved state."),
    keep_state: bool = typer.Option(
        False, "--keep-state", help="Keep OUT.heal-state/ (and its teacher cache) after the run."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order."),
    force: bool = Force,
    as_json: bool = Json,
) -> None:
    """Win back what a surgery cost: each changed region learns the source's hidden states, then a short
    end-to-end distillation.

    Scale out with: torchrun --nproc-per-node N -m mom_cli heal ...

    Example: mom heal smol-peer --data docs/ --budget 30m -o smol-peer-healed
    """
    from mom_cli.surgery.decompose import default_output
    from mom_cli.training.heal import HealOptions
    from mom_cli.training.heal import heal as run

    _quiet_third_party()
    ckpt = Path(checkpoint_arg(checkpoint))
    out = output or default_output(str(ckpt), "-healed")
    opts = options_from_context(HealOptions)
    result = run(ckpt, out, opts, force)
    if result.main:
        _emit_report(result.as_dict(), out, as_json, render.print_heal)


# ----------------------------------------------------------------------------- recipes and pictures

recipes_app = typer.Typer(help="The shipped recipes: list, show, copy to edit.", no_args_is_help=True)
plot_app = typer.Typer(
    help="Pictures: routing heatmaps and paths, pruning scores, training curves.", no_args_is_help=True
)
app.add_typer(recipes_app, name="recipes")
app.add_typer(plot_app, name="plot")


@app.command()
def run(
    recipe: str = typer.Argument(
        ...,
        help="A recipe name (mom recipes list) or a path to a .yaml recipe.",
        autocompletion=lambda incomplete: _recipe_names(incomplete),
    ),
    sets: list[str] = typer.Option(
        [],
        "--set",
        metavar="KEY=VALUE",
        help="Set a variable (source=gpt2) or a step's option (prune.keep-mha=75%); repeatable.",
    ),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="The result (default: the recipe's output, else NAME-out)."
    ),
    work_dir: Optional[Path] = typer.Option(
        None, "--work-dir", help="Where intermediate checkpoints go (default: .OUT.mom-work beside OUT)."
    ),
    keep_work: bool = typer.Option(
        False, "--keep-work", help="Keep the intermediate checkpoints (a rerun then skips finished steps)."
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Run every step again, even if its output is in the work directory."
    ),
    force: bool = Force,
    as_json: bool = Json,
) -> None:
    """Run a recipe: every step is validated first, then run like a pipe of mom commands.

    Example: mom run compressed-depth --set source=gpt2 --set data=docs/ -o gpt2-c6
    """
    from mom_cli.cli.recipes import RunOptions
    from mom_cli.cli.recipes import run as run_recipe

    result = run_recipe(
        recipe, RunOptions(sets, output, work_dir, keep_work, fresh, force), typer.main.get_command(app)
    )
    if as_json:
        print(_json(result.as_dict()))
    else:
        print(result.path)


@recipes_app.command("list")
def recipes_list(as_json: bool = Json) -> None:
    """The shipped recipes, one per line: name and what it does.

    Example: mom recipes list
    """
    from mom_cli.cli.recipes import description, shipped

    found = {name: {"path": str(p), "description": description(p)} for name, p in shipped().items()}
    if as_json:
        print(json.dumps(found))
        return
    width = max((len(n) for n in found), default=0)
    for name, r in found.items():
        print(f"{name:<{width}}  {r['description']}")


@recipes_app.command("show")
def recipes_show(
    name: str = typer.Argument(
        ..., help="A recipe name or path.", autocompletion=lambda incomplete: _recipe_names(incomplete)
    ),
) -> None:
    """Print a recipe.

    Example: mom recipes show prune-attention
    """
    from mom_cli.cli.recipes import find

    print(find(name).read_text(), end="")


@recipes_app.command("cp")
def recipes_cp(
    name: str = typer.Argument(
        ..., help="A recipe name or path.", autocompletion=lambda incomplete: _recipe_names(incomplete)
    ),
    dest: Path = typer.Argument(..., help="A file, or a folder to copy it into."),
    force: bool = Force,
) -> None:
    """Copy a recipe to edit it, then run the copy with mom run FILE.

    Example: mom recipes cp compressed-depth my-plan.yaml
    """
    from mom_cli.cli.recipes import copy

    print(copy(name, dest, force))


@plot_app.command("routing")
def plot_routing(
    checkpoint: str = typer.Argument(..., help="MoM checkpoint directory, or -."),
    data: str = typer.Option(..., "--data", help="Text to route: .txt/.jsonl/.parquet, a folder, or hf:NAME."),
    output: Path = typer.Option(..., "-o", "--output", help="Picture file (.png, .svg or .pdf)."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Tokens the shares are measured on."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward pass."),
    sample_tokens: int = typer.Option(24, "--sample-tokens", help="Tokens of DATA whose paths are drawn."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as stored), float32, float16 or bfloat16."),
    force: bool = Force,
) -> None:
    """Heatmaps of the module each routed step selects (share of tokens, SKIP included) and token paths.

    One row per block: MHA and FFN shares over DATA, then the top module of each sample token.

    Example: mom plot routing smol-mom --data README.md -o routing.png
    """
    from mom_cli.analysis.plots import check_target
    from mom_cli.analysis.plots import plot_routing as draw
    from mom_cli.analysis.routing_trace import check_trace_options, trace
    from mom_cli.io.loading import load_model, parse_dtype, pick_device

    _quiet_third_party()
    check_target(output, force)
    check_trace_options(max_tokens, seq_len, batch_size, sample_tokens)
    dev = pick_device(device)
    model, tok = load_model(checkpoint_arg(checkpoint), dev, parse_dtype(dtype))
    print(draw(trace(model, tok, data, max_tokens, seq_len, batch_size, sample_tokens, dev), output, force))


@plot_app.command("prune")
def plot_prune(
    report: str = typer.Argument(..., help="A `mom prune --json` report file, or - to read it from stdin."),
    output: Path = typer.Option(..., "-o", "--output", help="Picture file (.png, .svg or .pdf)."),
    force: bool = Force,
) -> None:
    """Module scores (removed ones in red) and calibration perplexity against modules removed.

    Example: mom prune gpt2-mom --data docs/ --json | mom plot prune - -o prune.png
    """
    from mom_cli.analysis.plots import plot_prune_report

    text = sys.stdin.read() if report == "-" else _read_text(report)
    try:
        data = json.loads(text)
    except ValueError:
        raise UsageError(f"{report} is not JSON; save the report with `mom prune ... --json > report.json`") from None
    print(plot_prune_report(data, output, force))


@plot_app.command("training")
def plot_training(
    checkpoint: str = typer.Argument(
        ..., help="A checkpoint made by train-routers (or its train_metrics.jsonl), or -."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Picture file (.png, .svg or .pdf)."),
    force: bool = Force,
) -> None:
    """Training and held-out loss against tokens, learning rate and tokens/s, from train_metrics.jsonl.

    Example: mom plot training smol-c15-trained -o training.png
    """
    from mom_cli.analysis.plots import check_target, read_metrics
    from mom_cli.analysis.plots import plot_training as draw

    check_target(output, force)
    print(draw(read_metrics(Path(checkpoint_arg(checkpoint))), output, force))


def _recipe_names(incomplete: str) -> list[str]:
    """Shell completion of recipe names (cheap: reads file names only)."""
    from mom_cli.cli.recipes import shipped

    return [n for n in shipped() if n.startswith(incomplete)]


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path} does not exist")
    return p.read_text()


def _quiet_third_party() -> None:
    """mom shows its own progress; transformers' "Loading weights" bar would turn a one-line error
    into several lines of stderr. Hub download bars are left as the user has them."""
    if DEBUG:
        return
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also switches the hub's bars off
    if not hub_bars_off:
        enable_progress_bars()


INTERRUPTED: int | None = None  # the signal that stopped the command, if any


def _on_signal(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP (kill, timeout, a closed terminal) unwind like Ctrl-C, so temporary outputs are
    removed; a second signal gets the default action."""
    global INTERRUPTED
    INTERRUPTED = signum
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    raise KeyboardInterrupt


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _interrupted() -> int:
    from mom_cli.io.atomic import COMMITTED

    if COMMITTED:  # the signal came after an output was put in place: say that it is complete
        print(
            f"mom: interrupted after {COMMITTED[-1]} was written complete; nothing else was left half-done",
            file=sys.stderr,
        )
    else:
        print("mom: interrupted; no output was written", file=sys.stderr)
    return 128 + (INTERRUPTED or signal.SIGINT)


def _fail(message: str, code: int) -> int:
    from mom_cli.errors import one_line

    if DEBUG:
        traceback.print_exc()
    print(f"mom: error: {one_line(message, 600)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: global --debug/--quiet anywhere on the line; one-line errors."""
    global DEBUG, INTERRUPTED
    args = list(sys.argv[1:] if argv is None else argv)
    DEBUG = "--debug" in args
    console.QUIET = "--quiet" in args or "-q" in args
    args = [a for a in args if a not in ("--debug", "--quiet", "-q")]
    if "transformers" in sys.modules:  # commands that load models call it again, after importing it
        _quiet_third_party()
    INTERRUPTED = None
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        for sig in _SIGNALS:
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):  # not if ignored (nohup)
                previous[sig] = signal.signal(sig, _on_signal)
    from mom_cli.io import atomic

    atomic.COMMITTED.clear()
    try:
        return _run(args)
    finally:
        atomic.release_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: list[str]) -> int:
    from typer import _click as click  # typer vendors its own click

    from mom_cli.cli.argv import invoke

    try:
        return invoke(typer.main.get_command(app), args)
    except KeyboardInterrupt:
        return _interrupted()
    except click.exceptions.NoArgsIsHelpError as e:
        print(e.format_message(), file=sys.stderr)
        return 2
    except MomError as e:
        return _fail(str(e), e.exit_code)
    except Exception as e:  # an unexpected failure is still one line without --debug
        hint = "" if DEBUG else " (run with --debug for the traceback)"
        return _fail(f"{type(e).__name__}: {e}{hint}", 1)


if __name__ == "__main__":
    sys.exit(main())
