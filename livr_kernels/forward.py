"""Forward kernel: flash attention with the segment mask computed on the fly.

One program per (batch row, query block, query head), launched longest row first (see
``TileSchedule.order``). It walks its query block's two tile lists
from the ``TileSchedule`` (``blocks.py``): the full tiles without any mask arithmetic, then the
partial tiles with the mask computed from the per-token ids. Empty tiles are never visited.
Online softmax in fp32 with exp2; the log-sum-exp (base 2, +inf for rows with no allowed key) is
stored for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .blocks import SegmentLayout
from .config import KernelConfig, head_dim_block
from .segments import NUM_SEGMENTS, AttentionRule, Segment

LOG2E = 1.4426950408889634
INT32_LIMIT = 2 ** 31
PAD_KIND = tl.constexpr(int(Segment.PAD))
NUM_KINDS = tl.constexpr(NUM_SEGMENTS)

# Allocation hook: tests swap in a NaN-filled allocator to prove every output element is written.
_alloc = torch.empty

# lse and delta keep one row per (batch, query head), padded to a multiple of this many elements.
# Triton specialises an integer argument divisible by 16, so the padded row stride tells it that
# every row starts 64-byte aligned and dK/dV's pipelined copies of lse and delta are vectorised;
# rows packed n_q apart are copied one element at a time under Triton 3.6 (13-16% more SASS in
# dK/dV's D=64 tile loop, benchmarks/RESULTS.md).
ROW_STATS_ALIGN = 16


def row_stats_stride(n_q: int) -> int:
    """Elements between consecutive (batch, head) rows of lse and delta."""
    return triton.cdiv(n_q, ROW_STATS_ALIGN) * ROW_STATS_ALIGN


def alloc_row_stats(alloc, batch: int, heads: int, n_q: int, device) -> torch.Tensor:
    """A (batch, heads, n_q) fp32 view of rows ``row_stats_stride(n_q)`` elements apart."""
    return alloc((batch, heads, row_stats_stride(n_q)), dtype=torch.float32, device=device)[..., :n_q]


def aligned_row_stats(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when laid out as ``alloc_row_stats`` lays rows out, else such a copy (the
    kernels address row ``b * heads + h`` at ``row_stats_stride(n_q)`` elements per row)."""
    batch, heads, n_q = t.shape
    stride = row_stats_stride(n_q)
    if t.dtype == torch.float32 and t.stride() == (heads * stride, stride, 1):
        return t
    aligned = alloc_row_stats(torch.empty, batch, heads, n_q, t.device)
    aligned.copy_(t)
    return aligned


def key_id_rows(layout: SegmentLayout, block_n: int):
    """The (segment ids, document ids) arguments of a kernel that reads key ids a whole key tile at
    a time (the forward, dQ): rows padded to ``block_n`` multiples (``SegmentLayout.padded_ids``).
    Without document ids the segment ids stand in (HAS_DOCS is off, the kernel never reads them)."""
    segment_ids, doc_ids = layout.padded_ids(block_n)
    return segment_ids, segment_ids if doc_ids is None else doc_ids


def dot_precision(args) -> Optional[str]:
    """fp32 inputs get exact IEEE dots (TF32 would miss the fp32 tolerance); half types the default."""
    return "ieee" if args["q"].dtype == torch.float32 else None


@triton.jit
def head_dim_mask(o_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BD] in-range mask; a constant when D needs no padding, so the loads drop it entirely."""
    if BLOCK_D == D:
        m_d = tl.full([BLOCK_D], 1, tl.int1)
    else:
        m_d = o_d < D
    return m_d


@triton.jit
def program_row(row_order, num_blocks, PER_ROW: tl.constexpr, LONGEST_FIRST: tl.constexpr, AGAIN: tl.constexpr = False):
    """(batch row, block, part) of this program of a 1-D grid: PER_ROW consecutive programs (the
    heads) share a row block, and the rows come in ``row_order`` (longest first) or in row order.

    The epilogue calls it ``AGAIN`` rather than keep the prologue's values live across the tile
    loops: a program id is re-read for free, a loaded row id is not, and kept live it spilled the
    sm_80 forward at D=64 under Triton 3.6. The volatile load is what stops the two being merged.
    """
    i_rank, i_part = tl.program_id(0) // PER_ROW, tl.program_id(0) % PER_ROW
    if LONGEST_FIRST:
        i_row = tl.load(row_order + i_rank, volatile=AGAIN).to(tl.int32)
    else:
        i_row = i_rank
    return i_row // num_blocks, i_row % num_blocks, i_part


@triton.jit
def row_tiles(full_count, full_index, partial_count, partial_index, i_row, num_cols):
    """Schedule row ``i_row``'s tile lists (``TileSchedule``): (pointer to its full tiles, their
    count, pointer to its partial tiles, their count)."""
    p_full = full_index + i_row.to(tl.int64) * num_cols
    p_partial = partial_index + i_row.to(tl.int64) * num_cols
    return p_full, tl.load(full_count + i_row), p_partial, tl.load(partial_count + i_row)


@triton.jit
def row_block(p, i_0, stride, o_b, o_d):
    """[B, BD] pointers to rows ``i_0 + o_b`` (columns ``o_d``): the block's first row offset in int64
    (it passes 2**31 elements on long sequences), the offsets within the block in int32."""
    return p + i_0.to(tl.int64) * stride + (o_b[:, None] * stride + o_d[None, :])


@triton.jit
def tile_pointers(p_a, p_b, i_0, stride_a, stride_b, INT32_OFFSETS: tl.constexpr):
    """Pointers of two tensors at row ``i_0``, a tile's first row: an int32 multiply when every
    row offset fits (``INT32_OFFSETS``), a 64-bit one otherwise."""
    if INT32_OFFSETS:
        p_a_tile = p_a + i_0 * stride_a
        p_b_tile = p_b + i_0 * stride_b
    else:
        p_a_tile = p_a + i_0.to(tl.int64) * stride_a
        p_b_tile = p_b + i_0.to(tl.int64) * stride_b
    return p_a_tile, p_b_tile


@triton.jit
def segment_allowed(b_seg_q, b_pos_q, b_doc_q, b_seg_k, b_pos_k, b_doc_k, RULE_BITS: tl.constexpr, HAS_DOCS: tl.constexpr):
    """[BM, BN] boolean: query may attend key (causal, rule table with PAD rows/cols off, same doc)."""
    b_allow = ((RULE_BITS >> (b_seg_q[:, None] * NUM_KINDS + b_seg_k[None, :])) & 1) != 0
    b_allow = b_allow & (b_pos_k[None, :] <= b_pos_q[:, None])
    if HAS_DOCS:
        b_allow = b_allow & (b_doc_q[:, None] == b_doc_k[None, :])
    return b_allow


@triton.jit
def _fwd_tile_loads(
    p_k, p_v, o_bn, o_d, m_d, m_n, i_n0, stride_kn, stride_vn,
    INT32_OFFSETS: tl.constexpr, SHARED_KV_STRIDE: tl.constexpr, MASKED: tl.constexpr,
):
    """K^T [BD, BN] and V [BN, BD] of the tile at key ``i_n0``, through pointers."""
    # A scalar offset per tile plus in-tile offsets the compiler may rematerialise: kept live
    # across the loop they would cost 64 registers and spill the sm_80 forward at D=128. The
    # offset is int32 when every key position fits (one multiply instead of a 64-bit one), and
    # one offset serves K and V when their rows share a stride: one multiply and one widening
    # per tile instead of two, 8-9 of the 18-20 instructions the sm_120 loop spent over the
    # yardstick's at D=128 (benchmarks/RESULTS.md).
    if SHARED_KV_STRIDE:
        stride_vn = stride_kn
    p_k_tile, p_v_tile = tile_pointers(p_k, p_v, i_n0, stride_kn, stride_vn, INT32_OFFSETS)
    # [BD, BN], [BN, BD]
    o_k = o_bn[None, :] * stride_kn + o_d[:, None]
    o_v = o_bn[:, None] * stride_vn + o_d[None, :]
    if MASKED:
        b_k = tl.load(p_k_tile + o_k, mask=m_n[None, :] & m_d[:, None], other=0.0)
        b_v = tl.load(p_v_tile + o_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
    else:
        b_k = tl.load(p_k_tile + o_k, mask=m_d[:, None], other=0.0)
        b_v = tl.load(p_v_tile + o_v, mask=m_d[None, :], other=0.0)
    return b_k, b_v


@triton.jit
def _fwd_tile(
    b_acc, b_m, b_l, b_q, b_seg_q, b_pos_q, b_doc_q,
    p_k, p_v, p_seg, p_doc, o_bn, o_d, m_d, i_n, n_k,
    stride_kn, stride_vn, scale_log2, i_b, i_kvh,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RULE_BITS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INT32_OFFSETS: tl.constexpr,
    SHARED_KV_STRIDE: tl.constexpr,
    TMA: tl.constexpr,
    MASKED: tl.constexpr,
):
    i_n0 = i_n * BLOCK_N
    o_n = i_n0 + o_bn
    m_n = o_n < n_k
    if TMA:
        # ``p_k`` and ``p_v`` are (B, H, N, D) tensor descriptors: the copy engine fetches the tile
        # and fills keys past n_k and columns past D with zeros; no address or bounds arithmetic.
        # [BD, BN]
        b_k = tl.trans(p_k.load([i_b, i_kvh, i_n0, 0]).reshape(BLOCK_N, BLOCK_D))
        # [BN, BD]
        b_v = p_v.load([i_b, i_kvh, i_n0, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        b_k, b_v = _fwd_tile_loads(
            p_k, p_v, o_bn, o_d, m_d, m_n, i_n0, stride_kn, stride_vn, INT32_OFFSETS, SHARED_KV_STRIDE, MASKED)
    # [BM, BN] raw scores: the softmax scale goes into the exp2 argument below (one FMA per score).
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION)
    if MASKED:
        # The id rows are padded to whole key tiles (``SegmentLayout.padded_ids``): no bounds mask,
        # so the pipeliner copies two adjacent keys at a time. Under Triton 3.6 a masked load was
        # one predicated 4-byte copy per element of the replicated MMA slice layout (16 per thread
        # and id row at 64 keys): 255 registers and an 8 B spill on sm_120 at D=64 with doc ids.
        b_seg_k = tl.load(p_seg + o_n)
        b_doc_k = b_seg_k
        if HAS_DOCS:
            b_doc_k = tl.load(p_doc + o_n)
        b_allow = segment_allowed(b_seg_q, b_pos_q, b_doc_q, b_seg_k, o_n, b_doc_k, RULE_BITS, HAS_DOCS)
        b_s = tl.where(b_allow, b_s, float("-inf"))
    # The scale is positive, so the row max commutes with it.
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * scale_log2)
    if MASKED:
        # A row with nothing allowed so far keeps max -inf; shift by 0 instead to avoid inf - inf.
        b_m_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    else:
        b_m_shift = b_m_new
    b_p = tl.math.exp2(b_s * scale_log2 - b_m_shift[:, None])
    b_alpha = tl.math.exp2(b_m - b_m_shift)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_acc, b_m_new, b_l


def int32_key_offsets(args) -> bool:
    """Do key offsets (position x row stride) of K and V fit int32? Then tiles are addressed in int32."""
    return args["n_k"] * max(args["stride_kn"], args["stride_vn"], 1) < INT32_LIMIT


def shared_kv_stride(args) -> bool:
    """Are K's and V's rows the same number of elements apart (both contiguous (B, H, N, D), the
    usual case)? Then one tile offset addresses both."""
    return args["stride_kn"] == args["stride_vn"]


@triton.heuristics({
    "DOT_PRECISION": dot_precision, "INT32_OFFSETS": int32_key_offsets, "SHARED_KV_STRIDE": shared_kv_stride,
})
@triton.jit
def segment_attention_fwd_kernel(
    q, k, v, o, lse, seg, doc,
    full_count, full_index, partial_count, partial_index, row_order,
    scale_log2,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
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
    TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INT32_OFFSETS: tl.constexpr,
    SHARED_KV_STRIDE: tl.constexpr,
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
    b_pos_q = offset + o_m

    p_q = q + i_b64 * stride_qb + i_h.to(tl.int64) * stride_qh
    if TMA:
        p_k, p_v = k, v
    else:
        p_k = k + i_b64 * stride_kb + i_kvh.to(tl.int64) * stride_kh
        p_v = v + i_b64 * stride_vb + i_kvh.to(tl.int64) * stride_vh
    p_seg = seg + i_b64 * stride_ids
    p_doc = doc + i_b64 * stride_ids

    # [BM, BD]
    b_q = tl.load(row_block(p_q, i_m * BLOCK_M, stride_qn, tl.arange(0, BLOCK_M), o_d), mask=m_m[:, None] & m_d[None, :], other=0.0)
    b_seg_q = tl.load(p_seg + b_pos_q, mask=m_m, other=PAD_KIND)
    b_doc_q = b_seg_q
    if HAS_DOCS:
        b_doc_q = tl.load(p_doc + b_pos_q, mask=m_m, other=-1)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_full, n_full, p_partial, n_partial = row_tiles(
        full_count, full_index, partial_count, partial_index, i_b * num_q_blocks + i_m, num_k_blocks)
    # Each loop reads the next tile's index one iteration ahead: K/V addresses then depend on a
    # value carried in from the previous iteration, not on a load in the same one, and the
    # software pipeliner keeps all its stages for K and V (3 buffers at num_stages=3, not 2).
    # The clamp keeps the read inside the row; the last one is never used.
    i_n = tl.load(p_full)
    for i_t in range(0, n_full):
        i_next = tl.load(p_full + tl.minimum(i_t + 1, num_k_blocks - 1))
        b_acc, b_m, b_l = _fwd_tile(
            b_acc, b_m, b_l, b_q, b_seg_q, b_pos_q, b_doc_q, p_k, p_v, p_seg, p_doc, o_bn, o_d, m_d,
            i_n, n_k, stride_kn, stride_vn, scale_log2, i_b, i_kvh,
            BLOCK_N, BLOCK_D, RULE_BITS, HAS_DOCS, DOT_PRECISION, INT32_OFFSETS, SHARED_KV_STRIDE, TMA, False,
        )
        i_n = i_next
    i_n = tl.load(p_partial)
    for i_t in range(0, n_partial):
        i_next = tl.load(p_partial + tl.minimum(i_t + 1, num_k_blocks - 1))
        b_acc, b_m, b_l = _fwd_tile(
            b_acc, b_m, b_l, b_q, b_seg_q, b_pos_q, b_doc_q, p_k, p_v, p_seg, p_doc, o_bn, o_d, m_d,
            i_n, n_k, stride_kn, stride_vn, scale_log2, i_b, i_kvh,
            BLOCK_N, BLOCK_D, RULE_BITS, HAS_DOCS, DOT_PRECISION, INT32_OFFSETS, SHARED_KV_STRIDE, TMA, True,
        )
        i_n = i_next

    i_b, i_m, i_h = program_row(row_order, num_q_blocks, HQ, LONGEST_FIRST, AGAIN=True)
    i_bh = i_b * HQ + i_h
    i_b64 = i_b.to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_q
    # Rows that saw no allowed key: output 0, log-sum-exp +inf so the backward gives them p = 0.
    m_empty = b_l == 0.0
    b_o = b_acc / tl.where(m_empty, 1.0, b_l)[:, None]
    b_lse = tl.where(m_empty, float("inf"), b_m + tl.math.log2(tl.where(m_empty, 1.0, b_l)))
    p_o = o + i_b64 * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(row_block(p_o, i_m * BLOCK_M, stride_on, tl.arange(0, BLOCK_M), o_d), b_o.to(o.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])
    tl.store(lse + i_bh.to(tl.int64) * stride_lse + o_m, b_lse, mask=m_m)


# The copy engine reads tiles at 16-byte aligned addresses with 16-byte aligned row strides.
TMA_ALIGNMENT = 16
TMA_MIN_CAPABILITY = (9, 0)


def tma_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int):
    """(B, H, N, D) tensor descriptors of K and V with [1, 1, block_n, block_d] tiles, or None when
    the copy engine cannot read them: a GPU before sm_90, an empty tensor (a descriptor's dimensions
    must be positive), a base or row stride that is not 16-byte aligned, or a broadcast dimension
    (stride 0, from ``expand``: a tensor map needs positive strides). On CPU (the interpreter,
    compile_check's capture) only the size, the strides and the alignment count."""
    if k.numel() == 0:
        return None
    if k.device.type == "cuda" and torch.cuda.get_device_capability(k.device) < TMA_MIN_CAPABILITY:
        return None
    for t in (k, v):
        size = t.element_size()
        strides = t.stride()[:-1]
        if t.data_ptr() % TMA_ALIGNMENT or any(stride * size % TMA_ALIGNMENT or stride <= 0 for stride in strides):
            return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    block = [1, 1, block_n, block_d]
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), block) for t in (k, v))


def segment_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SegmentLayout,
    rule: AttentionRule,
    scale: float,
    config: KernelConfig,
):
    """Launch the forward. Returns (o, lse) with lse (B, Hq, Nq) fp32 in base 2, its rows laid out by
    ``alloc_row_stats``."""
    if not scale >= 0:
        # The kernel takes the row max before scaling: only a non-negative scale commutes with it.
        raise ValueError(f"scale must be a non-negative number; got {scale}")
    batch, hq, n_q, head_dim = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    # The kernels address the head dim with unit stride; only copy views that break that.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bm, bn = config.fwd_block_m, config.fwd_block_n
    schedule = layout.schedule(rule, bm, bn, n_q)
    num_q_blocks, num_k_blocks = schedule.full_index.shape[1:]
    o = _alloc(q.shape, dtype=q.dtype, device=q.device)
    lse = alloc_row_stats(_alloc, batch, hq, n_q, q.device)
    segment_ids, doc = key_id_rows(layout, bn)
    block_d = head_dim_block(head_dim)
    descriptors = tma_descriptors(k, v, bn, block_d) if config.fwd_tma else None
    k_arg, v_arg = descriptors or (k, v)
    segment_attention_fwd_kernel[(batch * num_q_blocks * hq,)](
        q, k_arg, v_arg, o, lse, segment_ids, doc,
        schedule.full_count, schedule.full_index, schedule.partial_count, schedule.partial_index, schedule.order,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        lse.stride(1), segment_ids.stride(0),
        n_q, n_k, num_q_blocks, num_k_blocks,
        HQ=hq, GROUP=hq // hkv, D=head_dim, BLOCK_D=block_d,
        BLOCK_M=bm, BLOCK_N=bn, RULE_BITS=rule.bits, HAS_DOCS=layout.has_docs,
        LONGEST_FIRST=config.longest_first, TMA=descriptors is not None, **config.launch_options(config.fwd_warps),
    )
    return o, lse
