"""dQ backward kernel: one program per query block and query head, walking the row's key tiles
from a ``TileSchedule`` as the forward does (full tiles without mask arithmetic, then partial ones).
"""
import triton
import triton.language as tl

from .forward import (
    PAD_KIND, dot_precision, head_dim_mask, int32_key_offsets, program_row, row_block, row_tiles,
    segment_allowed, tile_pointers,
)


@triton.jit
def _dq_tile(
    b_dq, b_q, b_do, b_lse, b_delta, b_seg_q, b_pos_q, b_doc_q,
    p_k, p_v, p_seg, p_doc, o_kt, o_vt, o_bn, m_d, i_n, n_k,
    stride_kn, stride_vn, scale_log2,
    BLOCK_N: tl.constexpr,
    RULE_BITS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INT32_OFFSETS: tl.constexpr,
    MASKED: tl.constexpr,
):
    i_n0 = i_n * BLOCK_N
    o_n = i_n0 + o_bn
    p_k_tile, p_v_tile = tile_pointers(p_k, p_v, i_n0, stride_kn, stride_vn, INT32_OFFSETS)
    if MASKED:
        m_n = o_n < n_k
        # [BD, BN]
        b_kt = tl.load(p_k_tile + o_kt, mask=m_n[None, :] & m_d[:, None], other=0.0)
        b_vt = tl.load(p_v_tile + o_vt, mask=m_n[None, :] & m_d[:, None], other=0.0)
    else:
        b_kt = tl.load(p_k_tile + o_kt, mask=m_d[:, None], other=0.0)
        b_vt = tl.load(p_v_tile + o_vt, mask=m_d[:, None], other=0.0)
    # [BM, BN]
    b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * scale_log2
    b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
    b_p = tl.math.exp2(b_s - b_lse[:, None])
    if MASKED:
        # Key ids from rows padded to whole key tiles, as the forward reads them: no bounds mask
        # (under Triton 3.6 a masked load was one predicated 4-byte copy per element; this loop
        # is 38% shorter on sm_90 at D=64-128 without it).
        b_seg_k = tl.load(p_seg + o_n)
        b_doc_k = b_seg_k
        if HAS_DOCS:
            b_doc_k = tl.load(p_doc + o_n)
        b_allow = segment_allowed(b_seg_q, b_pos_q, b_doc_q, b_seg_k, o_n, b_doc_k, RULE_BITS, HAS_DOCS)
        b_p = tl.where(b_allow, b_p, 0.0)
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=DOT_PRECISION)
    return b_dq


@triton.heuristics({"DOT_PRECISION": dot_precision, "INT32_OFFSETS": int32_key_offsets})
@triton.jit
def segment_attention_bwd_kernel_dq(
    q, k, v, do, lse, delta, dq, seg, doc,
    full_count, full_index, partial_count, partial_index, row_order,
    scale, scale_log2,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_lse, stride_ids,
    n_q, n_k, num_q_blocks, num_k_blocks,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RULE_BITS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    LONGEST_FIRST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INT32_OFFSETS: tl.constexpr,
):
    i_b, i_m, i_h = program_row(row_order, num_q_blocks, HQ, LONGEST_FIRST)
    i_bh = i_b * HQ + i_h
    i_kvh = i_h // GROUP
    i_b64 = i_b.to(tl.int64)
    offset = n_k - n_q

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < n_q
    m_d = head_dim_mask(o_d, D, BLOCK_D)
    m_md = m_m[:, None] & m_d[None, :]
    b_pos_q = offset + o_m
    # [BD, BN] offsets inside one key tile.
    o_kt = o_bn[None, :] * stride_kn + o_d[:, None]
    o_vt = o_bn[None, :] * stride_vn + o_d[:, None]

    p_q = q + i_b64 * stride_qb + i_h.to(tl.int64) * stride_qh
    p_do = do + i_b64 * stride_dob + i_h.to(tl.int64) * stride_doh
    p_k = k + i_b64 * stride_kb + i_kvh.to(tl.int64) * stride_kh
    p_v = v + i_b64 * stride_vb + i_kvh.to(tl.int64) * stride_vh
    p_seg = seg + i_b64 * stride_ids
    p_doc = doc + i_b64 * stride_ids
    # [BM, BD]
    b_q = tl.load(row_block(p_q, i_m * BLOCK_M, stride_qn, tl.arange(0, BLOCK_M), o_d), mask=m_md, other=0.0)
    b_do = tl.load(row_block(p_do, i_m * BLOCK_M, stride_don, tl.arange(0, BLOCK_M), o_d), mask=m_md, other=0.0)
    b_lse = tl.load(lse + i_bh.to(tl.int64) * stride_lse + o_m, mask=m_m, other=float("inf"))
    b_delta = tl.load(delta + i_bh.to(tl.int64) * stride_lse + o_m, mask=m_m, other=0.0)
    b_seg_q = tl.load(p_seg + b_pos_q, mask=m_m, other=PAD_KIND)
    b_doc_q = b_seg_q
    if HAS_DOCS:
        b_doc_q = tl.load(p_doc + b_pos_q, mask=m_m, other=-1)

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_full, n_full, p_partial, n_partial = row_tiles(
        full_count, full_index, partial_count, partial_index, i_b * num_q_blocks + i_m, num_k_blocks)
    # Tile indices read one iteration ahead, as in the forward.
    i_n = tl.load(p_full)
    for i_t in range(0, n_full):
        i_next = tl.load(p_full + tl.minimum(i_t + 1, num_k_blocks - 1))
        b_dq = _dq_tile(
            b_dq, b_q, b_do, b_lse, b_delta, b_seg_q, b_pos_q, b_doc_q, p_k, p_v, p_seg, p_doc,
            o_kt, o_vt, o_bn, m_d, i_n, n_k, stride_kn, stride_vn, scale_log2,
            BLOCK_N, RULE_BITS, HAS_DOCS, DOT_PRECISION, INT32_OFFSETS, False,
        )
        i_n = i_next
    i_n = tl.load(p_partial)
    for i_t in range(0, n_partial):
        i_next = tl.load(p_partial + tl.minimum(i_t + 1, num_k_blocks - 1))
        b_dq = _dq_tile(
            b_dq, b_q, b_do, b_lse, b_delta, b_seg_q, b_pos_q, b_doc_q, p_k, p_v, p_seg, p_doc,
            o_kt, o_vt, o_bn, m_d, i_n, n_k, stride_kn, stride_vn, scale_log2,
            BLOCK_N, RULE_BITS, HAS_DOCS, DOT_PRECISION, INT32_OFFSETS, True,
        )
        i_n = i_next
    i_b, i_m, i_h = program_row(row_order, num_q_blocks, HQ, LONGEST_FIRST, AGAIN=True)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_md = (o_m < n_q)[:, None] & m_d[None, :]
    p_dq = dq + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    tl.store(row_block(p_dq, i_m * BLOCK_M, stride_dqn, tl.arange(0, BLOCK_M), o_d), (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_md)
