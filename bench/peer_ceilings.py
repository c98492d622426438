"""Where does a converted PEER layer lose the oracle's contribution mass? Ceilings of retrieval
designs over the frozen neurons of SmolLM2-135M's FFN layers, measured on held-out tokens.

Run from the repository root with the project's venv active (after bench_convert_peer.py has
cached the layers' activations, or it collects them; about 3 minutes per layer on one core):

    python bench/peer_ceilings.py --layers 10,15

For each layer and budget m = h*k (50% and 25% of d_ff), the fraction of the oracle's top-m
contribution mass that each choice of m neurons per token holds:

    peer          the converted layer at neuron init (bench_convert_peer's sizes), uncalibrated
    head quota    each head keeps the k largest true contributions among the experts it owns:
                  the cost of dealing the neurons to h heads with k each (not of retrieval)
    ridge         the m best of a linear score [x; 1] z_i per neuron (ridge regression)
    trained 1     a linear score per neuron, no product-key grid, trained from ridge with the
                  calibration loss of mom_cli.surgery.peer_calibrate (contribution-weighted BCE against
                  the oracle's choice), one global boundary per token
    trained max2  the same with two linear scores per neuron, the larger counting: what
                  overlapping heads that each score every neuron could add
    rerank 2x     ridge proposes 2m candidates, the m largest true contributions kept

Nothing is asserted; every figure is measured in this run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_convert_peer import (  # noqa: E402
    HEADS,
    KEY_DIM,
    SHARES,
    cached_activations,
    dense_rows,
    linear_pick,
    load_model,
    pick_figures,
    ridge_scores,
)
from bench.common import bench_parser, log, token_blocks  # noqa: E402
from bench.fetch import pydocs_text  # noqa: E402

CALIB_TOKENS, HELD_TOKENS, SEQ_LEN = 16384, 8192, 512  # bench_convert_peer's, so its cache serves


def head_quota_pick(layer, x: torch.Tensor, calib_x: torch.Tensor, k: int) -> torch.Tensor:
    """(tokens, h*k): each head's k largest true contributions among the experts it owns."""
    from mom_cli.surgery.peer_calibrate import expert_owners
    from mom_cli.surgery.peer_init import contributions

    contrib = contributions(layer, x)
    owner = expert_owners(layer, calib_x[:1024])
    picks = []
    for j in range(layer.heads):
        own = (owner == j).nonzero().squeeze(1)
        picks.append(own[contrib[:, own].topk(min(k, own.numel()), dim=1).indices])
    return torch.cat(picks, 1)


def trained_scores(
    layer,
    x: torch.Tensor,
    z: torch.Tensor,
    m: int,
    scores_per_neuron: int,
    steps: int = 300,
    batch: int = 1024,
    seed: int = 0,
) -> torch.Tensor:
    """Linear scores [x; 1] W per neuron (scores_per_neuron of them, the largest counting), started
    from ridge's z and trained with the calibration loss against each token's oracle top-m."""
    from mom_cli.surgery.peer_calibrate import oracle_bce
    from mom_cli.surgery.peer_init import contributions

    gen = torch.Generator().manual_seed(seed)
    n = z.shape[1]
    w = z.repeat(1, scores_per_neuron)
    w = (w * (1 + 0.01 * torch.randn(w.shape, generator=gen))).requires_grad_(True)
    xt = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
    with torch.no_grad():
        contrib_all = contributions(layer, x)
        log_beta = (4.0 / (xt[:batch] @ z).std()).log().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, log_beta], lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        s = (xt[idx] @ w).view(batch, scores_per_neuron, n).amax(1)
        theta = s.topk(m, dim=1).values[:, -1:]
        loss = oracle_bce((s - theta) * log_beta.exp(), contrib_all[idx], m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


def max_score_pick(w: torch.Tensor, x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    s = (torch.cat([x, torch.ones(x.shape[0], 1)], 1) @ w).view(x.shape[0], -1, n).amax(1)
    return s.topk(m, dim=1).indices


def main() -> None:
    p = bench_parser(__doc__, "layer 10 only")
    p.add_argument("--layers", default="10,15", help="comma-separated FFN layers (default 10,15)")
    args = p.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    layers = [10] if args.quick else [int(v) for v in args.layers.split(",")]
    from mom_cli.surgery.peer_init import peer_from_dense

    model, tok = load_model("cpu")
    calib_file, heldout_file = pydocs_text()
    cal = cached_activations(model, token_blocks(calib_file, tok, CALIB_TOKENS, SEQ_LEN), layers, "calib")
    held = cached_activations(model, token_blocks(heldout_file, tok, HELD_TOKENS, SEQ_LEN), layers, "heldout")
    log("layer  h*k  |  mass found:  peer  head quota  ridge  trained 1  trained max2  rerank 2x")
    for i in layers:
        x, (xh, yh) = cal[i][0], (t[:2048] for t in held[i])
        for share in SHARES:
            t0 = time.perf_counter()
            m = model.config.intermediate_size * share // 100
            layer = peer_from_dense(
                **dense_rows(model.model.layers[i].mlp),
                n_experts=1600,
                heads=HEADS,
                topk=m // HEADS,
                key_dim=KEY_DIM,
                calib_x=x,
            ).eval()
            with torch.no_grad():
                peer_pick = layer.retrieve(xh)[1].flatten(1)
            z = ridge_scores(layer, x)
            picks = [peer_pick, head_quota_pick(layer, xh, x, m // HEADS), linear_pick(layer, z, xh, m)]
            picks += [max_score_pick(trained_scores(layer, x, z, m, r), xh, z.shape[1], m) for r in (1, 2)]
            picks.append(linear_pick(layer, z, xh, m, rerank=2))
            masses = [pick_figures(layer, xh, yh, pk, m)[0] for pk in picks]
            log(
                f"{i:5d}  {share:2d}%  |  "
                + "  ".join(f"{v:.3f}" for v in masses)
                + f"   ({time.perf_counter() - t0:.0f} s)"
            )


if __name__ == "__main__":
    main()
