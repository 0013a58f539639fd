"""The static tile table's entries compiled as launched: no spill, full-tile loops within the SASS
yardstick, masked loops in proportion, under whichever Triton release runs the tests (CI runs this
file under 3.9 and 3.6). Each test names the table entry or kernel change it holds in place.

The compiles run in a subprocess, as in test_compile_check.py: the kernels must be decorated
without the Triton interpreter that pytest's conftest turns on.
"""
import json
import os
import subprocess
import sys

import pytest

from livr_kernels import compile_check as cc
from livr_kernels.config import default_config

_SUBPROCESS = r"""
import dataclasses, json, warnings
import torch
from livr_kernels import compile_check as cc
from livr_kernels.config import default_config, triton_version

warnings.filterwarnings("ignore")


# livr's launches of `kernels` (bf16, bottleneck rule), compiled for `arch`.
def livr(arch, head_dim, docs, kernels, config=None):
    return [cc.compile_launch(l, cc.Variant(l.kernel, arch, "bf16", head_dim, docs, "bottleneck"))
            for l in cc.capture_launches(arch, "bf16", head_dim, docs, "bottleneck", config=config) if l.kernel in kernels]


# The yardstick's twins of livr's `kernels`, compiled with the same tiles.
def yardstick(arch, head_dim, kernels, config=None):
    names = [cc.YARDSTICK_PREFIX + kernel for kernel in kernels]
    return [cc.compile_launch(l, cc.Variant(l.kernel, arch, "bf16", head_dim, None, None))
            for l in cc.capture_yardstick_launches(arch, "bf16", head_dim, config=config) if l.kernel in names]


BACKWARD = ("bwd_dkv", "bwd_dq")
in_place = dataclasses.replace(default_config(128, (10, 0), torch.bfloat16), dkv_index_ahead=False, num_stages=3)
in_place_reports = livr(100, 128, False, ["bwd_dkv"], in_place) + yardstick(100, 128, ["bwd_dkv"], in_place)
sm100_reports = livr(100, 80, False, ["bwd_dkv"]) + livr(100, 80, True, ["bwd_dkv"]) + yardstick(100, 80, ["bwd_dkv"])
# sm_120's D=16 backward (its own entry) against the yardstick.
sm120_d16 = livr(120, 16, False, BACKWARD) + yardstick(120, 16, BACKWARD)
# The masked loops that read key ids (forward, dQ) at the target shape, with doc ids.
masked_key_ids = livr(90, 128, True, ("fwd", "bwd_dq"))
# Forwards whose table entries changed with the padded key ids: sm_80 D=32 (register cap) and the
# Hopper D=64 128-key tile with doc ids (Triton 3.6 had its own 64-key entry).
table_fwd = livr(80, 32, False, ["fwd"]) + livr(90, 64, True, ["fwd"])
out = {
    "in_place_dkv_rows": [dataclasses.asdict(r) for r in cc.yardstick_rows(in_place_reports)],
    "sm100_dkv": [dataclasses.asdict(r) | {"problems": r.problems()} for r in sm100_reports[:2]],
    "sm100_dkv_rows": [dataclasses.asdict(r) for r in cc.yardstick_rows(sm100_reports)],
    "table_fwd": [dataclasses.asdict(r) | {"problems": r.problems()} for r in table_fwd],
    "sm120_d16_rows": [dataclasses.asdict(r) for r in cc.yardstick_rows(sm120_d16)],
    "masked_key_ids": [dataclasses.asdict(r) for r in masked_key_ids],
    "triton_version": list(triton_version()),
}
print("RESULT" + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_dkv_in_place_index_read_keeps_sm100_loop_short(compiled):
    """dK/dV's full-tile loop with the index read in place steps a pointer through the tile list (not
    p_full + i_t, whose 64-bit sign extension cost 6-7 SASS instructions per tile): on sm_100 at D=128
    it was 1.069x the yardstick under Triton 3.9 and 1.134x under 3.6; now 1.042x and 1.115x."""
    (row,) = [cc.YardstickRow(**r) for r in compiled["in_place_dkv_rows"]]
    assert row.kernel == "bwd_dkv" and row.tile == "32x64"
    assert row.ratio <= (1.05 if tuple(compiled["triton_version"]) >= (3, 7) else 1.12), row.ratio


def test_sm100_dkv_table_entry_reads_ahead_without_spilling(compiled):
    """sm_100's table reads dK/dV's next tile index ahead at D=80-128: with the row's tile lists
    re-read per query head it no longer spills (it did by 8 B at D=80 under Triton 3.6 and 16-32 B
    under 3.9 with the lists kept live), and the loop is within the yardstick under both releases
    (in place under 3.6 it was 1.136x, over the 1.10x limit)."""
    assert default_config(80, (10, 0)).dkv_index_ahead
    reports = compiled["sm100_dkv"]
    assert [r["variant"]["has_docs"] for r in reports] == [False, True]
    assert all(r["problems"] == [] and r["stack"] == 0 for r in reports), [r["problems"] for r in reports]
    (row,) = [cc.YardstickRow(**r) for r in compiled["sm100_dkv_rows"]]
    assert row.tile == "32x64" and row.ratio <= cc.YARDSTICK_LIMIT["bwd_dkv"], row.ratio


def test_forward_table_entries_compile_without_spills(compiled):
    """sm_80's D=32 forward spilled 8 B under Triton 3.9 at ptxas's own 128-register choice (its
    entry carries the 255 cap); the Hopper D=64 forward takes 128x128 tiles under Triton 3.6 too
    (it spilled 48 B with doc ids before the masked loop read padded key ids)."""
    sm80, sm90 = compiled["table_fwd"]
    assert (sm80["variant"]["arch"], sm80["variant"]["head_dim"]) == (80, 32)
    assert (sm90["variant"]["arch"], sm90["tile"]) == (90, "128x128")
    for report in (sm80, sm90):
        assert report["problems"] == [] and report["stack"] == 0, report["problems"]


def test_sm120_d16_backward_within_the_yardstick(compiled):
    """sm_120 at D=16 reads dK/dV's tile index in place and gives dQ 64-key tiles: read ahead and with
    32-key dQ tiles both loops were 1.10-1.13x the yardstick under Triton 3.6 and 3.9."""
    rows = [cc.YardstickRow(**r) for r in compiled["sm120_d16_rows"]]
    assert sorted(row.kernel for row in rows) == ["bwd_dkv", "bwd_dq"]
    for row in rows:
        assert row.problems() == [], row.problems()


# Masked over full tile loop, SASS per tile, sm_90 bf16 D=128 with doc ids: 3.3x (forward) and 3.6x
# (dQ) under Triton 3.6 while the key ids were read with a bounds mask (one predicated 4-byte copy
# per element), 2.3x with the padded ids; 1.9-2.1x under 3.9 either way.
MASKED_LOOP_LIMIT = 2.5


def test_masked_loops_read_key_ids_without_a_bounds_mask(compiled):
    reports = compiled["masked_key_ids"]
    assert sorted(r["variant"]["kernel"] for r in reports) == ["bwd_dq", "fwd"]
    for report in reports:
        full, masked = report["loop_instructions"][:2]
        assert masked <= MASKED_LOOP_LIMIT * full, (report["variant"]["kernel"], full, masked)


def test_config_follows_the_triton_release():
    """Triton 3.6 spills 8 B in some forwards that fit under 3.9: those get their own tiles, the rest is shared."""
    import torch
    from livr_kernels.config import triton_version

    # The Hopper forward at D<=64 takes 128-key tiles under both (3.6 spilled them with doc ids
    # until the masked loop read padded key ids).
    for block_d in (16, 32, 64):
        assert default_config(block_d, (9, 0), torch.float16, version=(3, 6)).fwd_block_n == 128
        assert default_config(block_d, (9, 0), torch.float16, version=(3, 6)) == default_config(
            block_d, (9, 0), torch.float16, version=(3, 9))
    assert default_config(256, (9, 0), torch.float16, version=(3, 6)) == default_config(256, (9, 0), torch.float16, version=(3, 9))
    assert default_config(128, (8, 0), torch.bfloat16, version=(3, 6)) == default_config(128, (8, 0), torch.bfloat16, version=(3, 9))
    assert default_config(64, (9, 0), torch.bfloat16) == default_config(64, (9, 0), torch.bfloat16, version=triton_version())
    # dK/dV's masked loop with doc ids spills under 3.6 with the index read ahead on the mma.sync GPUs
    # (D=32; sm_120 at D=64 too).
    for capability, block_d in (((8, 0), 32), ((8, 6), 32), ((8, 9), 32), ((12, 0), 32), ((12, 0), 64)):
        assert not default_config(block_d, capability, torch.bfloat16, version=(3, 6)).dkv_index_ahead
        assert default_config(block_d, capability, torch.bfloat16, version=(3, 9)).dkv_index_ahead
    assert default_config(64, (8, 0), torch.bfloat16, version=(3, 6)).dkv_index_ahead
