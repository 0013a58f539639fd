"""The compiled kernels on a real GPU, against the float64 dense reference.

Runs only where CUDA is present (``make gpu-report`` runs this file first); on CPU the same
kernels are covered under the Triton interpreter by ``test_kernels.py``. Sizes here are the
ones the interpreter cannot afford: thousands of tokens, every head dim, the default tiles.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import livr_kernels.forward as forward_mod
from kernel_cases import livr_layout, packed_docs, poison_outputs
from livr_kernels import RULES, SegmentLayout, reference_attention, segment_attention
from livr_kernels.config import default_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-report)")

DEVICE = "cuda"
# fp32 runs IEEE dots (no TF32), so it must match float64 to fp32 rounding over a long sum.
FP32_RELATIVE_TOLERANCE = 2e-5
# flash-attention's rule: at most this multiple of the error of the same reference in the
# low-precision dtype, plus a small floor for outputs where that reference is exact.
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-3


def _inputs(batch, hq, hkv, n_q, n_k, head_dim, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)

    q = randn(batch, hq, n_q, head_dim).requires_grad_()
    k = randn(batch, hkv, n_k, head_dim).requires_grad_()
    v = randn(batch, hkv, n_k, head_dim).requires_grad_()
    do = randn(batch, hq, n_q, head_dim)
    return q, k, v, do


def _with_grads(fn, q, k, v, do):
    out = fn(q, k, v)
    return (out,) + torch.autograd.grad(out, (q, k, v), do)


def _reference(q, k, v, do, seg, rule, doc, dtype=torch.float64):
    cast = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    return _with_grads(lambda a, b, c: reference_attention(a, b, c, seg, rule, doc), *cast, do.to(dtype))


def _kernel(q, k, v, do, seg, rule, doc):
    return _with_grads(lambda a, b, c: segment_attention(a, b, c, seg, rule, doc, backend="triton"), q, k, v, do)


def _assert_within_twice_reference(got, low, want, dtype):
    """flash-attention's rule for each of (out, dq, dk, dv): finite, in ``dtype``, and within twice the
    error of the same reference run in ``dtype`` (``low``) against float64 (``want``), plus a floor."""
    for name, g, lo, w in zip(("out", "dq", "dk", "dv"), got, low, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"{name}: dtype {g.dtype} or non-finite (unwritten) values"
        err = (g.double() - w).abs().max().item()
        ref_err = (lo.double() - w).abs().max().item()
        bound = LOW_PRECISION_FACTOR * ref_err + LOW_PRECISION_FLOOR
        assert err <= bound, f"{name}: kernel error {err:.3g} > {bound:.3g} (reference in {dtype}: {ref_err:.3g})"


# (batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs)
SHAPES = [
    pytest.param(1, 2, 2, 1, 1, 64, 0, 0, id="n1"),
    pytest.param(2, 4, 2, 129, 129, 64, 7, 0, id="n129-pad"),
    pytest.param(1, 8, 1, 1000, 1000, 128, 0, 3, id="n1000-gqa8-docs"),
    pytest.param(2, 16, 2, 2049, 2049, 128, 100, 0, id="n2049-gqa8-pad"),
    pytest.param(1, 4, 4, 777, 777, 80, 0, 0, id="n777-d80"),
    pytest.param(1, 4, 2, 513, 513, 256, 11, 2, id="n513-d256-docs"),
    pytest.param(1, 4, 2, 7, 900, 128, 0, 0, id="nq7-nk900"),
    pytest.param(1, 6, 2, 300, 300, 96, 0, 0, id="n300-d96"),
]


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("batch,hq,hkv,n_q,n_k,head_dim,pad,num_docs", SHAPES)
def test_fp32_matches_float64(rule, batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs):
    seg = livr_layout(batch, n_k, pad=pad).to(DEVICE)
    doc = packed_docs(batch, n_k, num_docs).to(DEVICE) if num_docs else None
    q, k, v, do = _inputs(batch, hq, hkv, n_q, n_k, head_dim, torch.float32)
    got = _kernel(q, k, v, do, seg, rule, doc)
    want = _reference(q, k, v, do, seg, rule, doc)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err = (g.double() - w).abs().max().item()
        scale = max(w.abs().max().item(), 1.0)
        assert err <= FP32_RELATIVE_TOLERANCE * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rule", ["bottleneck", "standard"])
@pytest.mark.parametrize("batch,hq,hkv,n_q,n_k,head_dim,pad,num_docs", SHAPES)
def test_low_precision_within_twice_reference(dtype, rule, batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs):
    seg = livr_layout(batch, n_k, pad=pad).to(DEVICE)
    doc = packed_docs(batch, n_k, num_docs).to(DEVICE) if num_docs else None
    q, k, v, do = _inputs(batch, hq, hkv, n_q, n_k, head_dim, dtype)
    got = _kernel(q, k, v, do, seg, rule, doc)
    want = _reference(q, k, v, do, seg, rule, doc)
    low = _reference(q, k, v, do, seg, rule, doc, dtype=dtype)
    _assert_within_twice_reference(got, low, want, dtype)


def test_every_output_element_written(monkeypatch):
    poison_outputs(monkeypatch)
    n = 1500
    seg = livr_layout(2, n, pad=300).to(DEVICE)
    q, k, v, do = _inputs(2, 8, 2, n, n, 128, torch.bfloat16)
    for name, t in zip(("out", "dq", "dk", "dv"), _kernel(q, k, v, do, seg, "bottleneck", packed_docs(2, n, 3).to(DEVICE))):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"


def test_backward_is_deterministic():
    n = 2048
    seg = livr_layout(1, n, pad=5).to(DEVICE)
    q, k, v, do = _inputs(1, 16, 2, n, n, 128, torch.bfloat16)
    first = _kernel(q, k, v, do, seg, "bottleneck", None)
    second = _kernel(q, k, v, do, seg, "bottleneck", None)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# Settings that change only how the kernels schedule the same work: the launch order (longest row
# first or row order) and dK/dV's tile index read one iteration ahead or in place.
SCHEDULING_SETTINGS = ("longest_first", "dkv_index_ahead")


@pytest.mark.parametrize("setting", SCHEDULING_SETTINGS)
def test_scheduling_settings_give_identical_results(setting):
    """Either value of a scheduling setting computes the same programs: bit-identical results."""
    n = 3000
    seg = livr_layout(2, n, pad=400).to(DEVICE)
    doc = packed_docs(2, n, 4).to(DEVICE)
    q, k, v, do = _inputs(2, 16, 2, n, n, 128, torch.bfloat16)
    config = default_config(128, torch.cuda.get_device_capability(), torch.bfloat16)
    results = [
        _with_grads(lambda a, b, c: segment_attention(a, b, c, seg, "bottleneck", doc, backend="triton", config=c_),
                    q, k, v, do)
        for c_ in (dataclasses.replace(config, **{setting: True}), dataclasses.replace(config, **{setting: False}))
    ]
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs between {setting}=True and {setting}=False"


def test_prebuilt_layout_runs_without_host_sync():
    """Once a layout's tile lists exist, a forward + backward never waits for the GPU."""
    n = 1024
    layout = SegmentLayout(livr_layout(1, n, pad=9).to(DEVICE))
    q, k, v, do = _inputs(1, 8, 2, n, n, 128, torch.bfloat16)
    _kernel(q, k, v, do, layout, "bottleneck", None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = segment_attention(q, k, v, layout, "bottleneck", backend="triton")
        out.backward(do)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("batch,hq,hkv,n_q,n_k,head_dim,pad,num_docs", [
    pytest.param(2, 16, 2, 2049, 2049, 128, 100, 0, id="n2049-gqa8-pad"),
    pytest.param(1, 8, 1, 1000, 1000, 128, 0, 3, id="n1000-gqa8-docs"),
    pytest.param(1, 4, 4, 777, 777, 80, 0, 0, id="n777-d80"),
    pytest.param(1, 4, 2, 7, 900, 128, 0, 0, id="nq7-nk900"),
])
def test_tma_forward_within_twice_reference(monkeypatch, batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs):
    """``fwd_tma``: the forward's K and V through the copy engine (sm_90 and newer), bf16."""
    if torch.cuda.get_device_capability() < forward_mod.TMA_MIN_CAPABILITY:
        pytest.skip("TMA needs sm_90 or newer")
    took = []
    original = forward_mod.tma_descriptors
    monkeypatch.setattr(forward_mod, "tma_descriptors", lambda *a: took.append(1) or original(*a))
    seg = livr_layout(batch, n_k, pad=pad).to(DEVICE)
    doc = packed_docs(batch, n_k, num_docs).to(DEVICE) if num_docs else None
    q, k, v, do = _inputs(batch, hq, hkv, n_q, n_k, head_dim, torch.bfloat16)
    config = dataclasses.replace(default_config(head_dim, torch.cuda.get_device_capability(), torch.bfloat16), fwd_tma=True)
    assert original(k, v, config.fwd_block_n, 128) is not None
    got = _with_grads(lambda a, b, c: segment_attention(a, b, c, seg, "bottleneck", doc, backend="triton", config=config),
                      q, k, v, do)
    assert took, "the forward did not ask for descriptors"
    want = _reference(q, k, v, do, seg, "bottleneck", doc)
    low = _reference(q, k, v, do, seg, "bottleneck", doc, dtype=torch.bfloat16)
    _assert_within_twice_reference(got, low, want, torch.bfloat16)


@pytest.mark.parametrize("batch,hq,hkv,n_q,n_k,head_dim,pad,num_docs", [
    pytest.param(2, 16, 2, 2049, 2049, 128, 100, 0, id="n2049-gqa8-pad"),
    pytest.param(1, 8, 1, 1000, 1000, 128, 0, 3, id="n1000-gqa8-docs"),
    pytest.param(1, 4, 4, 777, 777, 80, 0, 0, id="n777-d80"),
    pytest.param(2, 4, 2, 129, 129, 64, 7, 0, id="n129-pad"),
    pytest.param(1, 4, 2, 7, 900, 128, 0, 0, id="nq7-nk900"),
])
def test_atomic_dq_within_twice_reference(monkeypatch, batch, hq, hkv, n_q, n_k, head_dim, pad, num_docs):
    """``dq_atomic``: dQ added by the dK/dV kernel with fp32 atomics, bf16, every buffer NaN-poisoned."""
    poison_outputs(monkeypatch)
    seg = livr_layout(batch, n_k, pad=pad).to(DEVICE)
    doc = packed_docs(batch, n_k, num_docs).to(DEVICE) if num_docs else None
    q, k, v, do = _inputs(batch, hq, hkv, n_q, n_k, head_dim, torch.bfloat16)
    config = dataclasses.replace(default_config(head_dim, torch.cuda.get_device_capability(), torch.bfloat16), dq_atomic=True)
    got = _with_grads(lambda a, b, c: segment_attention(a, b, c, seg, "bottleneck", doc, backend="triton", config=config),
                      q, k, v, do)
    want = _reference(q, k, v, do, seg, "bottleneck", doc)
    low = _reference(q, k, v, do, seg, "bottleneck", doc, dtype=torch.bfloat16)
    _assert_within_twice_reference(got, low, want, torch.bfloat16)
