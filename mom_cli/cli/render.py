"""Reports as people read them: the tables `mom info`, `mom prune`, `mom convert-peer` and `mom eval --tasks` print
on stderr (or stdout for info) when --json is not given. Each takes the command's JSON report."""

from __future__ import annotations

import json

from mom_cli import console


def print_info(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    out.print(f"[bold]{s['family']}[/bold] family ({s['source_model_type']}), d={s['hidden_size']}")
    out.print(f"plain layers: {len(s['bottom_layers'])} bottom, {len(s['top_layers'])} top")
    table = Table("block", "MHA", "FFN", "SKIP", "steps H", "top-K", "router")
    for b in s["blocks"]:
        table.add_row(
            str(b["block"]),
            str(b["mha_modules"]),
            str(b["ffn_modules"]),
            "yes" if b["skip"] else "no",
            str(b["steps"]),
            str(b["top_k"]),
            b["router"],
        )
    out.print(table)
    out.print(f"parameters: {s['params_total']:,} total, at most {s['params_active_per_token']:,} active per token")
    out.print(
        f"FLOPs per token: {s['flops_per_token']:,} (at {s['flops_seq_len']} tokens of context; routers: {s['router_flops_per_token']:,})"
    )
    v = s.get("verification")
    if v:
        out.print(
            f"verified against the source ({v['method']}): max |Δ| {v['max_abs_diff']:.2g}, at {v['worst']}"
            if v.get("max_abs_diff") is not None
            else f"verification: {v['method']} ({v.get('note', '')})"
        )
    if s.get("peer_modules"):
        peer = Table(
            "PEER module", "origin", "N", "h×k", "d_key", "gate", "active params", "total params", "FLOPs/call"
        )
        for p in s["peer_modules"]:
            peer.add_row(
                p["module"],
                str(p["origin"]),
                f"{p['n_experts']:,}",
                f"{p['heads']}×{p['topk']}",
                str(p["key_dim"]),
                p["gate"],
                short(p["params_active_per_token"]),
                short(p["params_total"]),
                short(p["flops_per_call"]),
            )
        out.print(peer)
    for i, r in enumerate(s["provenance"], 1):
        out.print(f"{i}. {r['time']}  mom {r['mom_version']}  {r['command']} {r['source']}  {json.dumps(r['args'])}")


def print_prune(r: dict) -> None:
    from rich.table import Table

    table = Table("module", "origin layer", f"score ({r['metric']})", "removed")
    for m in r["modules"]:
        table.add_row(m["module"], str(m["origin"]), f"{m['score']:.6g}", "[red]yes[/red]" if m["removed"] else "")
    out = console.stderr
    if not console.QUIET:
        out.print(table)
    for label, key in (
        ("calibration perplexity", "calibration_perplexity"),
        ("held-out perplexity", "heldout_perplexity"),
    ):
        if r[key] is not None:
            console.log(f"{label}: {r[key]['before']:.4f} -> {r[key]['after']:.4f}")
    for label, key in (
        ("parameters", "params_total"),
        ("active parameters per token", "params_active_per_token"),
        ("FLOPs per token", "flops_per_token"),
    ):
        console.log(f"{label}: {r[key]['before']:,} -> {r[key]['after']:,}")
    if r["note"]:
        console.log(r["note"])


def print_convert_peer(r: dict) -> None:
    from rich.table import Table

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    # N, h and k are the same for every layer (the log line names them); on held-out tokens:
    # mass = share of the oracle's top-h*k contribution found, error = relative to the dense layer
    table = Table("layer", "mass", "error", "calib. error", "usage", "KL", "active", "total")
    for x in r["layers"]:
        calib = (
            "-" if x["calib_error_before"] is None else f"{x['calib_error_before']:.3g}→{x['calib_error_after']:.3g}"
        )
        table.add_row(
            str(x["origin"]),
            num(x["oracle_mass_found"]),
            num(x["output_error"]),
            calib,
            num(x["expert_usage"]),
            num(x["usage_kl_uniform"]),
            short(x["params_active_per_token"]),
            short(x["params_total"]),
        )
    if not console.QUIET:
        console.stderr.print(table)
    if r["heldout_perplexity"] is not None:
        p = r["heldout_perplexity"]
        console.log(f"held-out perplexity ({r['heldout_tokens']} tokens): {p['before']:.4f} -> {p['after']:.4f}")
    for label, key in (
        ("parameters", "params_total"),
        ("active parameters per token", "params_active_per_token"),
        ("FLOPs per token", "flops_per_token"),
    ):
        console.log(f"{label}: {r[key]['before']:,} -> {r[key]['after']:,}")


def print_heal(r: dict) -> None:
    for x in r["regions"]:
        err = "-" if x["error_after"] is None else f"{x['error_before']:.4g} -> {x['error_after']:.4g}"
        console.log(f"{x['name']} ({x['cause']}): {x.get('metric', 'error')} {err}, {x['tokens']:,} tokens")
    console.log(
        f"local {r['local_tokens']:,} tokens in {r['local_seconds']:.0f}s; end-to-end {r['global_tokens']:,} tokens "
        f"in {r['global_seconds']:.0f}s"
    )
    if r["eval_ppl_before"] is not None:
        console.log(
            f"held-out perplexity ({r['heldout_tokens']} tokens): {r['eval_ppl_before']:.4f} -> "
            f"{r['eval_ppl_after']:.4f} (teacher {r['eval_ppl_teacher']:.4f})"
        )
    if len(r.get("curve") or []) > 2:
        console.log("held-out curve: " + ", ".join(f"{t:,} tokens {ppl:.4g}" for t, ppl in r["curve"]))


def print_tasks(rows: list[dict], models: list[str]) -> None:
    """lm-eval scores, one column per model; after the first, each with its difference from the first."""
    from rich.table import Table

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    table = Table("task", "metric", *models)
    for r in rows:
        cells = [num(r["values"][0])] + [
            num(v) if d is None else f"{num(v)} ({d:+.3g})" for v, d in zip(r["values"][1:], r["deltas"][1:])
        ]
        table.add_row(r["task"], r["metric"], *cells)
    console.stderr.print(table)


def short(n: int) -> str:
    """1925696 -> '1.93M': keeps wide tables readable in 80 columns."""
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
