"""dQ added by the dK/dV kernel with atomics (``KernelConfig.dq_atomic``), under the Triton
interpreter: against the float64 reference and the two-kernel backward, every element written,
and the deterministic dQ kernel whenever torch is asked for deterministic algorithms."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import livr_kernels.backward as backward_mod
from kernel_cases import livr_layout, packed_docs, poison_outputs, random_qkv
from livr_kernels import RULES, KernelConfig, SegmentLayout
from livr_kernels.attention import kernel_tiles
from test_kernels import SMALL_TILES, assert_close_fp32, kernel, reference64

ATOMIC_TILES = dataclasses.replace(SMALL_TILES, dq_atomic=True)

pytestmark = pytest.mark.interpreter


@pytest.fixture
def dq_kernel_launches(monkeypatch):
    """Counts launches of the dQ kernel (none when dQ is added by dK/dV)."""
    launches = []
    original = backward_mod.segment_attention_bwd_kernel_dq

    class Recording:
        def __getitem__(self, grid):
            launches.append(grid)
            return original[grid]

    monkeypatch.setattr(backward_mod, "segment_attention_bwd_kernel_dq", Recording())
    return launches


# (batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs, split): odd lengths (the last query tile runs
# past n_q: its atomics are masked), GQA (each query head of a group adds into its own dQ), a head
# dim below its block (the accumulator's rows are D wide, not BLOCK_D), doc ids, fewer queries than
# keys, and dK/dV split across the GQA group.
CASES = [
    pytest.param(1, 2, 2, 37, 37, 16, 3, 0, 1, id="n37"),
    pytest.param(2, 4, 2, 45, 45, 24, 5, 2, 1, id="gqa-d24-docs"),
    pytest.param(1, 4, 1, 9, 50, 16, 0, 0, 1, id="nq9-nk50-gqa4"),
    pytest.param(2, 8, 2, 40, 40, 32, 5, 2, 2, id="split2"),
]


@pytest.mark.parametrize("rule", ["bottleneck", "standard"])
@pytest.mark.parametrize("batch,hq,hkv,n_q,n_k,head_dim,pad,num_docs,split", CASES)
def test_atomic_dq_matches_the_reference_and_the_dq_kernel(
    dq_kernel_launches, rule, batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs, split
):
    seg = livr_layout(batch, n_k, pad=pad)
    doc = packed_docs(batch, n_k, num_docs) if num_docs else None
    q, k, v, do = random_qkv(batch, hq, hkv, n_q, n_k, head_dim)
    atomic = kernel(q, k, v, do, seg, rule, doc, config=dataclasses.replace(ATOMIC_TILES, dkv_split=split))
    assert dq_kernel_launches == [], "the dQ kernel ran although dK/dV added dQ"
    two_kernels = kernel(q, k, v, do, seg, rule, doc, config=dataclasses.replace(SMALL_TILES, dkv_split=split))
    assert len(dq_kernel_launches) == 1
    assert_close_fp32(atomic, reference64(q, k, v, do, seg, rule, doc))
    assert_close_fp32(atomic, [t.double() for t in two_kernels])


def test_every_dq_element_is_written(monkeypatch):
    """Every buffer starts as NaN, the fp32 accumulator included: the preprocess must zero all of it."""
    poison_outputs(monkeypatch)
    seg = livr_layout(2, 50, pad=20)
    q, k, v, do = random_qkv(2, 4, 2, 50, 50, 48)
    got = kernel(q, k, v, do, seg, "bottleneck", packed_docs(2, 50, 2), config=ATOMIC_TILES)
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"
    assert_close_fp32(got, reference64(q, k, v, do, seg, "bottleneck", packed_docs(2, 50, 2)))


def test_deterministic_algorithms_take_the_dq_kernel(dq_kernel_launches):
    seg = livr_layout(1, 40, pad=3)
    q, k, v, do = random_qkv(1, 4, 2, 40, 40, 16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = kernel(q, k, v, do, seg, "bottleneck", None, config=ATOMIC_TILES)
        second = kernel(q, k, v, do, seg, "bottleneck", None, config=ATOMIC_TILES)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(dq_kernel_launches) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert_close_fp32(first, reference64(q, k, v, do, seg, "bottleneck", None))


def test_atomic_dq_is_off_unless_asked():
    assert KernelConfig().dq_atomic is False


def test_atomic_dq_builds_no_dq_schedule():
    """With dQ added by dK/dV, a training step builds only the forward's and dK/dV's tile lists: the
    dQ kernel's list (its own tile shape, a sort and count per step) would never be read."""
    seg = livr_layout(1, 40, pad=3)
    q, k, v, do = random_qkv(1, 4, 2, 40, 40, 16)
    layout = SegmentLayout(seg)
    kernel(q, k, v, do, layout, "bottleneck", None, config=ATOMIC_TILES)
    bits, c = RULES["bottleneck"].bits, ATOMIC_TILES
    forward, dkv = (bits, c.fwd_block_m, c.fwd_block_n, 40, False), (bits, c.dkv_block_m, c.dkv_block_n, 40, True)
    assert (c.dq_block_m, c.dq_block_n) != (c.fwd_block_m, c.fwd_block_n)  # the dQ list would be a third
    assert set(layout._schedules) == {forward, dkv}
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert "dq" in kernel_tiles(ATOMIC_TILES)
    finally:
        torch.use_deterministic_algorithms(previous)
