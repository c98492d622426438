"""Plots render headless, and what they draw is what was measured: the routing heatmap's arrays are
the recorded shares, the paths are each token's top choice, the training curve is the metrics file,
the prune bars are the report's scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import decomposed

import mom_cli
from mom_cli.analysis import plots
from mom_cli.analysis.routing_trace import trace
from mom_cli.errors import UsageError

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402


def _size_ok(path, fig_inches) -> None:
    """The file is a real image of about the figure's size (tight bounding box trims the margins)."""
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    want_w, want_h = fig_inches[0] * 120, fig_inches[1] * 120  # _save's dpi
    assert 0.6 * want_w <= w <= 1.2 * want_w and 0.6 * want_h <= h <= 1.2 * want_h, (img.shape, fig_inches)
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_routing_heatmaps_and_paths_are_the_recorded_routing(gpt2_dir, tmp_path, text_file):
    ckpt = decomposed(gpt2_dir, tmp_path / "mom", depth=3, top_k=2)
    model = mom_cli.load(ckpt).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking routers: routing depends on the token
        for name, p in model.named_parameters():
            if "_router.head" in name:
                p.normal_(0, 0.5)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    pic = trace(model, tok, str(text_file), max_tokens=512, seq_len=64, batch_size=3, sample_tokens=20, device="cpu")
    assert pic.tokens == 512 and len(pic.sample) == 20

    # The same batches, counted by a plain recorder: the shares drawn must equal them.
    from mom_cli.io.text import blocks, token_stream

    stream = token_stream(str(text_file), tok, 512)
    model.model.recorder = rec = mom_cli.RoutingRecorder()
    with torch.no_grad():
        for i in range(0, 8, 3):
            model(blocks(stream, 64)[i : i + 3], use_cache=False)
        model.model.recorder = None
    fig = plots.routing_figure(pic)
    try:
        heat = {(0, "mha"): fig.axes[0], (0, "ffn"): fig.axes[1]}
        for (b, kind), ax in heat.items():
            expect = np.stack([rec.stats[(b, kind, h)][0].numpy() for h in range(3)], axis=1)
            expect = expect / expect.sum(0, keepdims=True)
            drawn = np.asarray(ax.images[0].get_array())
            assert drawn.shape == (4 + 1, 3)  # 4 modules + SKIP, 3 steps
            np.testing.assert_allclose(drawn, expect, atol=1e-12)
            assert ax.get_yticklabels()[-1].get_text() == "SKIP"
            assert (drawn > 0).sum() > 3 * 2  # the routing depends on the token: more than top-2 per step
        path_axes = [ax for ax in fig.axes if ax.get_title().endswith("(S = SKIP)")]
        assert len(path_axes) == 2
        for ax, kind in zip(path_axes, ("mha", "ffn")):
            drawn = np.asarray(ax.images[0].get_array())
            assert drawn.shape == (3, 20)
            np.testing.assert_array_equal(drawn, pic.paths[(0, kind)])
            assert [t.get_text() for t in ax.get_xticklabels()] == [repr(s)[1:-1] for s in pic.sample]
        # Each token's path is its top-weighted choice: it is among the modules counted at that step.
        for kind in ("mha", "ffn"):
            for h in range(3):
                counted = set(np.flatnonzero(rec.stats[(0, kind, h)][0].numpy()))
                assert set(pic.paths[(0, kind)][h]) <= counted
        inches = fig.get_size_inches()
    finally:
        matplotlib.pyplot.close(fig)
    path = plots.plot_routing(pic, tmp_path / "routing.png")
    _size_ok(path, inches)
    with pytest.raises(UsageError, match="already exists"):
        plots.plot_routing(pic, tmp_path / "routing.png")  # no --force


def test_training_curve_draws_the_metrics_file(tmp_path):
    rows = [
        {
            "step": s,
            "tokens": 512 * s,
            "loss": 6 - 0.1 * s,
            "lm_loss": 5.9 - 0.1 * s,
            "aux_loss": 0.01,
            "kl": None,
            "lr": 1e-3 * min(1, s / 3),
            "tokens_per_s": 1000 + s,
        }
        for s in range(1, 11)
    ]
    rows += [
        {"step": 5, "tokens": 2560, "eval_loss": 5.5, "eval_ppl": float(np.exp(5.5))},
        {"step": 10, "tokens": 5120, "eval_loss": 5.1, "eval_ppl": float(np.exp(5.1))},
    ]
    (tmp_path / "train_metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    read = plots.read_metrics(tmp_path)
    assert read == rows
    fig = plots.training_figure(read)
    try:
        lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
        assert list(lines["loss"].get_xdata()) == [r["tokens"] for r in rows[:10]]
        assert list(lines["loss"].get_ydata()) == [r["loss"] for r in rows[:10]]
        assert list(lines["next-token loss"].get_ydata()) == [r["lm_loss"] for r in rows[:10]]
        assert list(lines["held-out loss"].get_xdata()) == [2560, 5120]
        assert list(lines["held-out loss"].get_ydata()) == [5.5, 5.1]
        assert list(fig.axes[1].get_lines()[0].get_ydata()) == [r["lr"] for r in rows[:10]]
        inches = fig.get_size_inches()
    finally:
        matplotlib.pyplot.close(fig)
    _size_ok(plots.plot_training(read, tmp_path / "training.png"), inches)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train_metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UsageError, match=r"train_metrics\.jsonl:2: not a JSON line"):
        plots.read_metrics(tmp_path / "bad")


def test_prune_plot_draws_the_report(tmp_path):
    modules = [
        {"module": f"{k}.0.{i}", "kind": k, "block": 0, "slot": i, "origin": i, "score": s, "removed": s < 0.2}
        for k in ("mha", "ffn")
        for i, s in enumerate([0.5, 0.1, 0.3, 0.05])
    ]
    report = {"metric": "loss", "modules": modules, "trace_loss": [3.0, 3.01, 3.05]}
    path = plots.plot_prune_report(report, tmp_path / "prune.png")
    assert mpimg.imread(path).shape[0] > 100
    with pytest.raises(UsageError, match="not a prune report"):
        plots.plot_prune_report({"path": "x"}, tmp_path / "p2.png")
