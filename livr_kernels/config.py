"""Tile sizes and launch settings for the kernels, chosen by padded head dim and GPU generation."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import triton

MIN_HEAD_DIM_BLOCK = 16
MAX_HEAD_DIM = 256
HOPPER = (9, 0)
# Releases before this allocate registers differently: some forward tiles that fit under
# Triton 3.9 spill 8 B under 3.6 (compile_check under each release finds them).
NEW_REGISTER_ALLOCATION = (3, 7)


def triton_version() -> Tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes of the three kernels: each tiles (queries, keys)."""

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    dkv_block_m: int = 32
    dkv_block_n: int = 128
    dq_block_m: int = 128
    dq_block_n: int = 32
    fwd_warps: int = 4
    bwd_warps: int = 8
    num_stages: int = 3


# Register use grows with BLOCK_D: the dK/dV kernel keeps K, V, dK and dV of a key block on chip,
# so large head dims get smaller key blocks. Every entry compiles without spills
# (`python -m livr_kernels.compile_check` checks this in CI).
_HOPPER_CONFIGS = {
    16: KernelConfig(),
    32: KernelConfig(),
    64: KernelConfig(),
    128: KernelConfig(fwd_warps=8),
    256: KernelConfig(
        fwd_block_m=64, fwd_block_n=32, dkv_block_m=16, dkv_block_n=32, dq_block_m=64, dq_block_n=16,
        fwd_warps=8, num_stages=2,
    ),
}
# Ampere's mma.sync keeps accumulators in registers, not shared memory: smaller backward tiles.
_AMPERE_CONFIGS = {
    **_HOPPER_CONFIGS,
    128: KernelConfig(fwd_warps=8, dkv_block_n=64, dq_block_m=64),
}


# Triton 3.6 only, checked with its compile_check: the Ampere forward at D=80/128 (255 registers
# + 8 B stack at 128x64) gets 32-key tiles (200 registers); the Hopper forward at D=64 with doc ids
# (255 + 8 B at 4 warps) gets 8 warps (195 registers).
_OLD_TRITON_HOPPER_CONFIGS = {**_HOPPER_CONFIGS, 64: KernelConfig(fwd_warps=8)}
_OLD_TRITON_AMPERE_CONFIGS = {**_AMPERE_CONFIGS, 128: replace(_AMPERE_CONFIGS[128], fwd_block_n=32)}


# fp32 runs exact IEEE dots without tensor cores: every product sits in registers, so the
# half-precision tiles spill kilobytes per thread (and dQ at D=256 exceeds sm_80 shared memory).
# These small tiles compile without spills on sm_90; sm_80 keeps 8-16 B of stack in dQ at D=80
# and dK/dV at D=256 (compile_check --dtypes fp32 reports them).
_FP32_CONFIGS = {
    block_d: KernelConfig(
        fwd_block_m=32, fwd_block_n=16,
        dkv_block_m=16, dkv_block_n=16 if block_d == 256 else 64,
        dq_block_m=64 if block_d <= 64 else 32, dq_block_n=16,
        fwd_warps=8, bwd_warps=8, num_stages=2,
    )
    for block_d in (16, 32, 64, 128, 256)
}


def head_dim_block(head_dim: int) -> int:
    return max(MIN_HEAD_DIM_BLOCK, triton.next_power_of_2(head_dim))


def default_config(
    head_dim: int,
    capability: Optional[Tuple[int, int]] = None,
    dtype: Optional[torch.dtype] = None,
    version: Optional[Tuple[int, int]] = None,
) -> KernelConfig:
    """The launch settings for a head dim and dtype on a GPU of compute ``capability`` (Hopper by
    default), compiled by Triton ``version`` (the installed one by default)."""
    old = (version or triton_version()) < NEW_REGISTER_ALLOCATION
    if dtype == torch.float32:
        table = _FP32_CONFIGS
    elif (capability or HOPPER) >= HOPPER:
        table = _OLD_TRITON_HOPPER_CONFIGS if old else _HOPPER_CONFIGS
    else:
        table = _OLD_TRITON_AMPERE_CONFIGS if old else _AMPERE_CONFIGS
    return table[head_dim_block(head_dim)]
