"""The methods ``gpu_report`` times beside ``benchmarks/test_attention.py``'s runners.

``livr_table`` (the static tile table), one-setting variants of it (``TABLE_VARIANTS``), the
yardstick kernel (``triton_causal``), and FlexAttention's FLASH backend and flash-attn where they
import. ``register_runners`` adds them to ``test_attention.RUNNERS``.
"""
from __future__ import annotations

import dataclasses
import os

import torch

import test_attention as bench
import triton_causal
from livr_kernels import autotune, segment_attention
from livr_kernels.config import default_config


def flex_flash_runner():
    """FlexAttention's FLASH backend (torch >= 2.9 with flash-attn's CuTe kernels), or None."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(case, q, k, v):
        block_mask = case.cached("block_mask", lambda: bench.build_block_mask(case))
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options={"BACKEND": "FLASH"})

    return run


def livr_table_runner(case, q, k, v):
    """livr with the static tile table (``LIVR_AUTOTUNE=0``), beside ``livr`` which autotunes."""
    previous = os.environ.get(autotune.ENV_VAR)
    os.environ[autotune.ENV_VAR] = "0"
    try:
        return bench.run_livr(case, q, k, v)
    finally:
        if previous is None:
            del os.environ[autotune.ENV_VAR]
        else:
            os.environ[autotune.ENV_VAR] = previous


def table_variant_runner(**change):
    """``livr_table`` with ``change`` applied to the static config: an A/B of one setting."""
    def run(case, q, k, v):
        config = default_config(q.shape[-1], torch.cuda.get_device_capability(q.device), q.dtype)
        return segment_attention(q, k, v, case.seg_layout, rule=bench.RULE, backend="triton",
                                 config=dataclasses.replace(config, **change))

    return run


# One setting of the static table changed, each timed against it: row blocks launched in row order,
# not longest first (benchmarks/dispatch_model.py models the difference); dK/dV on 64-query tiles,
# which the autotuner picked on the H100 but which spills a little (the static table keeps 32); the
# forward's K and V through the copy engine (TMA); dK/dV loading each tile index in the iteration
# that uses it (one Q/dO buffer fewer, as before 2026-11-25's third session); dQ added by dK/dV
# with atomics instead of a dQ kernel that recomputes scores (5 matrix products per tile, not 7).
TABLE_VARIANTS = {
    "livr_table_row_order": {"longest_first": False},
    "livr_table_dkv64": {"dkv_block_m": 64},
    "livr_table_tma": {"fwd_tma": True},
    "livr_table_dkv_in_place": {"dkv_index_ahead": False},
    "livr_table_dq_atomic": {"dq_atomic": True},
}


def flash_attn_runner():
    """flash-attn's causal kernel (no LIVR mask; a second floor), or None where it is absent."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None

    def run(case, q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)

    return run


def register_runners() -> None:
    """Add the report's own methods to the benchmark's runners (those that import here)."""
    extra = {"livr_table": livr_table_runner, **{name: table_variant_runner(**change) for name, change in TABLE_VARIANTS.items()},
             "triton_causal": triton_causal.run_triton_causal, "flex_flash": flex_flash_runner(),
             "flash_attn": flash_attn_runner()}
    for name, runner in extra.items():
        if runner is not None:
            bench.RUNNERS[name] = runner
