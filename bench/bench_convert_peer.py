"""PEER conversion benchmark: SmolLM2-135M with FFN layers 10-19 as PEER layers built from their
own neurons, retrieval calibrated on Python-docs text, perplexity on held-out Python-docs text.

Run from the repository root with the project's venv active:

    python bench/bench_convert_peer.py              # CPU, float32 (about 20 minutes on 2 busy cores)
    python bench/bench_convert_peer.py --steps 0    # neuron init alone, no calibration
    python bench/bench_convert_peer.py --quick      # smoke run: fewer tokens and steps
    python bench/bench_convert_peer.py --device cuda

One run, SmolLM2-135M-Instruct (GGUF from bench/fetch.py, dequantised to float32 as in
bench_foundation.py), one calibration text and one held-out text. For each budget m = h*k
(50% and 25% of d_ff = 1536 neurons):

    dense       the model as it is
    oracle      each token keeps exactly its m neurons of largest contribution |a_i(x)| ||v_i||
                in each converted layer: the limit any router over these neurons can reach
    converted   PEER layers from `peer_from_dense` (neuron init, calib_x), retrieval trained by
                `mom_cli.surgery.peer_calibrate.calibrate`

    goals       at 50%: converted perplexity / dense <= 1.02
                at 25%: (converted - dense) / (oracle - dense) <= 1.25

    sizes       h = 8 heads and d_key = 128 as in the paper, k = m / h (96 and 48); N = 40^2 = 1600,
                the smallest square >= d_ff: neuron init fills one grid cell per neuron, and a
                spare cell scores like a filled one (its key is a centroid sum too), so a larger
                N only spends retrievals on empty experts (`--experts` to try)

Two references locate the limit of the design, each as perplexity and per layer:

    linear      each token keeps the m neurons of best linear score [x; 1] z_i, z_i the ridge
                regression of neuron i's contribution on [x; 1] over the calibration tokens, with
                no product-key grid: a PEER query is linear in x, so this is roughly the best a
                calibrated retrieval can do (the product keys constrain it further)
    reranked    the linear score proposes 2m candidates and the m of largest true contribution
                among them are kept: a two-stage retrieval that also computes the input side of m
                extra neurons per token, which no PEER layer does (at 50%, 2m is every neuron:
                then it is only the oracle computed densely)

Per layer it prints the fraction of the oracle's contribution mass each finds and the relative
output error ||f(x) - y||^2 / ||y||^2 (mean over tokens), before and after calibration, on 2048
held-out tokens.
The layers' inputs are the dense model's (collected once per run, cached under /tmp), the
converted layers then run together in one model for the perplexity. Every figure is measured in
this run; nothing is hard-coded and nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Figure, bench_parser, load_note, log, prepare_hf, print_table, token_blocks  # noqa: E402
from bench.fetch import pydocs_text  # noqa: E402

LAYERS = range(10, 20)
SHARES = (50, 25)  # h*k as percent of d_ff
HEADS = 8
KEY_DIM = 128
RERANK = 2  # the two-stage reference: a linear score proposes RERANK * m candidates
CACHE_DIR = Path("/tmp/mom-bench-convert-peer")


@dataclass
class Sizes:
    calib_tokens: int
    eval_tokens: int
    seq_len: int
    steps: int
    batch_tokens: int


def pick_sizes(args: argparse.Namespace) -> Sizes:
    s = Sizes(2048, 1024, 256, 20, 512) if args.quick else Sizes(16384, 8192, 512, 30, 1024)
    for name in ("calib_tokens", "eval_tokens", "steps"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    return s


def parse_args() -> argparse.Namespace:
    p = bench_parser(__doc__, "fewer tokens and steps")
    p.add_argument("--calib-tokens", type=int, default=None, help="default 16384 (quick: 2048)")
    p.add_argument("--eval-tokens", type=int, default=None, help="default 8192 (quick: 1024)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="calibration steps per layer (default 30, quick: 20; 0: neuron init alone)",
    )
    p.add_argument("--experts", type=int, default=1600, help="N, a square >= d_ff (default 40^2 = 1600)")
    p.add_argument("--layers", default="10-19", help="FFN layers to convert, a range a-b (default 10-19)")
    return p.parse_args()


# ----------------------------------------------------------------------------- data and activations


def load_model(device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = prepare_hf()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(src)


@torch.no_grad()
def collect(
    model, ids: torch.Tensor, layers: list[int], batch: int = 4
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's MLP input (after its pre-norm) and output on the dense model, (tokens, d) each."""
    store: dict[int, tuple[list, list]] = {i: ([], []) for i in layers}
    hooks = []
    for i in layers:

        def hook(mod, inp, out, i=i):
            store[i][0].append(inp[0].reshape(-1, inp[0].shape[-1]).cpu())
            store[i][1].append(out.reshape(-1, out.shape[-1]).cpu())

        hooks.append(model.model.layers[i].mlp.register_forward_hook(hook))
    try:
        for s in range(0, ids.shape[0], batch):
            model(input_ids=ids[s : s + batch].to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: (torch.cat(xs), torch.cat(ys)) for i, (xs, ys) in store.items()}


def cached_activations(
    model, ids: torch.Tensor, layers: list[int], tag: str
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`collect`, remembered in /tmp keyed by the token ids (a rerun skips the forward passes)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = f"{tag}-{ids.numel()}-{int(ids.sum())}-{'_'.join(map(str, layers))}.pt"
    path = CACHE_DIR / key
    if path.is_file():
        return torch.load(path)
    acts = collect(model, ids, layers)
    torch.save(acts, path)
    return acts


# ----------------------------------------------------------------------------- modules swapped into the model


class PeerMLP(nn.Module):
    """A Llama MLP replaced by a PEER layer (same input, same output)."""

    def __init__(self, peer: nn.Module) -> None:
        super().__init__()
        self.peer = peer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peer(x)


class OracleMLP(nn.Module):
    """A Llama MLP whose tokens each keep only their m largest-contribution neurons."""

    def __init__(self, peer: nn.Module, m: int) -> None:
        super().__init__()
        self.peer, self.m = peer, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mom_cli.surgery.peer_calibrate import oracle_ffn

        return oracle_ffn(self.peer, x, self.m)


class LinearPickMLP(nn.Module):
    """A Llama MLP whose tokens each keep m neurons chosen by a linear score [x; 1] z (the ridge
    predictor of `ridge_scores`). With rerank r > 1 the score only proposes r*m candidates and the
    m of largest true contribution among them are kept: a two-stage retrieval that computes the
    candidates' activations (their input side) before choosing."""

    def __init__(self, peer: nn.Module, z: torch.Tensor, m: int, rerank: int = 1) -> None:
        super().__init__()
        self.peer, self.z, self.m, self.rerank = peer, z, m, rerank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        pick = linear_pick(self.peer, self.z, x, self.m, self.rerank)
        return picked_ffn(self.peer, x, pick).view(shape)


def dense_rows(mlp: nn.Module) -> dict[str, torch.Tensor]:
    """Llama MLP -> per-neuron rows, as peer_from_dense takes them."""
    return dict(
        w_in=mlp.up_proj.weight.detach(),
        b_in=None,
        w_gate=mlp.gate_proj.weight.detach(),
        w_out=mlp.down_proj.weight.detach().t(),
        out_bias=None,
    )


def perplexity(model, batches: torch.Tensor, batch: int = 4) -> float:
    """As `mom eval` measures it."""
    from mom_cli.analysis.evaluate import perplexity as mean_loss

    return math.exp(mean_loss(model, batches, batch, model.device)[0])


@contextmanager
def swapped(model, modules: dict[int, nn.Module]):
    """The model with the MLPs of the given layers replaced, restored on exit."""
    layers = model.model.layers
    saved = {i: layers[i].mlp for i in modules}
    try:
        for i, mod in modules.items():
            layers[i].mlp = mod
        yield model
    finally:
        for i, mod in saved.items():
            layers[i].mlp = mod


# ----------------------------------------------------------------------------- conversion and calibration


@dataclass
class LayerReport:
    layer: int
    mass_init: float
    err_init: float
    mass_after: float
    err_after: float
    err_oracle: float
    mass_linear: float  # the unconstrained linear score's (`ridge_scores`)
    err_linear: float
    mass_rerank: float  # ridge proposes RERANK * m candidates, the m largest true contributions kept
    calib_loss: tuple[float, float]
    seconds: float


@torch.no_grad()
def ridge_scores(layer, x: torch.Tensor) -> torch.Tensor:
    """z, (d + 1, N): each neuron's contribution |a_i(x)| ||v_i|| predicted from [x; 1] by ridge
    regression over the calibration tokens x, the best unconstrained linear score in the least-squares
    sense. A PEER query is linear in x and its product keys constrain it further."""
    norms = layer.w_out.norm(dim=1)
    xt = torch.cat([x, torch.ones(x.shape[0], 1, device=x.device)], 1)
    m2 = xt.t() @ xt / x.shape[0]
    m2 += 1e-4 * m2.diagonal().mean() * torch.eye(m2.shape[0], device=x.device)
    rhs = (
        sum(
            xt[s : s + 4096].t() @ (layer.activations(x[s : s + 4096]).abs() * norms)
            for s in range(0, x.shape[0], 4096)
        )
        / x.shape[0]
    )
    return torch.linalg.solve(m2, rhs)


@torch.no_grad()
def linear_pick(layer, z: torch.Tensor, x: torch.Tensor, m: int, rerank: int = 1) -> torch.Tensor:
    """(tokens, m) neurons per token: the m best by [x; 1] z, or with rerank r the m of largest true
    contribution among the r*m best by [x; 1] z."""
    score = torch.cat([x, torch.ones(x.shape[0], 1, device=x.device)], 1) @ z
    cand = score.topk(min(rerank * m, score.shape[1]), dim=1).indices
    if rerank == 1:
        return cand
    contrib = layer.activations(x).gather(1, cand).abs() * layer.w_out.norm(dim=1)[cand]
    return cand.gather(1, contrib.topk(m, dim=1).indices)


def _kept_output(layer, a: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The output of the experts with activations a when each token keeps only the picked ones."""
    out = torch.zeros_like(a).scatter_(1, pick, a.gather(1, pick)) @ layer.w_out
    return out if layer.b_out is None else out + layer.b_out


@torch.no_grad()
def picked_ffn(layer, x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The layer's experts with each token keeping only the picked ones, at weight 1 (dense, for
    measurement only)."""
    return _kept_output(layer, layer.activations(x), pick)


@torch.no_grad()
def pick_figures(layer, x: torch.Tensor, y: torch.Tensor, pick: torch.Tensor, m: int) -> tuple[float, float]:
    """(fraction of the oracle's contribution mass the picked neurons hold, relative output error)."""
    from mom_cli.surgery.peer_calibrate import token_errors

    a = layer.activations(x)
    contrib = a.abs() * layer.w_out.norm(dim=1)
    mass = contrib.gather(1, pick).sum().item() / contrib.topk(m, dim=1).values.sum().item()
    return mass, token_errors(_kept_output(layer, a, pick), y).mean().item()


def convert_layers(model, acts_cal, acts_held, m: int, sizes: Sizes, n_experts: int, device: str):
    """PEER layers for every converted layer at budget m = h*k, calibrated; with per-layer figures."""
    from mom_cli.surgery.peer_calibrate import calibrate, oracle_ffn, relative_error, token_errors
    from mom_cli.surgery.peer_init import oracle_mass_fraction, peer_from_dense

    peers, scores, reports = {}, {}, []
    for i, (x, y) in acts_cal.items():
        t0 = time.perf_counter()
        xh, yh = (t.to(device) for t in acts_held[i])
        layer = (
            peer_from_dense(
                **dense_rows(model.model.layers[i].mlp),
                n_experts=n_experts,
                heads=HEADS,
                topk=m // HEADS,
                key_dim=KEY_DIM,
                calib_x=x.to(device),
            )
            .to(device)
            .eval()
        )
        mass0, err0 = oracle_mass_fraction(layer, xh), relative_error(layer, xh, yh)
        err_oracle = token_errors(oracle_ffn(layer, xh, m), yh).mean().item()
        z = ridge_scores(layer, x.to(device))
        lin_mass, lin_err = pick_figures(layer, xh, yh, linear_pick(layer, z, xh, m), m)
        rr_mass, _ = pick_figures(layer, xh, yh, linear_pick(layer, z, xh, m, RERANK), m)
        res = calibrate(layer, x.to(device), y.to(device), steps=sizes.steps, batch_tokens=sizes.batch_tokens, seed=i)
        rep = LayerReport(
            i,
            mass0,
            err0,
            oracle_mass_fraction(layer.eval(), xh),
            relative_error(layer, xh, yh),
            err_oracle,
            lin_mass,
            lin_err,
            rr_mass,
            (res.loss_before, res.loss_after),
            time.perf_counter() - t0,
        )
        log(
            f"  layer {i}: mass found {rep.mass_init:.3f} -> {rep.mass_after:.3f}, relative output error "
            f"{rep.err_init:.4f} -> {rep.err_after:.4f} (oracle {rep.err_oracle:.4f}; best linear score: mass "
            f"{rep.mass_linear:.3f}, error {rep.err_linear:.4f}; {RERANK}x candidates reranked: mass "
            f"{rep.mass_rerank:.3f}; calibration set "
            f"{res.loss_before:.4f} -> {res.loss_after:.4f}), {res.steps} steps x {sizes.batch_tokens} tokens, "
            f"{rep.seconds:.0f} s"
        )
        peers[i], scores[i] = layer, z
        reports.append(rep)
    return peers, scores, reports


def main() -> None:
    args = parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = pick_sizes(args)
    lo, hi = (int(v) for v in args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    start = time.perf_counter()
    log(
        f"bench_convert_peer: device {args.device} ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} CPU threads; layers {lo}-{hi}, N = {args.experts}, "
        f"h = {HEADS}, d_key = {KEY_DIM}, gate none; calibration {sizes.calib_tokens} tokens, "
        f"{sizes.steps} steps x {sizes.batch_tokens} tokens per layer; held-out {sizes.eval_tokens} tokens, "
        f"seq_len {sizes.seq_len}"
    )
    log(f"start: {load_note()}")
    model, tok = load_model(args.device)
    calib_file, heldout_file = pydocs_text()
    cal_ids = token_blocks(calib_file, tok, sizes.calib_tokens, sizes.seq_len)
    held_ids = token_blocks(heldout_file, tok, sizes.eval_tokens, sizes.seq_len)
    t0 = time.perf_counter()
    acts_cal = cached_activations(model, cal_ids, layers, "calib")
    acts_held = {
        i: (x[:2048], y[:2048]) for i, (x, y) in cached_activations(model, held_ids, layers, "heldout").items()
    }
    log(
        f"activations: {cal_ids.numel()} calibration and {held_ids.numel()} held-out tokens per layer "
        f"({time.perf_counter() - t0:.0f} s; cached in {CACHE_DIR})"
    )
    d_ff = model.config.intermediate_size

    dense = perplexity(model, held_ids)
    log(f"dense: held-out perplexity {dense:.3f}")
    figures, results = [], {"dense": dense}
    for share in SHARES:
        m = d_ff * share // 100
        log(f"h*k = {share}% of d_ff = {m} (h = {HEADS}, k = {m // HEADS}):")
        t0 = time.perf_counter()
        peers, scores, reports = convert_layers(model, acts_cal, acts_held, m, sizes, args.experts, args.device)
        calib_s = time.perf_counter() - t0
        with swapped(model, {i: OracleMLP(p, m) for i, p in peers.items()}):
            oracle = perplexity(model, held_ids)
        with swapped(model, {i: LinearPickMLP(p, scores[i], m) for i, p in peers.items()}):
            linear = perplexity(model, held_ids)
        with swapped(model, {i: LinearPickMLP(p, scores[i], m, RERANK) for i, p in peers.items()}):
            rerank = perplexity(model, held_ids)
        with swapped(model, {i: PeerMLP(p) for i, p in peers.items()}):
            converted = perplexity(model, held_ids)
        log(
            f"  perplexity: dense {dense:.3f}, oracle {oracle:.3f}, best linear score {linear:.3f}, "
            f"{RERANK}x candidates reranked {rerank:.3f}, converted {converted:.3f}; conversion and "
            f"calibration of {len(peers)} layers {calib_s:.0f} s"
        )
        results[f"{share}%"] = {
            "m": m,
            "oracle": oracle,
            "linear": linear,
            "rerank": rerank,
            "converted": converted,
            "layers": [r.__dict__ for r in reports],
        }
        ratio_dense = converted / dense
        excess = (converted - dense) / (oracle - dense) if oracle > dense else float("inf")
        figures.append(
            Figure(
                f"{share}%: converted ppl / dense",
                ratio_dense,
                "<= 1.02" if share == 50 else "-",
                ratio_dense <= 1.02 if share == 50 else None,
            )
        )
        figures.append(Figure(f"{share}%: oracle ppl / dense", oracle / dense, "-", None))
        figures.append(Figure(f"{share}%: best linear score ppl / dense", linear / dense, "-", None))
        figures.append(Figure(f"{share}%: {RERANK}x reranked ppl / dense", rerank / dense, "-", None))
        figures.append(
            Figure(
                f"{share}%: converted increase / oracle increase",
                excess,
                "<= 1.25" if share == 25 else "-",
                excess <= 1.25 if share == 25 else None,
            )
        )
        mean = lambda f: sum(f(r) for r in reports) / len(reports)  # noqa: E731
        figures.append(Figure(f"{share}%: mean mass found after calibration", mean(lambda r: r.mass_after), "-", None))
        figures.append(
            Figure(f"{share}%: mean mass found, best linear score", mean(lambda r: r.mass_linear), "-", None)
        )
        figures.append(
            Figure(f"{share}%: mean mass found, {RERANK}x reranked", mean(lambda r: r.mass_rerank), "-", None)
        )
        log(
            f"  mean over layers: mass found {mean(lambda r: r.mass_init):.3f} -> {mean(lambda r: r.mass_after):.3f}, "
            f"relative output error {mean(lambda r: r.err_init):.4f} -> {mean(lambda r: r.err_after):.4f} "
            f"(oracle {mean(lambda r: r.err_oracle):.4f}; best linear score: mass {mean(lambda r: r.mass_linear):.3f}, "
            f"error {mean(lambda r: r.err_linear):.4f})"
        )

    print_table(figures)
    log("\n" + json.dumps(results))
    log(f"\nend: {load_note()}; wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
