"""Tile sizes and launch settings for the kernels, chosen by padded head dim and GPU generation."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
import triton

MIN_HEAD_DIM_BLOCK = 16
MAX_HEAD_DIM = 256
MAX_REGISTERS = 255
# Largest padded head dim the autotuner varies tiles for.
TUNED_MAX_HEAD_DIM = 128
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
    # Parts each GQA group's dK/dV is split into (0: chosen from the grid size and SM count).
    dkv_split: int = 0
    # Register cap handed to ptxas (0: its own choice). Blackwell's ptxas picks 80-128 registers
    # for some kernels and spills; an explicit cap of 255 lets it use what the others get.
    maxnreg: int = 0
    # Launch the rows with the most tiles first (``TileSchedule.order``); False launches them in
    # row order, to compare.
    longest_first: bool = True
    # dK/dV reads its next full tile's index one iteration ahead (a third Q/dO buffer on sm_90);
    # False where that spills.
    dkv_index_ahead: bool = True
    # Forward K and V tiles through the tensor memory accelerator (host tensor descriptors) where
    # the GPU has one (sm_90 and newer) and the tensors are 16-byte aligned; else pointer loads.
    # Off in the tables until a GPU has timed it; the autotuner tries it on Hopper.
    fwd_tma: bool = False
    # dK/dV also adds each tile's dQ to an fp32 buffer with atomics, and the dQ kernel (which
    # recomputes scores and probabilities: 7 matrix products per tile instead of 5) is skipped.
    # Not deterministic (the order of the atomic sums varies), so never under
    # torch.use_deterministic_algorithms(True); off in the tables until a GPU has timed it.
    dq_atomic: bool = False

    def launch_options(self, num_warps: int) -> dict:
        """Keyword arguments of a kernel launch with ``num_warps`` warps."""
        options = dict(num_warps=num_warps, num_stages=self.num_stages)
        if self.maxnreg:
            options["maxnreg"] = self.maxnreg
        return options


# Register use grows with BLOCK_D: the dK/dV kernel keeps K, V, dK and dV of a key block on chip,
# so large head dims get smaller key blocks. Every entry compiles without spills
# (`python -m livr_kernels.compile_check` checks this in CI, under the oldest and newest Triton).
_HOPPER_CONFIGS = {
    # 128-key forward tiles with 8 warps (206 registers at D=64; 4 warps spill 392 B); dK/dV and
    # dQ twice as wide as at D=128.
    **{block_d: KernelConfig(fwd_block_n=128, fwd_warps=8, dkv_block_m=64, dq_block_n=64) for block_d in (16, 32, 64)},
    # 128x64 forward tiles, the autotuner's pick on the H100 (2026-11-25). 128x128 now compiles
    # without a spill (255 registers, 24% fewer SASS instructions per key) but needs all 227 KiB of
    # shared memory with doc ids; the autotuner tries it. dQ takes 64-key tiles (254 registers).
    128: KernelConfig(fwd_warps=8, dq_block_n=64),
    # 64x64 forward tiles: 255 registers, no spill under 3.6 and 3.9, half the SASS per key of 64x32.
    # Two stages leave one Q/dO buffer, so dK/dV gains nothing from reading its index ahead.
    256: KernelConfig(
        fwd_block_m=64, fwd_block_n=64, dkv_block_m=16, dkv_block_n=32, dq_block_m=64, dq_block_n=16,
        fwd_warps=8, num_stages=2, dkv_index_ahead=False,
    ),
}
_D256_NARROW = replace(_HOPPER_CONFIGS[256], fwd_block_n=32)
# Ampere's mma.sync keeps accumulators in registers, not shared memory: 8 forward warps, 32-key
# forward tiles and smaller backward tiles at D=80/128 (128x64 spills 16-24 B with three K/V buffers).
_AMPERE_CONFIGS = {
    **{block_d: KernelConfig(fwd_warps=8) for block_d in (16, 64)},
    # Triton 3.9's ptxas stops the sm_80 forward at 128 registers here and spills 8 B (since the
    # masked loop reads padded key ids); with the 255 cap it takes 147-150, no spill.
    32: KernelConfig(fwd_warps=8, maxnreg=MAX_REGISTERS),
    128: KernelConfig(fwd_block_n=32, fwd_warps=8, dkv_block_n=64, dq_block_m=64),
    256: _D256_NARROW,
}
# sm_86 / sm_89 (and sm_120): 99 KiB of shared memory per block, Ampere-style mma.sync. Their
# ptxas fits the D=32 forward without sm_80's register cap (and its loop is shorter without it).
_SMALL_SHARED_CONFIGS = {**_AMPERE_CONFIGS, 32: KernelConfig(fwd_warps=8)}
# sm_120 takes the same tiles with the 255-register cap at D<=64: without it its ptxas stops at
# 128 registers at D=16 (the forward spills 8 B with doc ids) and dK/dV's loop is 1-3% longer
# (1.106x / 1.102x the yardstick at D=32 / 64 under Triton 3.9; 1.090x / 1.085x with the cap).
# At D=16 the per-tile index and address work weighs most: dK/dV reads its index in the iteration
# that uses it (one Q/dO buffer here either way; read ahead it was 1.128x / 1.105x the yardstick
# under Triton 3.6 / 3.9, in place 1.024x / 1.000x) and dQ takes 64-key tiles (1.124x / 1.104x at
# 32 keys, 1.071x / 1.027x at 64).
_CONSUMER_BLACKWELL_CONFIGS = {
    **_SMALL_SHARED_CONFIGS,
    **{block_d: replace(_SMALL_SHARED_CONFIGS[block_d], maxnreg=MAX_REGISTERS) for block_d in (32, 64)},
    16: replace(_SMALL_SHARED_CONFIGS[16], maxnreg=MAX_REGISTERS, dkv_index_ahead=False, dq_block_n=64),
}
# sm_100: tcgen05 MMA, 227 KiB of shared memory. The Hopper tiles spill here: the forward at
# D<=64 (104 B at 128x64 with 4 warps) and D=128 (24 B at 128x64), dK/dV at D=80/128 (160 B at
# 32x128, whose accumulators stay in registers because of the GQA loop around the tile loops).
# Without a register cap, ptxas-blackwell stops at 128 registers in the forward at D=128 (24 B
# spilled) and at 80 in the backward preprocess (8 B); with maxnreg=255: 160 and 81, no spill.
_BLACKWELL_CONFIGS = {
    **{block_d: KernelConfig(fwd_warps=8, maxnreg=MAX_REGISTERS) for block_d in (16, 32, 64)},
    128: KernelConfig(fwd_block_n=32, fwd_warps=8, dkv_block_n=64, maxnreg=MAX_REGISTERS),
    256: replace(_D256_NARROW, maxnreg=MAX_REGISTERS),
}

# Triton 3.6 only, where its register allocation spills a tile that fits under 3.9: dK/dV's
# masked loop with doc ids spills 8-24 B on the mma.sync GPUs at D=32 (sm_120 at D=64 too) unless
# the tile index is read in the iteration that uses it; at D=64 sm_120 also drops the register cap,
# with which 3.6's ptxas spills dK/dV 24-40 B. (The Hopper forward at D<=64 kept 64-key tiles here
# until its masked loop read padded key ids: 128x128 then spilled 48 B with doc ids, now 207
# registers and no spill.)
_OLD_TRITON_OVERRIDES = {
    "ampere": {32: replace(_AMPERE_CONFIGS[32], dkv_index_ahead=False)},
    "ampere_small_shared": {32: replace(_SMALL_SHARED_CONFIGS[32], dkv_index_ahead=False)},
    "blackwell_small_shared": {
        32: replace(_CONSUMER_BLACKWELL_CONFIGS[32], dkv_index_ahead=False),
        64: replace(_SMALL_SHARED_CONFIGS[64], dkv_index_ahead=False),
    },
}

GENERATIONS = {
    "ampere": _AMPERE_CONFIGS,
    "ampere_small_shared": _SMALL_SHARED_CONFIGS,
    "hopper": _HOPPER_CONFIGS,
    "blackwell": _BLACKWELL_CONFIGS,
    "blackwell_small_shared": _CONSUMER_BLACKWELL_CONFIGS,
}


def generation(capability: Tuple[int, int]) -> str:
    """The config table of a compute capability: sm_80/87 Ampere, sm_86/89 (99 KiB shared
    memory), sm_90 Hopper, sm_100/103 Blackwell, sm_120/121 consumer Blackwell (99 KiB)."""
    major, minor = capability
    if major >= 12:
        return "blackwell_small_shared"
    if major >= 10:
        return "blackwell"
    if major == 9:
        return "hopper"
    if (major, minor) in ((8, 6), (8, 9)):
        return "ampere_small_shared"
    return "ampere"


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


# dK/dV splits its GQA group across programs until the grid fills this many waves of SMs.
DKV_SPLIT_WAVES = 2


def dkv_split(config: KernelConfig, num_programs: int, group: int, device: torch.device) -> int:
    """Parts to split each GQA group's dK/dV into: the config's choice, or (0) the fewest that
    give at least DKV_SPLIT_WAVES programs per SM, halving the group until it fills the GPU.
    No split on CPU (the interpreter), where there are no SMs to fill."""
    if config.dkv_split:
        if group % config.dkv_split:
            raise ValueError(f"KernelConfig.dkv_split must divide the GQA group size {group}; got {config.dkv_split}")
        return config.dkv_split
    if device.type != "cuda":
        return 1
    return group_split(num_programs, group, torch.cuda.get_device_properties(device).multi_processor_count)


def group_split(num_programs: int, group: int, sm_count: int) -> int:
    split = 1
    while num_programs * split < DKV_SPLIT_WAVES * sm_count and group % (2 * split) == 0:
        split *= 2
    return split


def dq_atomic_on(config: KernelConfig) -> bool:
    """Does dK/dV add dQ with atomics (and the dQ kernel not run)? Not under
    torch.use_deterministic_algorithms(True): then the dQ kernel, whose sums have a fixed order."""
    return config.dq_atomic and not torch.are_deterministic_algorithms_enabled()


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
    block_d = head_dim_block(head_dim)
    if dtype == torch.float32:
        return _FP32_CONFIGS[block_d]
    name = generation(capability or HOPPER)
    if (version or triton_version()) < NEW_REGISTER_ALLOCATION:
        override = _OLD_TRITON_OVERRIDES.get(name, {}).get(block_d)
        if override is not None:
            return override
    return GENERATIONS[name][block_d]


def tuning_space(
    head_dim: int, capability: Optional[Tuple[int, int]] = None, dtype: Optional[torch.dtype] = None,
    deterministic: bool = False,
) -> List[KernelConfig]:
    """The configs the autotuner times for one (GPU generation, dtype, head dim): the static entry
    first, then one step away from it on each axis (key tile of the forward, warps, pipeline
    depth, dQ key tile, dK/dV query tile, launch order, dQ added with atomics unless
    ``deterministic``, and on Hopper the forward's TMA loads). fp32 and D=256 are not tuned (their
    tiles are at the register limit already)."""
    base = default_config(head_dim, capability, dtype)
    if dtype == torch.float32 or head_dim_block(head_dim) > TUNED_MAX_HEAD_DIM:
        return [base]
    large_shared = generation(capability or HOPPER) in ("hopper", "blackwell")
    steps = [
        replace(base, fwd_block_n=2 * base.fwd_block_n),
        replace(base, fwd_warps=12 - base.fwd_warps),
        replace(base, num_stages=base.num_stages + (1 if large_shared else -1)),
        replace(base, dq_block_n=2 * base.dq_block_n),
        replace(base, dkv_block_m=2 * base.dkv_block_m),
        replace(base, longest_first=not base.longest_first),
    ]
    if not deterministic:
        steps.append(replace(base, dq_atomic=True))
    if generation(capability or HOPPER) == "hopper":
        # Compiled, TMA saves registers on sm_90 (160 vs 191 at D=128) but costs Blackwell 4-29%
        # more loop instructions, so only Hopper tries it.
        steps.append(replace(base, fwd_tma=True))
    space = [base]
    for config in steps:
        if config not in space:
            space.append(config)
    return space
