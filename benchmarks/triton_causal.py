"""The yardstick as a timed method: plain causal flash attention in Triton, with livr's static tiles.

``livr_kernels/yardstick.py`` keeps a causal flash kernel written like livr's (same tiles, same
math, no segment mask, no tile list) so that ``compile_check`` can compare instruction counts.
Timed on a GPU beside ``livr_table`` (the same static tiles) it splits livr's distance to SDPA
``is_causal`` in two:

* ``livr_table / triton_causal``: what the segment mask and the tile lists cost on the GPU (the
  compile check bounds the full-tile loop's instructions at 1.05x / 1.10x; this is the time);
* ``triton_causal / sdpa_causal``: what Triton's code generation costs against the hand-written
  kernel behind SDPA, which no change to livr's mask handling can win back. In the backward this
  share also holds an algorithmic difference: livr and the yardstick compute dQ in a kernel of its
  own that recomputes the scores and probabilities (7 matrix products per tile, deterministic),
  where flash SDPA adds dQ with atomics inside the dK/dV pass (5 products).
"""
from __future__ import annotations

import torch

from livr_kernels.config import KernelConfig, default_config
from livr_kernels.yardstick import causal_bwd, causal_fwd


class CausalYardstick(torch.autograd.Function):
    """Causal attention through the yardstick kernels; K/V may have fewer heads than Q (GQA)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, config: KernelConfig):
        o, lse = causal_fwd(q, k, v, scale, config)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.config = scale, config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        batch, kv_heads, n, head_dim = k.shape
        group = q.shape[1] // kv_heads
        # The yardstick's backward has no GQA loop: K/V repeated to the query heads, dK/dV summed
        # back over each group (two copies the size of K and V, small beside the attention).
        k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dq, dk, dv = causal_bwd(do.contiguous(), q, k_rep, v_rep, o, lse, ctx.scale, ctx.config)
        dk = dk.view(batch, kv_heads, group, n, head_dim).sum(2)
        dv = dv.view(batch, kv_heads, group, n, head_dim).sum(2)
        return dq, dk, dv, None, None


def causal_yardstick(q, k, v, config: KernelConfig = None):
    """Causal attention of (B, H, N, D) tensors with the static table's tiles for this GPU."""
    if config is None:
        capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
        config = default_config(q.shape[-1], capability, q.dtype)
    return CausalYardstick.apply(q, k, v, q.shape[-1] ** -0.5, config)


def run_triton_causal(case, q, k, v):
    """A benchmark runner (``benchmarks/test_attention.py``'s signature): no LIVR mask."""
    return causal_yardstick(q, k, v)

