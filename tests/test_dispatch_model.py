"""The launch-order dispatch model (benchmarks/dispatch_model.py): its scheduler and its verdict."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dispatch_model  # noqa: E402


def test_programs_start_in_order_on_the_first_free_slot():
    assert dispatch_model.finish_time([3, 1, 1, 1], 2) == 3
    # The long program last runs alone at the end: the tail longest-first launches avoid.
    assert dispatch_model.finish_time([1, 1, 1, 3], 2) == 4
    assert dispatch_model.finish_time([5], 4) == 5


def test_longest_first_leaves_less_tail_on_livr_layouts():
    rows = dispatch_model.model_rows([4096], dispatch_model.H100_SMS)
    assert {row[3] for row in rows} == {"forward", "dK/dV", "dQ"} and len(rows) == 6
    for layout, n, batch, kernel, programs, head_major, row_order, longest, _ in rows:
        assert float(longest) <= min(float(row_order), float(head_major)), (layout, kernel)
        assert float(longest) < 1.05, (layout, kernel, longest)
    # The earlier grids end causal-like rows on their longest blocks: the forward loses over 5% there.
    assert max(float(row[5]) for row in rows if row[3] == "forward") > 1.05
    assert max(float(row[6]) for row in rows if row[3] == "forward") > 1.05


def test_orders_are_checked():
    import pytest

    with pytest.raises(ValueError, match="order must be one of"):
        dispatch_model.program_costs(None, 1, 1, "shortest first")
