"""The comparison tables of ``gpu_report``'s markdown, from its timing rows: each one-setting
variant of the static table against it, livr's distance to causal SDPA split into mask cost and
Triton's cost, and the packed vs padded model step.
"""
from __future__ import annotations

from report_runners import TABLE_VARIANTS

# The (fwd, bwd, fwd+bwd) time columns of a timing row, compared between methods.
TIME_COLUMNS = ("fwd_ms", "bwd_ms", "fwd_bwd_ms")


def ratio_cell(numerator, denominator) -> str:
    """``numerator / denominator`` as "1.23x", or "-" where either time is missing."""
    return "-" if not numerator or not denominator else f"{numerator / denominator:.2f}x"


def packing_markdown(rows: list) -> list:
    lines = ["", "Model step, packed vs padded (benchmarks/test_model_step.py -k packing):", "",
             "| layout | batch shape | real tokens | median step s | real tokens/s |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| failed: {r['error']} | - | - | - | - |")
        else:
            lines.append(f"| {r['layout']} | {r['shape']} | {r['real_tokens']} | {r.get('median_step_s', 0):.4f} | "
                         f"{r.get('real_tokens_per_s', '-')} |")
    return lines


def variants_markdown(rows: list) -> list:
    """Lines comparing each one-setting variant of the static table (``TABLE_VARIANTS``) with it."""
    timed = {(r["layout"], r["n"], r["method"]): r for r in rows}
    lines = []
    for (layout, n, method), variant in timed.items():
        table = timed.get((layout, n, "livr_table"))
        if method not in TABLE_VARIANTS or table is None:
            continue
        ratios = [ratio_cell(variant.get(col), table.get(col)) for col in TIME_COLUMNS]
        setting = ", ".join(f"{k}={v}" for k, v in TABLE_VARIANTS[method].items())
        lines.append(f"| {method} ({setting}) | {layout} | {n} | " + " | ".join(ratios) + " |")
    if not lines:
        return []
    return ["", "Static-table variants, measured: the variant's time over the static table's (above 1.00x "
            "the static table is faster; benchmarks/dispatch_model.py models the launch order):", "",
            "| variant | layout | N | fwd | bwd | fwd+bwd |", "|---|---|---|---|---|---|"] + lines


def gap_markdown(rows: list) -> list:
    """Lines splitting ``livr_table``'s time over SDPA ``is_causal`` into mask cost and Triton cost."""
    timed = {(r["layout"], r["n"], r["method"]): r for r in rows}
    lines = []
    for (layout, n, method), yardstick in timed.items():
        table, causal = timed.get((layout, n, "livr_table")), timed.get((layout, n, "sdpa_causal"))
        if method != "triton_causal" or table is None or causal is None:
            continue
        cells = [ratio_cell(table.get(c), yardstick.get(c)) for c in TIME_COLUMNS]
        cells += [ratio_cell(yardstick.get(c), causal.get(c)) for c in TIME_COLUMNS]
        lines.append(f"| {layout} | {n} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["", "Where the time over causal SDPA goes: livr_table over the plain causal Triton kernel with the "
            "same tiles (the mask and tile lists; below 1.00x where the mask skips work), and that kernel over "
            "SDPA is_causal (Triton's code generation against a hand-written kernel):", "",
            "| layout | N | mask fwd | mask bwd | mask fwd+bwd | Triton fwd | Triton bwd | Triton fwd+bwd |",
            "|---|---|---|---|---|---|---|---|"] + lines
