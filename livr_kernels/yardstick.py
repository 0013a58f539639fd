"""A plain causal flash attention (forward and backward), kept as compile_check's yardstick.

Never used at run time (``make gpu-report`` also times it, ``benchmarks/triton_causal.py``). It computes the same tiles with the same math as livr's kernels, but
walks key (or query) blocks by advancing pointers instead of reading a tile list, and has no
segment mask: what its unmasked loop costs per key is what livr's FULL-tile loop should cost.
``compile_check`` compiles both with the same tiles, warps and stages and compares the SASS
instruction counts of those loops. The wrappers run under the interpreter too, so a test can
check that the yardstick computes causal attention (a yardstick that skipped work would flatter
nothing but itself).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig, head_dim_block
from .forward import LOG2E, dot_precision, head_dim_mask


@triton.jit
def _causal_fwd_tile(
    b_acc, b_m, b_l, b_q, o_m, p_k, p_v, o_k, o_v, o_bn, m_d, i_n, stride_kn, stride_vn, scale_log2,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    # The tile's keys start at i_n * BLOCK_N, computed from the loop counter instead of a tile list.
    i_n0 = tl.cast(i_n, tl.int64) * BLOCK_N
    # [BD, BN], [BN, BD]
    b_k = tl.load(p_k + i_n0 * stride_kn + o_k, mask=m_d[:, None], other=0.0)
    b_v = tl.load(p_v + i_n0 * stride_vn + o_v, mask=m_d[None, :], other=0.0)
    o_n = i_n * BLOCK_N + o_bn
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION)
    if MASKED:
        b_s = tl.where(o_n[None, :] <= o_m[:, None], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * scale_log2)
    b_p = tl.math.exp2(b_s * scale_log2 - b_m_new[:, None])
    b_alpha = tl.math.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_acc, b_m_new, b_l


@triton.heuristics({"DOT_PRECISION": dot_precision})
@triton.jit
def causal_fwd_kernel(
    q, k, v, o, lse, scale_log2,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    n,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """N must be a multiple of BLOCK_M and BLOCK_N (the yardstick needs no bounds masks)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_kvh = i_h // GROUP
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = head_dim_mask(o_d, D, BLOCK_D)
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = k + i_b.to(tl.int64) * stride_kb + i_kvh.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_kvh.to(tl.int64) * stride_vh
    o_k = o_bn[None, :] * stride_kn + o_d[:, None]
    o_v = o_bn[:, None] * stride_vn + o_d[None, :]
    b_q = tl.load(p_q + o_m[:, None] * stride_qn + o_d[None, :], mask=m_d[None, :], other=0.0)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key blocks wholly below the diagonal, then the ones it crosses.
    n_below = (i_m * BLOCK_M) // BLOCK_N
    n_all = tl.cdiv((i_m + 1) * BLOCK_M, BLOCK_N)
    for i_t in range(0, n_below):
        b_acc, b_m, b_l = _causal_fwd_tile(
            b_acc, b_m, b_l, b_q, o_m, p_k, p_v, o_k, o_v, o_bn, m_d, i_t, stride_kn, stride_vn, scale_log2,
            BLOCK_N, DOT_PRECISION, False,
        )
    for i_t in range(n_below, n_all):
        b_acc, b_m, b_l = _causal_fwd_tile(
            b_acc, b_m, b_l, b_q, o_m, p_k, p_v, o_k, o_v, o_bn, m_d, i_t, stride_kn, stride_vn, scale_log2,
            BLOCK_N, DOT_PRECISION, True,
        )

    p_o = o + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_o + o_m[:, None] * stride_on + o_d[None, :], (b_acc / b_l[:, None]).to(o.dtype.element_ty), mask=m_d[None, :])
    tl.store(lse + i_bh.to(tl.int64) * n + o_m, b_m + tl.math.log2(b_l))


@triton.jit
def _causal_dkv_tile(
    b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, o_q, p_lse, p_delta, o_bm, m_d, i_m, stride_qn, scale_log2,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    i_m0 = tl.cast(i_m, tl.int64) * BLOCK_M
    o_m = i_m * BLOCK_M + o_bm
    # [BM, BD]
    b_q = tl.load(p_q + i_m0 * stride_qn + o_q, mask=m_d[None, :], other=0.0)
    b_do = tl.load(p_do + i_m0 * stride_qn + o_q, mask=m_d[None, :], other=0.0)
    b_lse = tl.load(p_lse + o_m)
    b_delta = tl.load(p_delta + o_m)
    # [BN, BM]
    b_pt = tl.math.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * scale_log2 - b_lse[None, :])
    if MASKED:
        b_pt = tl.where(o_n[:, None] <= o_m[None, :], b_pt, 0.0)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    return b_dk, b_dv


@triton.heuristics({"DOT_PRECISION": dot_precision})
@triton.jit
def causal_bwd_dkv_kernel(
    q, k, v, do, lse, delta, dk, dv, scale, scale_log2,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block of one head (no GQA); q, do share strides, and k, v, dk, dv share theirs."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_bm = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = head_dim_mask(o_d, D, BLOCK_D)
    o_kv = i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh + o_n[:, None] * stride_kn + o_d[None, :]
    b_k = tl.load(k + o_kv, mask=m_d[None, :], other=0.0)
    b_v = tl.load(v + o_kv, mask=m_d[None, :], other=0.0)
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_do = do + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    o_q = o_bm[:, None] * stride_qn + o_d[None, :]
    p_lse = lse + i_bh.to(tl.int64) * n
    p_delta = delta + i_bh.to(tl.int64) * n

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query blocks wholly after the diagonal (unmasked, first, like livr's full tiles), then the ones it crosses.
    i_first = (i_n * BLOCK_N) // BLOCK_M
    i_after = tl.cdiv((i_n + 1) * BLOCK_N, BLOCK_M)
    for i_t in range(i_after, n // BLOCK_M):
        b_dk, b_dv = _causal_dkv_tile(
            b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, o_q, p_lse, p_delta, o_bm, m_d, i_t, stride_qn, scale_log2,
            BLOCK_M, DOT_PRECISION, False,
        )
    for i_t in range(i_first, i_after):
        b_dk, b_dv = _causal_dkv_tile(
            b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, o_q, p_lse, p_delta, o_bm, m_d, i_t, stride_qn, scale_log2,
            BLOCK_M, DOT_PRECISION, True,
        )
    tl.store(dk + o_kv, (b_dk * scale).to(dk.dtype.element_ty), mask=m_d[None, :])
    tl.store(dv + o_kv, b_dv.to(dv.dtype.element_ty), mask=m_d[None, :])


@triton.jit
def _causal_dq_tile(
    b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, o_kt, o_bn, m_d, i_n, stride_kn, scale_log2,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    i_n0 = tl.cast(i_n, tl.int64) * BLOCK_N
    o_n = i_n * BLOCK_N + o_bn
    # [BD, BN]
    b_kt = tl.load(p_k + i_n0 * stride_kn + o_kt, mask=m_d[:, None], other=0.0)
    b_vt = tl.load(p_v + i_n0 * stride_kn + o_kt, mask=m_d[:, None], other=0.0)
    b_p = tl.math.exp2(tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * scale_log2 - b_lse[:, None])
    b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
    if MASKED:
        b_p = tl.where(o_n[None, :] <= o_m[:, None], b_p, 0.0)
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=DOT_PRECISION)
    return b_dq


@triton.heuristics({"DOT_PRECISION": dot_precision})
@triton.jit
def causal_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, scale, scale_log2,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = head_dim_mask(o_d, D, BLOCK_D)
    o_q = i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + o_m[:, None] * stride_qn + o_d[None, :]
    b_q = tl.load(q + o_q, mask=m_d[None, :], other=0.0)
    b_do = tl.load(do + o_q, mask=m_d[None, :], other=0.0)
    b_lse = tl.load(lse + i_bh.to(tl.int64) * n + o_m)
    b_delta = tl.load(delta + i_bh.to(tl.int64) * n + o_m)
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    o_kt = o_bn[None, :] * stride_kn + o_d[:, None]

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_below = (i_m * BLOCK_M) // BLOCK_N
    n_all = tl.cdiv((i_m + 1) * BLOCK_M, BLOCK_N)
    for i_t in range(0, n_below):
        b_dq = _causal_dq_tile(
            b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, o_kt, o_bn, m_d, i_t, stride_kn, scale_log2,
            BLOCK_N, DOT_PRECISION, False,
        )
    for i_t in range(n_below, n_all):
        b_dq = _causal_dq_tile(
            b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, o_kt, o_bn, m_d, i_t, stride_kn, scale_log2,
            BLOCK_N, DOT_PRECISION, True,
        )
    tl.store(dq + o_q, (b_dq * scale).to(dq.dtype.element_ty), mask=m_d[None, :])


def _check(q: torch.Tensor, k: torch.Tensor, config: KernelConfig) -> None:
    n = q.shape[2]
    blocks = (config.fwd_block_m, config.fwd_block_n, config.dkv_block_m, config.dkv_block_n, config.dq_block_m, config.dq_block_n)
    if any(n % b for b in blocks) or q.shape[2] != k.shape[2]:
        raise ValueError(f"the yardstick needs Nq == Nk, a multiple of every block size {blocks}; got {q.shape[2]}, {k.shape[2]}")
    if not (q.is_contiguous() and k.is_contiguous()):
        raise ValueError("the yardstick takes contiguous (B, H, N, D) tensors")


def causal_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: KernelConfig):
    """(o, lse) of causal attention; lse in base 2, like livr's forward."""
    _check(q, k, config)
    batch, hq, n, head_dim = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((batch, hq, n), dtype=torch.float32, device=q.device)
    causal_fwd_kernel[(n // config.fwd_block_m, batch * hq)](
        q, k, v, o, lse, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        n, HQ=hq, GROUP=hq // k.shape[1], D=head_dim, BLOCK_D=head_dim_block(head_dim),
        BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n,
        **config.launch_options(config.fwd_warps),
    )
    return o, lse


def causal_bwd(do, q, k, v, o, lse, scale: float, config: KernelConfig):
    """(dq, dk, dv) for heads without grouping (Hq == Hkv); delta is computed in torch."""
    _check(q, k, config)
    if q.shape != k.shape:
        raise ValueError(f"the yardstick backward takes Hq == Hkv; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    batch, heads, n, head_dim = q.shape
    delta = (o.float() * do.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(
        HQ=heads, D=head_dim, BLOCK_D=head_dim_block(head_dim),
        **config.launch_options(config.bwd_warps),
    )
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    causal_bwd_dkv_kernel[(n // config.dkv_block_n, batch * heads)](
        q, k, v, do, lse, delta, dk, dv, scale, scale * LOG2E, *strides, n,
        BLOCK_M=config.dkv_block_m, BLOCK_N=config.dkv_block_n, **common,
    )
    causal_bwd_dq_kernel[(n // config.dq_block_m, batch * heads)](
        q, k, v, do, lse, delta, dq, scale, scale * LOG2E, *strides, n,
        BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, **common,
    )
    return dq, dk, dv
