"""The GPU report's tables, from made-up timings (the report itself needs a GPU)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_report  # noqa: E402
import triton_causal  # noqa: E402


def _row(layout, n, method, fwd, bwd):
    return {"layout": layout, "n": n, "batch": 1, "method": method, "fwd_ms": fwd, "bwd_ms": bwd,
            "fwd_bwd_ms": None if fwd is None else fwd + bwd}


def test_variants_table_divides_each_variant_by_the_static_table():
    rows = [
        _row("packed", 8192, "livr_table", 1.0, 2.0),
        _row("packed", 8192, "livr_table_row_order", 1.1, 3.0),
        _row("packed", 8192, "livr_table_dkv_in_place", 1.0, 2.5),
        _row("packed", 8192, "livr", 0.5, 0.5),  # not a variant of the table
        _row("single", 8192, "livr_table", 2.0, 4.0),
        _row("single", 8192, "livr_table_row_order", None, None),
        _row("single", 2048, "livr_table_row_order", 1.0, 1.0),  # no static-table row to compare with
    ]
    lines = gpu_report.variants_markdown(rows)
    assert "| livr_table_row_order (longest_first=False) | packed | 8192 | 1.10x | 1.50x | 1.37x |" in lines
    assert "| livr_table_dkv_in_place (dkv_index_ahead=False) | packed | 8192 | 1.00x | 1.25x | 1.17x |" in lines
    assert "| livr_table_row_order (longest_first=False) | single | 8192 | - | - | - |" in lines
    assert not any("| 2048 |" in line or line.startswith("| livr (") for line in lines)
    assert gpu_report.variants_markdown([_row("packed", 8192, "livr", 1.0, 1.0)]) == []
    info = {"device": "NVIDIA H100", "capability": "sm_90", "torch": "2.11"}
    report = gpu_report.markdown(info, {"summary": "skipped", "seconds": 0.0}, rows, [])
    assert "Static-table variants, measured" in report and "| packed | 8192 | 1.10x | 1.50x | 1.37x |" in report


def test_table_variants_are_timed_and_change_one_valid_setting():
    import dataclasses

    from livr_kernels.config import KernelConfig

    base = KernelConfig()
    for name, change in gpu_report.TABLE_VARIANTS.items():
        assert name in gpu_report.METHODS
        changed = dataclasses.replace(base, **change)
        assert [f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(changed, f.name)] == list(change)


def test_budget_stops_new_timings_and_the_report_says_how_many(monkeypatch):
    """Past the budget no timing starts (the lent GPU machines stop a command at 600 s): the report
    is still written, and names what it did not time."""
    now = [0.0]
    budget = gpu_report.Budget(10, clock=lambda: now[0])
    timed = []

    def fake_time(case, method, repeat_ms):
        timed.append(method)
        now[0] += 4.0  # every timing takes 4 s of the budget
        return {"fwd": 1.0, "fwd_bwd": 3.0}

    class Case:
        allowed_pairs, causal_pairs = 10, 20

        class segment_ids:
            shape = (2, 8)

    monkeypatch.setattr(gpu_report, "time_method", fake_time)
    monkeypatch.setattr(gpu_report.bench, "make_case", type("Cached", (), {
        "__call__": staticmethod(lambda layout, n: Case), "cache_clear": staticmethod(lambda: None)})())
    monkeypatch.setattr(gpu_report.bench, "RUNNERS", {m: None for m in gpu_report.METHODS})
    monkeypatch.setattr(gpu_report.torch.cuda, "empty_cache", lambda: None)
    rows = gpu_report.benchmark([2048, 4096], ["single"], 1, budget)
    assert timed == list(gpu_report.METHODS[:3])  # 0, 4, 8 s started; at 12 s the budget is spent
    assert len(rows) == 2 * len(gpu_report.METHODS)
    skipped = [r for r in rows if r.get("error") == gpu_report.NOT_TIMED]
    assert len(skipped) == len(rows) - 3 and {r["n"] for r in skipped} == {2048, 4096}
    assert gpu_report.flex_recompile_times("single", (3000,), budget) == []
    assert gpu_report.run_packing_step(budget) == [{"error": gpu_report.NOT_TIMED}]
    info = {"device": "NVIDIA H100", "capability": "sm_90", "torch": "2.11"}
    report = gpu_report.markdown(info, {"summary": "skipped", "seconds": 0.0}, rows, [])
    assert f"Time budget spent: {len(skipped)} of {len(rows)} timings above were not run" in report


def test_no_budget_never_runs_out():
    budget = gpu_report.Budget(0, clock=lambda: 1e12)
    assert not budget.spent() and budget.left(300) == 300


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_or_nan_budget_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_report.main(["--budget-s", value])
    assert exit_info.value.code == 2 and "--budget-s must be 0" in capsys.readouterr().err


def test_gap_table_splits_the_distance_to_causal_sdpa_into_mask_and_triton():
    rows = [
        _row("single", 8192, "livr_table", 3.0, 6.0),
        _row("single", 8192, "triton_causal", 2.0, 5.0),
        _row("single", 8192, "sdpa_causal", 1.0, 4.0),
        _row("packed", 8192, "livr_table", 1.0, 2.0),
        _row("packed", 8192, "triton_causal", 2.0, 4.0),  # no sdpa_causal row: nothing to split
        _row("single", 2048, "triton_causal", None, None),
        _row("single", 2048, "livr_table", 1.0, 1.0),
        _row("single", 2048, "sdpa_causal", 1.0, 1.0),
    ]
    lines = gpu_report.gap_markdown(rows)
    assert "| single | 8192 | 1.50x | 1.20x | 1.29x | 2.00x | 1.25x | 1.40x |" in lines
    assert "| single | 2048 | - | - | - | - | - | - |" in lines
    assert not any(line.startswith("| packed |") for line in lines)
    assert gpu_report.gap_markdown([_row("single", 8192, "livr_table", 1.0, 1.0)]) == []
    assert "triton_causal" in gpu_report.METHODS
    report = gpu_report.markdown({"device": "NVIDIA H100"}, {"summary": "skipped", "seconds": 0.0}, rows, [])
    assert "Where the time over causal SDPA goes" in report and "| single | 8192 | 1.50x |" in report


@pytest.mark.interpreter
def test_triton_causal_method_is_causal_attention_with_gqa_in_every_gradient():
    """The timed yardstick (K/V repeated for its backward, dK/dV summed back) against float64 SDPA."""
    import torch

    from livr_kernels import KernelConfig
    from livr_kernels._interpreter import patch_interpreter

    patch_interpreter()
    config = KernelConfig(fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16)
    torch.manual_seed(0)
    q, do = torch.randn(1, 4, 64, 24), torch.randn(1, 4, 64, 24)
    k, v = torch.randn(1, 2, 64, 24), torch.randn(1, 2, 64, 24)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = triton_causal.causal_yardstick(*leaves, config=config)
    out.backward(do)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, is_causal=True, enable_gqa=True)
    want.backward(do.double())
    for got, ref in zip([out] + [t.grad for t in leaves], [want] + [t.grad for t in ref_leaves]):
        assert got.shape == ref.shape
        assert (got.double() - ref).abs().max().item() < 1e-5


def test_kernel_breakdown_sums_each_part_per_step():
    kb = gpu_report.kernel_breakdown
    events = [("segment_attention_fwd_kernel", 2000.0), ("segment_attention_fwd_kernel", 2000.0),
              ("segment_attention_bwd_kernel_preprocess", 400.0), ("segment_attention_bwd_kernel_dkv", 6000.0),
              ("segment_attention_bwd_kernel_dq", 3000.0), ("causal_bwd_dkv_kernel", 1000.0),
              ("void at::native::vectorized_elementwise_kernel<...>", 600.0)]
    parts = kb.breakdown(events, steps=2)
    assert parts == {"forward": 2.0, "preprocess": 0.2, "dK/dV": 3.5, "dQ": 1.5, "other": 0.3}
    with pytest.raises(ValueError, match="steps must be at least 1"):
        kb.breakdown(events, steps=0)
    lines = kb.breakdown_markdown([{"layout": "single", "n": 8192, "method": "livr_table", **parts},
                                   {"layout": "packed", "n": 8192, "method": "livr", "error": "RuntimeError: x"}])
    assert "| single | 8192 | livr_table | 2.000 | 0.200 | 3.500 | 1.500 | 0.300 | 7.500 |" in lines
    assert "| packed | 8192 | livr | RuntimeError: x | - | - | - | - | - |" in lines
    assert kb.breakdown_markdown([]) == []


def test_profile_kernels_reads_the_profiler_events_of_each_step():
    """The profiler path itself, on CPU events (a GPU run reads the CUDA ones the same way)."""
    import torch
    from torch.autograd import DeviceType

    calls = []
    a = torch.randn(64, 64)

    def step():
        calls.append(1)
        return a @ a

    events = gpu_report.kernel_breakdown.profile_kernels(step, steps=3, device_type=DeviceType.CPU)
    assert len(calls) == 4  # one untimed step first
    matmuls = [us for name, us in events if name == "aten::mm"]
    assert len(matmuls) == 3 and all(us > 0 for us in matmuls)


def test_profile_kernels_refuses_a_profile_without_device_events(monkeypatch):
    """A profiler that records no kernel (CUPTI missing, say) must fail the row, not report zeros;
    the CPU activity stays on beside CUDA, without which kernel events have gone missing."""
    from types import SimpleNamespace

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    kb = gpu_report.kernel_breakdown
    seen = []

    class FakeProfile:
        def __init__(self, activities):
            seen.append(list(activities))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return [SimpleNamespace(name="cudaLaunchKernel", device_type=DeviceType.CPU,
                                    time_range=SimpleNamespace(elapsed_us=lambda: 5.0))]

    monkeypatch.setattr(kb, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    with pytest.raises(RuntimeError, match="recorded no"):
        kb.profile_kernels(lambda: None, steps=2, device_type=DeviceType.CUDA)
    assert seen == [[ProfilerActivity.CPU, ProfilerActivity.CUDA]]


def test_kernel_breakdowns_in_the_report_budget_and_errors(monkeypatch):
    now = [0.0]
    budget = gpu_report.Budget(10, clock=lambda: now[0])
    events = {"livr_table": [("segment_attention_bwd_kernel_dq", 5000.0)]}

    def fake_profile(step):
        now[0] += 6.0
        method = step()
        if method not in events:
            raise RuntimeError("profiler failed\nsecond line")
        return events[method]

    monkeypatch.setattr(gpu_report.kernel_breakdown, "profile_kernels", fake_profile)
    monkeypatch.setattr(gpu_report.bench, "make_case", type("Cached", (), {
        "__call__": staticmethod(lambda layout, n: None), "cache_clear": staticmethod(lambda: None)})())
    monkeypatch.setattr(gpu_report.bench, "make_step", lambda case, method, mode: lambda: method)
    monkeypatch.setattr(gpu_report.torch.cuda, "empty_cache", lambda: None)
    rows = gpu_report.kernel_breakdowns(16384, ["single"], budget)
    assert [r["method"] for r in rows] == list(gpu_report.BREAKDOWN_METHODS)
    assert rows[0]["dQ"] == 5000.0 / 1000 / gpu_report.kernel_breakdown.PROFILED_STEPS
    assert rows[1]["error"] == "RuntimeError: profiler failed"
    assert rows[2]["error"] == gpu_report.NOT_TIMED  # 12 s spent of 10
    report = gpu_report.markdown({"device": "NVIDIA H100"}, {"summary": "skipped", "seconds": 0.0}, [], [], (), rows)
    assert "GPU time of one forward + backward step by kernel" in report and "| single | 16384 | livr_table | 0.000 | 0.000 | 0.000 | 1.000 | 0.000 | 1.000 |" in report


def test_lengths_are_timed_longest_first_and_targets_before_variants():
    lengths = gpu_report.default_lengths(quick=False)  # 2k-16k on CUDA, one short length on CPU
    assert lengths == sorted(gpu_report.bench.SHAPE.seq_lens, reverse=True) and lengths[0] == max(lengths)
    assert gpu_report.default_lengths(quick=True) == [8192, 4096]
    order = list(gpu_report.METHODS)
    compared = ("livr", "sdpa_causal", "flex", "flex+block_mask", "sdpa_dense_mask")
    assert max(order.index(m) for m in compared) < min(order.index(m) for m in gpu_report.TABLE_VARIANTS)


def test_the_first_length_is_profiled_before_the_other_lengths_are_timed(monkeypatch):
    """A budget spent on the shorter lengths must not cost the per-kernel profile."""
    calls = []
    monkeypatch.setattr(gpu_report, "benchmark", lambda lengths, layouts, repeat_ms, budget: calls.append(
        ("time", list(lengths))) or [{"n": n} for n in lengths])
    monkeypatch.setattr(gpu_report, "kernel_breakdowns", lambda n, layouts, budget: calls.append(("profile", n)) or [{"n": n}])
    rows, kernels = gpu_report.timings([16384, 8192, 4096], ["single"], 1)
    assert calls == [("time", [16384]), ("profile", 16384), ("time", [8192, 4096])]
    assert [r["n"] for r in rows] == [16384, 8192, 4096] and kernels == [{"n": 16384}]
