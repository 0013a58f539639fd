"""The Triton kernels (under the interpreter) against the float64 dense reference."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st

import livr_kernels.backward as backward_mod
import livr_kernels.forward as forward_mod
from kernel_cases import livr_layout, packed_docs, poison_outputs, random_qkv
from livr_kernels import AttentionRule, KernelConfig, RULES, Segment, SegmentLayout, reference_attention, segment_attention
from livr_kernels.blocks import TILE_EMPTY
from livr_kernels.attention import kernel_tiles
from livr_kernels.config import group_split
from livr_kernels.forward import alloc_row_stats

# Small, unequal tiles so a short sequence spans many tiles of every class, and the forward,
# dK/dV and dQ kernels each see different block boundaries.
SMALL_TILES = KernelConfig(
    fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16
)
FP32_RELATIVE_TOLERANCE = 1e-5
# Error allowed for the kernel in low precision: this multiple of the same reference run in that dtype, plus a floor.
LOW_PRECISION_FACTOR = 2.0
# flash-attention's rule: 2x the same reference's error in the low-precision dtype plus 1e-3 (the
# interpreter now rounds fp32 -> bf16 to nearest even as the GPU does; truncating needed 1e-2).
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-3}


def run_with_grads(fn, q, k, v, do):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out,) + grads


def reference64(q, k, v, do, segment_ids, rule, doc_ids):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    return run_with_grads(
        lambda a, b, c: reference_attention(a, b, c, segment_ids, rule, doc_ids), q64, k64, v64, do.double()
    )


def kernel(q, k, v, do, segment_ids, rule, doc_ids, config=SMALL_TILES):
    return run_with_grads(
        lambda a, b, c: segment_attention(a, b, c, segment_ids, rule, doc_ids, backend="triton", config=config),
        q, k, v, do,
    )


def assert_close_fp32(got, want, names=("out", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want):
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err = (g.double() - w).abs().max().item()
        scale = max(w.abs().max().item(), 1.0)
        assert err <= FP32_RELATIVE_TOLERANCE * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


# (batch, hq, hkv, n_q, n_k, head_dim, pad, left_pad, num_docs)
FP32_CASES = [
    pytest.param(1, 2, 2, 1, 1, 16, 0, False, 0, id="n1"),
    pytest.param(2, 2, 1, 17, 17, 16, 3, False, 0, id="n17-gqa2-pad"),
    pytest.param(1, 4, 1, 77, 77, 80, 0, False, 0, id="n77-gqa4-d80"),
    pytest.param(1, 8, 1, 33, 33, 64, 0, False, 2, id="n33-gqa8-docs"),
    pytest.param(2, 2, 2, 130, 130, 64, 9, True, 0, id="n130-leftpad"),
    pytest.param(1, 2, 1, 9, 77, 128, 0, False, 0, id="nq9-nk77-d128"),
    pytest.param(1, 2, 2, 257, 257, 16, 5, False, 3, id="n257-docs-pad"),
]


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("batch,hq,hkv,n_q,n_k,head_dim,pad,left_pad,num_docs", FP32_CASES)
def test_fp32_forward_and_gradients(rule, batch, hq, hkv, n_q, n_k, head_dim, pad, left_pad, num_docs):
    seg = livr_layout(batch, n_k, pad=pad, left_pad=left_pad)
    doc = packed_docs(batch, n_k, num_docs) if num_docs else None
    q, k, v, do = random_qkv(batch, hq, hkv, n_q, n_k, head_dim)
    assert_close_fp32(kernel(q, k, v, do, seg, rule, doc), reference64(q, k, v, do, seg, rule, doc))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "hq,hkv,n,head_dim,num_docs",
    [(4, 2, 77, 64, 0), (2, 1, 130, 96, 2)],
    ids=["n77-d64", "n130-d96-docs"],
)
def test_low_precision_error_within_twice_reference(dtype, hq, hkv, n, head_dim, num_docs):
    seg = livr_layout(1, n, pad=4)
    doc = packed_docs(1, n, num_docs) if num_docs else None
    q, k, v, do = random_qkv(1, hq, hkv, n, n, head_dim, dtype=dtype)
    want = reference64(q, k, v, do, seg, "bottleneck", doc)
    got = kernel(q, k, v, do, seg, "bottleneck", doc)
    low = run_with_grads(lambda a, b, c: reference_attention(a, b, c, seg, "bottleneck", doc), q, k, v, do)
    for name, g, lo, w in zip(("out", "dq", "dk", "dv"), got, low, want):
        assert g.dtype == dtype
        err = (g.double() - w).abs().max().item()
        ref_err = (lo.double() - w).abs().max().item()
        bound = LOW_PRECISION_FACTOR * ref_err + LOW_PRECISION_FLOOR[dtype]
        assert err <= bound, f"{name}: kernel error {err:.3g} > {bound:.3g} (reference in {dtype}: {ref_err:.3g})"


def test_default_tile_sizes():
    seg = livr_layout(1, 200, pad=7)
    q, k, v, do = random_qkv(1, 2, 1, 200, 200, 64)
    assert_close_fp32(kernel(q, k, v, do, seg, "bottleneck", None, config=None), reference64(q, k, v, do, seg, "bottleneck", None))


def test_strided_views_need_no_copy():
    """transformers hands (B, N, H, D) projections transposed to (B, H, N, D): non-contiguous views."""
    batch, n, hq, hkv, d = 2, 40, 4, 2, 32
    q = torch.randn(batch, n, hq, d).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, n, hkv, d).transpose(1, 2).requires_grad_()
    v = torch.randn(batch, n, hkv, d).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    do = torch.randn(batch, n, hq, d).transpose(1, 2)
    seg = livr_layout(batch, n, pad=3)
    assert_close_fp32(kernel(q, k, v, do, seg, "bottleneck", None), reference64(q, k, v, do, seg, "bottleneck", None))


def test_rows_without_keys_are_zero_with_zero_gradient():
    # A rule where TEXT sees nothing: TEXT rows (and PAD rows) must output exactly 0, never NaN.
    blind_text = AttentionRule.from_blocked("blind_text", [(Segment.TEXT, kind) for kind in Segment])
    seg = livr_layout(2, 45, pad=6)
    q, k, v, do = random_qkv(2, 2, 1, 45, 45, 32)
    out, dq, dk, dv = kernel(q, k, v, do, seg, blind_text, None)
    dead = (seg == int(Segment.TEXT)) | (seg == int(Segment.PAD))
    assert dead.any()
    assert torch.equal(out.permute(0, 2, 1, 3)[dead], torch.zeros_like(out.permute(0, 2, 1, 3)[dead]))
    assert torch.equal(dq.permute(0, 2, 1, 3)[dead], torch.zeros_like(dq.permute(0, 2, 1, 3)[dead]))
    # PAD keys are never attended, so their K and V get no gradient.
    pad_keys = seg == int(Segment.PAD)
    assert torch.equal(dk.permute(0, 2, 1, 3)[pad_keys], torch.zeros_like(dk.permute(0, 2, 1, 3)[pad_keys]))
    assert torch.equal(dv.permute(0, 2, 1, 3)[pad_keys], torch.zeros_like(dv.permute(0, 2, 1, 3)[pad_keys]))
    assert_close_fp32((out, dq, dk, dv), reference64(q, k, v, do, seg, blind_text, None))


def test_every_output_element_written(monkeypatch):
    """Outputs start as NaN: any element the kernels forget to write shows up."""
    poison_outputs(monkeypatch)
    seg = livr_layout(2, 50, pad=20)
    q, k, v, do = random_qkv(2, 4, 2, 50, 50, 48)
    got = kernel(q, k, v, do, seg, "bottleneck", packed_docs(2, 50, 2))
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"


def test_lse_and_delta_rows_start_aligned(monkeypatch):
    """lse and delta rows lie ROW_STATS_ALIGN elements apart (padded past n_q), so a row stride
    divisible by 16 tells Triton every row is aligned; an lse packed n_q apart is laid out that
    way by the backward and gives the same gradients."""
    rows = []

    def recording_alloc(*args):
        rows.append(alloc_row_stats(*args))
        return rows[-1]

    monkeypatch.setattr(backward_mod, "alloc_row_stats", recording_alloc)
    batch, heads, n = 2, 4, 50
    padded = forward_mod.row_stats_stride(n)
    assert padded % forward_mod.ROW_STATS_ALIGN == 0 and n < padded < n + forward_mod.ROW_STATS_ALIGN
    seg = livr_layout(batch, n, pad=5)
    q, k, v, do = random_qkv(batch, heads, 2, n, n, 16, requires_grad=False)
    layout, rule, scale = SegmentLayout(seg, packed_docs(batch, n, 2)), RULES["bottleneck"], 16 ** -0.5
    o, lse = forward_mod.segment_attention_fwd(q, k, v, layout, rule, scale, SMALL_TILES)
    assert lse.shape == (batch, heads, n) and lse.stride() == (heads * padded, padded, 1)
    assert forward_mod.aligned_row_stats(lse) is lse
    grads = backward_mod.segment_attention_bwd(do, q, k, v, o, lse, layout, rule, scale, SMALL_TILES)
    (delta,) = rows
    assert delta.shape == lse.shape and delta.stride() == lse.stride()
    packed = lse.contiguous()
    assert packed.stride(1) == n
    assert torch.equal(forward_mod.aligned_row_stats(packed), lse) and forward_mod.aligned_row_stats(packed).stride() == lse.stride()
    again = backward_mod.segment_attention_bwd(do, q, k, v, o, packed, layout, rule, scale, SMALL_TILES)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


@pytest.mark.parametrize("split", [2, 4])
def test_dkv_split_across_the_gqa_group(split):
    """dK/dV split into parts of the GQA group (partial sums added in torch) matches the reference."""
    seg = livr_layout(2, 40, pad=5)
    q, k, v, do = random_qkv(2, 8, 2, 40, 40, 32)
    config = dataclasses.replace(SMALL_TILES, dkv_split=split)
    got = kernel(q, k, v, do, seg, "bottleneck", packed_docs(2, 40, 2), config=config)
    assert_close_fp32(got, reference64(q, k, v, do, seg, "bottleneck", packed_docs(2, 40, 2)))
    again = kernel(q, k, v, do, seg, "bottleneck", packed_docs(2, 40, 2), config=config)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_launch_order_changes_nothing_but_the_order():
    """Longest-first and row-order launches compute every program alike: bit-identical results."""
    seg = livr_layout(2, 50, pad=20)
    q, k, v, do = random_qkv(2, 4, 2, 50, 50, 32)
    for split in (1, 2):
        config = dataclasses.replace(SMALL_TILES, dkv_split=split)
        longest = kernel(q, k, v, do, seg, "bottleneck", packed_docs(2, 50, 2), config=config)
        in_order = kernel(q, k, v, do, seg, "bottleneck", packed_docs(2, 50, 2),
                          config=dataclasses.replace(config, longest_first=False))
        assert all(torch.equal(a, b) for a, b in zip(longest, in_order))
        assert_close_fp32(longest, reference64(q, k, v, do, seg, "bottleneck", packed_docs(2, 50, 2)))


def test_dkv_index_read_ahead_changes_nothing_but_the_pipelining():
    """dK/dV reading its next tile index one iteration ahead (the default) or in the iteration that
    uses it (``dkv_index_ahead=False``, where ahead spills) visits the same tiles: identical results."""
    seg = livr_layout(2, 61, pad=9)
    q, k, v, do = random_qkv(2, 4, 2, 61, 61, 16)
    docs = packed_docs(2, 61, 3)
    ahead = kernel(q, k, v, do, seg, "bottleneck", docs)
    in_place = kernel(q, k, v, do, seg, "bottleneck", docs, config=dataclasses.replace(SMALL_TILES, dkv_index_ahead=False))
    assert SMALL_TILES.dkv_index_ahead
    assert all(torch.equal(a, b) for a, b in zip(ahead, in_place))
    assert_close_fp32(ahead, reference64(q, k, v, do, seg, "bottleneck", docs))


def test_kernels_follow_the_launch_order(monkeypatch):
    """A launch order that lists one row twice and drops another leaves that row unwritten: the
    kernels take their rows from ``TileSchedule.order``."""
    poison_outputs(monkeypatch)
    seg = livr_layout(1, 64, pad=4)
    q, k, v, do = random_qkv(1, 2, 1, 64, 64, 16)
    layout = SegmentLayout(seg)
    rule = RULES["bottleneck"]
    schedules = layout.schedules(rule, kernel_tiles(SMALL_TILES), 64)
    for name, schedule in schedules.items():
        order = schedule.order.clone()
        order[-1] = order[0]
        bm, bn, by_key = kernel_tiles(SMALL_TILES)[name]
        layout._schedules[(rule.bits, bm, bn, 64, by_key)] = dataclasses.replace(schedule, order=order)
    got = kernel(q, k, v, do, layout, "bottleneck", None)
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert torch.isnan(t).any(), f"{name}: every row was written although the order dropped one"


def test_dkv_split_must_divide_the_group():
    seg = livr_layout(1, 20)
    q, k, v, do = random_qkv(1, 4, 2, 20, 20, 16)
    with pytest.raises(ValueError, match="dkv_split must divide the GQA group size 2"):
        kernel(q, k, v, do, seg, "bottleneck", None, config=dataclasses.replace(SMALL_TILES, dkv_split=4))


def test_group_split_fills_the_gpu_only_when_the_grid_is_small():
    # 132 SMs: a grid of 1024 programs needs no split; 64 programs split a group of 8 until 2 waves.
    assert group_split(1024, 8, 132) == 1
    assert group_split(64, 8, 132) == 8
    assert group_split(100, 8, 132) == 4
    assert group_split(100, 6, 132) == 2
    assert group_split(10, 1, 132) == 1


def test_int64_tile_offsets(monkeypatch):
    """Keys or queries past 2**31 elements get int64 tile offsets: force that branch on a small case."""
    assert not forward_mod.int32_key_offsets({"n_k": 2 ** 20, "stride_kn": 2 ** 11, "stride_vn": 128})
    assert forward_mod.int32_key_offsets({"n_k": 2 ** 20, "stride_kn": 2 ** 10, "stride_vn": 2 ** 10})
    assert not backward_mod.int32_query_offsets({"n_q": 2 ** 20, "stride_qn": 128, "stride_don": 2 ** 11})
    assert backward_mod.int32_query_offsets({"n_q": 2 ** 20, "stride_qn": 2 ** 10, "stride_don": 2 ** 10})
    for kernel_fn in (forward_mod.segment_attention_fwd_kernel, backward_mod.segment_attention_bwd_kernel_dkv,
                      backward_mod.segment_attention_bwd_kernel_dq):
        monkeypatch.setitem(kernel_fn.values, "INT32_OFFSETS", lambda args: False)
    seg = livr_layout(1, 50, pad=3)
    q, k, v, do = random_qkv(1, 2, 1, 50, 50, 32)
    assert_close_fp32(kernel(q, k, v, do, seg, "bottleneck", None), reference64(q, k, v, do, seg, "bottleneck", None))


def test_values_with_their_own_row_stride(monkeypatch):
    """V rows further apart than K's (a slice of a wider tensor) are read with V's own stride: one
    tile offset for both is only taken when the strides match, and forcing it here reads the wrong
    V rows (so the case does tell the two branches apart)."""
    assert forward_mod.shared_kv_stride({"stride_kn": 64, "stride_vn": 64})
    assert not forward_mod.shared_kv_stride({"stride_kn": 64, "stride_vn": 128})
    seg = livr_layout(1, 50, pad=3)
    q, k, _, _ = random_qkv(1, 2, 1, 50, 50, 16, requires_grad=False)
    v = torch.randn(1, 1, 50, 32)[..., :16]
    want = reference_attention(q.double(), k.double(), v.double(), seg, "bottleneck")
    out = segment_attention(q, k, v, seg, "bottleneck", backend="triton", config=SMALL_TILES)
    assert_close_fp32((out,), (want,), names=("out",))
    monkeypatch.setitem(forward_mod.segment_attention_fwd_kernel.values, "SHARED_KV_STRIDE", lambda args: True)
    forced = segment_attention(q, k, v, seg, "bottleneck", backend="triton", config=SMALL_TILES)
    assert (forced.double() - want).abs().max().item() > 0.1


def test_negative_scale_is_rejected():
    seg = livr_layout(1, 20)
    q, k, v, _ = random_qkv(1, 2, 1, 20, 20, 16, requires_grad=False)
    with pytest.raises(ValueError, match="scale must be a positive"):
        segment_attention(q, k, v, seg, backend="triton", scale=-0.1)


def test_backward_is_deterministic():
    seg = livr_layout(1, 64, pad=2)
    q, k, v, do = random_qkv(1, 8, 2, 64, 64, 32)
    first = kernel(q, k, v, do, seg, "bottleneck", None)
    second = kernel(q, k, v, do, seg, "bottleneck", None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", ["standard", "bottleneck"])
def test_empty_tiles_are_never_loaded(rule):
    """K and V set to NaN in every key block that is empty for one query block: that block's rows
    stay exact, so the forward never loads an empty tile (a masked-out load would still poison
    the softmax-weighted sum, since 0 * NaN = NaN)."""
    n, bm, bn = 120, SMALL_TILES.fwd_block_m, SMALL_TILES.fwd_block_n
    seg = livr_layout(1, n, pad=10)
    layout = SegmentLayout(seg)
    classes = layout.tile_mask(rule, bm, bn).to_dense()[0]
    q, k, v, _ = random_qkv(1, 2, 1, n, n, 16, requires_grad=False)
    want = reference_attention(q.double(), k.double(), v.double(), seg, rule)
    checked = 0
    for i_m in range(classes.shape[0]):
        empty = (classes[i_m] == TILE_EMPTY).nonzero().flatten().tolist()
        if not empty:
            continue
        k_poisoned, v_poisoned = k.clone(), v.clone()
        for i_n in empty:
            k_poisoned[:, :, i_n * bn:(i_n + 1) * bn] = float("nan")
            v_poisoned[:, :, i_n * bn:(i_n + 1) * bn] = float("nan")
        out = segment_attention(q, k_poisoned, v_poisoned, layout, rule, backend="triton", config=SMALL_TILES)
        rows = slice(i_m * bm, (i_m + 1) * bm)
        assert_close_fp32([out[:, :, rows]], [want[:, :, rows]], names=[f"rows of query block {i_m}"])
        checked += 1
    assert checked >= 2


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 70),
    kinds=st.lists(st.integers(0, 4), min_size=70, max_size=70),
    docs=st.lists(st.integers(0, 2), min_size=70, max_size=70),
    use_docs=st.booleans(),
    rule=st.sampled_from(sorted(RULES)),
    n_q_fraction=st.floats(0.1, 1.0),
)
def test_random_layouts(n, kinds, docs, use_docs, rule, n_q_fraction):
    seg = torch.tensor(kinds[:n]).unsqueeze(0)
    doc = torch.tensor(sorted(docs[:n])).unsqueeze(0) if use_docs else None
    n_q = max(1, int(n * n_q_fraction))
    q, k, v, do = random_qkv(1, 2, 1, n_q, n, 16)
    assert_close_fp32(kernel(q, k, v, do, seg, rule, doc), reference64(q, k, v, do, seg, rule, doc))


def test_interpreter_accepts_loop_bounds_loaded_from_memory():
    """Triton 3.6's interpreter refuses ``range(0, tl.load(p))`` under NumPy 2.4 until patched."""
    import triton
    import triton.language as tl

    from livr_kernels._interpreter import patch_interpreter

    @triton.jit
    def count_up(p_count, p_out):
        i = tl.program_id(0)
        b_sum = 0
        for i_t in range(0, tl.load(p_count + i)):
            b_sum += i_t
        tl.store(p_out + i, b_sum)

    patch_interpreter()
    counts = torch.tensor([0, 1, 4], dtype=torch.int32)
    out = torch.full((3,), -1, dtype=torch.int32)
    count_up[(3,)](counts, out)
    assert out.tolist() == [0, 0, 6]


def test_auto_backend_on_cpu_is_reference():
    seg = livr_layout(1, 20)
    q, k, v, _ = random_qkv(1, 2, 1, 20, 20, 16, requires_grad=False)
    assert torch.equal(segment_attention(q, k, v, seg), reference_attention(q, k, v, seg, "bottleneck"))


def test_triton_backend_on_cpu_requires_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    seg = livr_layout(1, 20)
    q, k, v, _ = random_qkv(1, 2, 1, 20, 20, 16, requires_grad=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        segment_attention(q, k, v, seg, backend="triton")


@triton.jit
def _cast_to_bf16_kernel(x, y, N: tl.constexpr):
    o_n = tl.arange(0, N)
    tl.store(y + o_n, tl.load(x + o_n).to(tl.bfloat16))


def test_interpreter_casts_fp32_to_bf16_like_the_gpu():
    """Round to nearest even, bit for bit with torch (the unpatched interpreter truncates)."""
    from livr_kernels._interpreter import patch_interpreter

    patch_interpreter()
    n = 4096
    x = torch.randn(n) * 100
    x[:3] = torch.tensor([float("inf"), -float("inf"), 0.0])
    y = torch.empty(n, dtype=torch.bfloat16)
    _cast_to_bf16_kernel[(1,)](x, y, N=n)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    truncated = (x.view(torch.int32) >> 16).to(torch.int16)
    assert not torch.equal(truncated, want.view(torch.int16)), "inputs must tell rounding from truncation"
