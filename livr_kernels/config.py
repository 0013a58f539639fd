"""Tile sizes and launch settings for the kernels, chosen by padded head dim."""
from __future__ import annotations

from dataclasses import dataclass, replace

import triton

MIN_HEAD_DIM_BLOCK = 16
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes of the three kernels. ``fwd_*`` and ``dq_*`` tile (queries, keys); ``dkv_*`` too."""

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    dkv_block_m: int = 32
    dkv_block_n: int = 128
    dq_block_m: int = 128
    dq_block_n: int = 32
    fwd_warps: int = 4
    bwd_warps: int = 4
    num_stages: int = 3

    def with_blocks(self, **sizes) -> "KernelConfig":
        return replace(self, **sizes)


# Per padded head dim. Register use grows with BLOCK_D: the backward holds K, V, dK and dV of
# a key block on chip, so large head dims get smaller tiles (checked for spills by compile_check).
_CONFIGS = {
    16: KernelConfig(fwd_warps=4, bwd_warps=4),
    32: KernelConfig(fwd_warps=4, bwd_warps=4),
    64: KernelConfig(fwd_warps=4, bwd_warps=4),
    128: KernelConfig(fwd_warps=8, bwd_warps=8),
    256: KernelConfig(
        fwd_block_m=64, fwd_block_n=32, dkv_block_m=16, dkv_block_n=64, dq_block_m=64, dq_block_n=16,
        fwd_warps=8, bwd_warps=8, num_stages=2,
    ),
}


def head_dim_block(head_dim: int) -> int:
    return max(MIN_HEAD_DIM_BLOCK, triton.next_power_of_2(head_dim))


def default_config(head_dim: int) -> KernelConfig:
    return _CONFIGS[head_dim_block(head_dim)]
