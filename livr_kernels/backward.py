"""Backward: the preprocess (delta = rowsum(dO * O)) and dK/dV kernels, and the launcher of all
three (dQ's kernel is in backward_dq.py).

Both main kernels walk tile lists from a ``TileSchedule`` like the forward: full tiles without mask
arithmetic, then partial ones; empty tiles are never visited. The dK/dV program
owns one key block of one K/V head and loops over every query head of its GQA group, so the group
reduction of dK and dV happens in registers (no atomics). dQ comes from the dQ kernel (fixed order,
deterministic) or, with ``KernelConfig.dq_atomic``, from the dK/dV kernel itself through fp32
atomic adds (5 matrix products per tile instead of 7; the order of the adds varies).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import SegmentLayout
from .config import KernelConfig, dkv_split, dq_atomic_on, head_dim_block
from .backward_dq import segment_attention_bwd_kernel_dq
from .forward import (
    INT32_LIMIT, LOG2E, PAD_KIND, aligned_row_stats, alloc_row_stats, dot_precision, head_dim_mask,
    key_id_rows, program_row, row_block, row_tiles, segment_allowed, tile_pointers,
)
from .segments import AttentionRule

# Allocation hook: tests swap in a NaN-filled allocator to prove every output element is written.
_alloc = torch.empty

# Rows x head dim the preprocess reads per program (64 rows at D=128; fewer rows at D=256, where
# 64 rows spill 96 B on sm_100 under Triton 3.6).
PREPROCESS_ELEMENTS = 64 * 128
PREPROCESS_WARPS = 4


@triton.jit
def segment_attention_bwd_kernel_preprocess(
    o, do, delta, dq_acc,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_delta,
    n_q,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
):
    # Batch x heads on the first grid axis: the second holds at most 65535 programs.
    i_bh, i_m = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_md = (o_m[:, None] < n_q) & (o_d[None, :] < D)
    p_o = o + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    p_do = do + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    # [BM, BD]
    b_o = tl.load(row_block(p_o, i_m * BLOCK_M, stride_on, tl.arange(0, BLOCK_M), o_d), mask=m_md, other=0.0).to(tl.float32)
    b_do = tl.load(row_block(p_do, i_m * BLOCK_M, stride_don, tl.arange(0, BLOCK_M), o_d), mask=m_md, other=0.0).to(tl.float32)
    tl.store(delta + i_bh.to(tl.int64) * stride_delta + o_m, tl.sum(b_o * b_do, 1), mask=o_m < n_q)
    if DQ_ATOMIC:
        # Zero the fp32 dQ accumulator (B, HQ, n_q, D) here: one launch fewer than a torch.zeros.
        p_dq_acc = dq_acc + i_bh.to(tl.int64) * n_q * D
        tl.store(row_block(p_dq_acc, i_m * BLOCK_M, D, tl.arange(0, BLOCK_M), o_d), tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                 mask=m_md)


def int32_query_offsets(args) -> bool:
    """Do query offsets (position x row stride) of Q and dO fit int32? Then tiles are addressed in int32."""
    return args["n_q"] * max(args["stride_qn"], args["stride_don"], 1) < INT32_LIMIT


@triton.jit
def _dkv_tile(
    b_dk, b_dv, b_k, b_v, b_seg_k, b_doc_k, o_n,
    p_q, p_do, p_lse, p_delta, p_seg, p_doc, p_dq_acc, o_bm, o_d, m_d, i_m, n_q, offset,
    stride_qn, stride_don, scale, scale_log2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    RULE_BITS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INT32_OFFSETS: tl.constexpr,
    MASKED: tl.constexpr,
):
    # A scalar offset per tile plus [BM, BD] offsets the compiler rematerialises (kept live across
    # the loop they would cost dK/dV 32 registers and spill it).
    i_m0 = i_m * BLOCK_M
    o_m = i_m0 + o_bm
    p_q_tile, p_do_tile = tile_pointers(p_q, p_do, i_m0, stride_qn, stride_don, INT32_OFFSETS)
    o_q = o_bm[:, None] * stride_qn + o_d[None, :]
    o_do = o_bm[:, None] * stride_don + o_d[None, :]
    if MASKED:
        m_m = o_m < n_q
        # [BM, BD]
        b_q = tl.load(p_q_tile + o_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_do = tl.load(p_do_tile + o_do, mask=m_m[:, None] & m_d[None, :], other=0.0)
        # Out-of-range rows get lse = +inf, hence p = 0.
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=float("inf"))
    else:
        b_q = tl.load(p_q_tile + o_q, mask=m_d[None, :], other=0.0)
        b_do = tl.load(p_do_tile + o_do, mask=m_d[None, :], other=0.0)
        b_lse = tl.load(p_lse + o_m)
    # [BN, BM]: the tile transposed, keys along rows.
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * scale_log2
    b_pt = tl.math.exp2(b_st - b_lse[None, :])
    if MASKED:
        b_pos_q = offset + o_m
        b_seg_q = tl.load(p_seg + b_pos_q, mask=m_m, other=PAD_KIND)
        b_doc_q = b_seg_q
        if HAS_DOCS:
            b_doc_q = tl.load(p_doc + b_pos_q, mask=m_m, other=-1)
        # [BM, BN] -> [BN, BM]
        b_allow = segment_allowed(b_seg_q, b_pos_q, b_doc_q, b_seg_k, o_n, b_doc_k, RULE_BITS, HAS_DOCS)
        b_pt = tl.where(tl.trans(b_allow), b_pt, 0.0)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
    # Loaded where it is used: kept live from the top of the tile it costs the 64 x 128 tile a spill.
    if MASKED:
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
    else:
        b_delta = tl.load(p_delta + o_m)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    if DQ_ATOMIC:
        # dQ of this tile from the dS already on chip (no dQ kernel recomputing S and P), added
        # to the fp32 accumulator: [BM, BN] x [BN, BD]
        b_dq = tl.dot(tl.trans(b_dst.to(b_k.dtype)), b_k, input_precision=DOT_PRECISION) * scale
        p_dq = row_block(p_dq_acc, i_m0, D, o_bm, o_d)
        if MASKED:
            tl.atomic_add(p_dq, b_dq, mask=m_m[:, None] & m_d[None, :], sem="relaxed")
        else:
            tl.atomic_add(p_dq, b_dq, mask=m_d[None, :], sem="relaxed")
    return b_dk, b_dv


@triton.heuristics({"DOT_PRECISION": dot_precision, "INT32_OFFSETS": int32_query_offsets})
@triton.jit
def segment_attention_bwd_kernel_dkv(
    q, k, v, do, lse, delta, dk, dv, seg, doc, dq_acc,
    full_count, full_index, partial_count, partial_index, row_order,
    scale, scale_log2,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lse,
    n_q, n_k, num_q_blocks, num_k_blocks,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    SPLIT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RULE_BITS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    LONGEST_FIRST: tl.constexpr,
    INDEX_AHEAD: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INT32_OFFSETS: tl.constexpr,
):
    # Program (batch row, key block, K/V head, part): each of the SPLIT parts owns GROUP // SPLIT
    # query heads of the group and writes its own partial dK/dV (head i_kvh * SPLIT + i_s).
    i_b, i_n, i_hs = program_row(row_order, num_k_blocks, HKV * SPLIT, LONGEST_FIRST)
    i_kvh, i_s = i_hs // SPLIT, i_hs % SPLIT
    i_b64 = i_b.to(tl.int64)
    offset = n_k - n_q

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_bm = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < n_k
    m_d = head_dim_mask(o_d, D, BLOCK_D)
    m_nd = m_n[:, None] & m_d[None, :]

    p_seg = seg + i_b64 * n_k
    p_doc = doc + i_b64 * n_k
    p_k = k + i_b64 * stride_kb + i_kvh.to(tl.int64) * stride_kh
    p_v = v + i_b64 * stride_vb + i_kvh.to(tl.int64) * stride_vh
    # [BN, BD]
    b_k = tl.load(row_block(p_k, i_n * BLOCK_N, stride_kn, tl.arange(0, BLOCK_N), o_d), mask=m_nd, other=0.0)
    b_v = tl.load(row_block(p_v, i_n * BLOCK_N, stride_vn, tl.arange(0, BLOCK_N), o_d), mask=m_nd, other=0.0)
    b_seg_k = tl.load(p_seg + o_n, mask=m_n, other=PAD_KIND)
    b_doc_k = b_seg_k
    if HAS_DOCS:
        b_doc_k = tl.load(p_doc + o_n, mask=m_n, other=-1)

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i_g in range(GROUP // SPLIT):
        # The row's tile lists are re-read for each query head (two loads) rather than kept live
        # across the group loop: kept, they spilled sm_100 at D=80/96 under Triton 3.6 and
        # D=80/128 under 3.9 with the index read ahead.
        p_full, n_full, p_partial, n_partial = row_tiles(
            full_count, full_index, partial_count, partial_index, i_b * num_k_blocks + i_n, num_q_blocks)
        i_h = i_kvh * GROUP + i_s * (GROUP // SPLIT) + i_g
        i_bhq = (i_b * HQ + i_h).to(tl.int64)
        p_q = q + i_b64 * stride_qb + i_h.to(tl.int64) * stride_qh
        p_do = do + i_b64 * stride_dob + i_h.to(tl.int64) * stride_doh
        # lse and delta share one row layout (``alloc_row_stats``); aligned rows vectorise their copies.
        p_lse = lse + i_bhq * stride_lse
        p_delta = delta + i_bhq * stride_lse
        p_dq_acc = dq_acc + i_bhq * n_q * D
        # INDEX_AHEAD reads the next full tile's index one iteration ahead, as the forward and dQ
        # do: the pipeliner then keeps every stage for Q and dO (3 buffers at num_stages=3 on
        # sm_90, not 2). Where that spills (``KernelConfig.dkv_index_ahead``) the index is loaded
        # in the iteration that uses it; the partial loop always does (read ahead there too, the
        # kernel spills under Triton 3.6).
        if INDEX_AHEAD:
            i_m = tl.load(p_full)
        # A pointer stepped per tile rather than p_full + i_t: no 64-bit sign extension of the
        # counter (sm_100's loop 6-7 SASS instructions shorter under Triton 3.6 and 3.9).
        p_index = p_full
        for i_t in range(0, n_full):
            if INDEX_AHEAD:
                i_next = tl.load(p_full + tl.minimum(i_t + 1, num_q_blocks - 1))
            else:
                i_m = tl.load(p_index)
                p_index += 1
            b_dk, b_dv = _dkv_tile(
                b_dk, b_dv, b_k, b_v, b_seg_k, b_doc_k, o_n, p_q, p_do, p_lse, p_delta, p_seg, p_doc, p_dq_acc,
                o_bm, o_d, m_d, i_m, n_q, offset, stride_qn, stride_don, scale, scale_log2,
                D, BLOCK_M, RULE_BITS, HAS_DOCS, DQ_ATOMIC, DOT_PRECISION, INT32_OFFSETS, False,
            )
            if INDEX_AHEAD:
                i_m = i_next
        for i_t in range(0, n_partial):
            b_dk, b_dv = _dkv_tile(
                b_dk, b_dv, b_k, b_v, b_seg_k, b_doc_k, o_n, p_q, p_do, p_lse, p_delta, p_seg, p_doc, p_dq_acc,
                o_bm, o_d, m_d, tl.load(p_partial + i_t), n_q, offset, stride_qn, stride_don, scale, scale_log2,
                D, BLOCK_M, RULE_BITS, HAS_DOCS, DQ_ATOMIC, DOT_PRECISION, INT32_OFFSETS, True,
            )

    i_b, i_n, i_hs = program_row(row_order, num_k_blocks, HKV * SPLIT, LONGEST_FIRST, AGAIN=True)
    i_kvh, i_s = i_hs // SPLIT, i_hs % SPLIT
    i_b64 = i_b.to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_nd = (o_n < n_k)[:, None] & m_d[None, :]
    i_out = (i_kvh * SPLIT + i_s).to(tl.int64)
    p_dk = dk + i_b64 * stride_dkb + i_out * stride_dkh
    p_dv = dv + i_b64 * stride_dvb + i_out * stride_dvh
    tl.store(row_block(p_dk, i_n * BLOCK_N, stride_dkn, tl.arange(0, BLOCK_N), o_d), (b_dk * scale).to(dk.dtype.element_ty),
             mask=m_nd)
    tl.store(row_block(p_dv, i_n * BLOCK_N, stride_dvn, tl.arange(0, BLOCK_N), o_d), b_dv.to(dv.dtype.element_ty), mask=m_nd)


def segment_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    layout: SegmentLayout,
    rule: AttentionRule,
    scale: float,
    config: KernelConfig,
):
    """Gradients (dq, dk, dv) shaped like (q, k, v)."""
    batch, hq, n_q, head_dim = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    if n_q == 0:
        # No query reaches a key. The dK/dV grid would still hold a program per key block, with
        # no tile index in its row to read (its read-ahead of the first index has nothing to read).
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    do, q, k, v, o = (t if t.stride(-1) == 1 else t.contiguous() for t in (do, q, k, v, o))
    block_d = head_dim_block(head_dim)
    doc = layout.doc_ids if layout.has_docs else layout.segment_ids

    # dQ added by the dK/dV kernel with atomics (one kernel fewer, no recomputed scores).
    dq_atomic = dq_atomic_on(config)
    lse = aligned_row_stats(lse)
    delta = alloc_row_stats(_alloc, batch, hq, n_q, q.device)
    # An fp32 accumulator, zeroed by the preprocess; otherwise any tensor stands in for it.
    dq_acc = _alloc((batch, hq, n_q, head_dim), dtype=torch.float32, device=q.device) if dq_atomic else delta
    preprocess_m = PREPROCESS_ELEMENTS // block_d
    segment_attention_bwd_kernel_preprocess[(batch * hq, triton.cdiv(n_q, preprocess_m))](
        o, do, delta, dq_acc,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        delta.stride(1),
        n_q, HQ=hq, D=head_dim, BLOCK_D=block_d, BLOCK_M=preprocess_m, DQ_ATOMIC=dq_atomic,
        **config.launch_options(PREPROCESS_WARPS),
    )

    dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc(v.shape, dtype=v.dtype, device=v.device)
    common = dict(
        HQ=hq, GROUP=hq // hkv, D=head_dim, BLOCK_D=block_d,
        RULE_BITS=rule.bits, HAS_DOCS=layout.has_docs, LONGEST_FIRST=config.longest_first,
        **config.launch_options(config.bwd_warps),
    )

    bm, bn = config.dkv_block_m, config.dkv_block_n
    schedule = layout.schedule(rule, bm, bn, n_q, by_key=True)
    num_k_blocks, num_q_blocks = schedule.full_index.shape[1:]
    split = dkv_split(config, num_k_blocks * batch * hkv, hq // hkv, q.device)
    if split > 1:
        # Each part's partial sums in fp32, added in a fixed order below: deterministic, no atomics.
        dk_parts = _alloc((batch, hkv * split, n_k, head_dim), dtype=torch.float32, device=k.device)
        dv_parts = _alloc((batch, hkv * split, n_k, head_dim), dtype=torch.float32, device=v.device)
    else:
        dk_parts, dv_parts = dk, dv
    segment_attention_bwd_kernel_dkv[(batch * num_k_blocks * hkv * split,)](
        q, k, v, do, lse, delta, dk_parts, dv_parts, layout.segment_ids, doc, dq_acc,
        schedule.full_count, schedule.full_index, schedule.partial_count, schedule.partial_index, schedule.order,
        scale, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk_parts.stride(0), dk_parts.stride(1), dk_parts.stride(2),
        dv_parts.stride(0), dv_parts.stride(1), dv_parts.stride(2),
        lse.stride(1),
        n_q, n_k, num_q_blocks, num_k_blocks,
        HKV=hkv, SPLIT=split, BLOCK_M=bm, BLOCK_N=bn, INDEX_AHEAD=config.dkv_index_ahead, DQ_ATOMIC=dq_atomic,
        **common,
    )
    if split > 1:
        dk.copy_(dk_parts.view(batch, hkv, split, n_k, head_dim).sum(2))
        dv.copy_(dv_parts.view(batch, hkv, split, n_k, head_dim).sum(2))

    if dq_atomic:
        dq.copy_(dq_acc)
        return dq, dk, dv

    bm, bn = config.dq_block_m, config.dq_block_n
    schedule = layout.schedule(rule, bm, bn, n_q)
    num_q_blocks, num_k_blocks = schedule.full_index.shape[1:]
    # dQ reads key ids as the forward does: rows padded to whole key tiles.
    dq_segment_ids, dq_doc_ids = key_id_rows(layout, bn)
    segment_attention_bwd_kernel_dq[(batch * num_q_blocks * hq,)](
        q, k, v, do, lse, delta, dq, dq_segment_ids, dq_doc_ids,
        schedule.full_count, schedule.full_index, schedule.partial_count, schedule.partial_index, schedule.order,
        scale, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        lse.stride(1), dq_segment_ids.stride(0),
        n_q, n_k, num_q_blocks, num_k_blocks,
        BLOCK_M=bm, BLOCK_N=bn, **common,
    )
    return dq, dk, dv
