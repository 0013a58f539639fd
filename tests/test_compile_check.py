"""compile_check: cuobjdump parsing, spill and shared-memory detection, and one real sm_90 compile.

The real compile runs in a subprocess: pytest's conftest turns the Triton interpreter on, and
compiling needs the kernels decorated without it.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from livr_kernels import compile_check as cc
from livr_kernels.config import default_config

# Shaped like `cuobjdump -res-usage` on a cubin built by triton.compile for sm_90.
CUOBJDUMP_SAMPLE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function segment_attention_fwd_kernel:
  REG:128 STACK:432 SHARED:1024 LOCAL:0 CONSTANT[0]:704 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function segment_attention_bwd_kernel_preprocess:
  REG:32 STACK:0 SHARED:0 LOCAL:16 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def _report(arch=90, registers=200, stack=0, local=0, shared=64 * cc.KIB, error=None):
    variant = cc.Variant("fwd", arch, "bf16", 128, False, "bottleneck")
    return cc.KernelReport(variant, num_warps=8, num_stages=3, tile="128x64", registers=registers, stack=stack,
                           local=local, shared=shared, mma="wgmma", error=error)


def test_parse_resource_usage_reads_every_function():
    usage = cc.parse_resource_usage(CUOBJDUMP_SAMPLE)
    assert usage == {
        "segment_attention_fwd_kernel": cc.ResourceUsage(registers=128, stack=432, static_shared=1024, local=0),
        "segment_attention_bwd_kernel_preprocess": cc.ResourceUsage(registers=32, stack=0, static_shared=0, local=16),
    }


def test_spills_in_stack_or_local_memory_are_problems():
    assert _report().problems() == []
    stack_spill = _report(stack=432).problems()
    assert len(stack_spill) == 1 and "spills" in stack_spill[0] and "432 B stack" in stack_spill[0]
    assert "spills" in _report(local=16).problems()[0]


@pytest.mark.parametrize("arch,limit_kib", [(80, 163), (90, 227)])
def test_shared_memory_limit_per_architecture(arch, limit_kib):
    assert _report(arch=arch, shared=limit_kib * cc.KIB).problems() == []
    over = _report(arch=arch, shared=limit_kib * cc.KIB + 1).problems()
    assert len(over) == 1 and f"{limit_kib} KiB" in over[0]


def test_compile_errors_are_problems_and_marked_in_the_table():
    broken = _report(error="PTXASError: Insufficient registers")
    assert "compile failed" in broken.problems()[0]
    table = cc.format_table([_report(), _report(stack=8), broken]).splitlines()
    assert len(table) == 4 and table[0].split()[0] == "kernel"
    assert sorted(line.split()[-1] for line in table[1:]) == ["ERROR", "FAIL", "ok"]
    markdown = cc.format_markdown([_report(), broken]).splitlines()
    assert len(markdown) == 4 and markdown[1].count("---") == len(cc.TABLE_COLUMNS)
    assert [line.split("|")[-2].strip() for line in markdown[2:]] == ["ok", "ERROR"]


def test_wgmma_summary_names_forwards_without_wgmma():
    fine, slow = _report(), _report()
    slow.mma = "mma.sync"
    assert "all 1 fp16/bf16 variants use wgmma" in cc.wgmma_summary([fine])[0]
    assert "bf16 D=128 (mma.sync)" in cc.wgmma_summary([fine, slow])[0]


def test_selection_defaults_and_options():
    assert cc.selection(quick=True) == [("fp16", 64), ("fp16", 128), ("bf16", 64), ("bf16", 128)]
    default = cc.selection()
    assert ("bf16", 256) in default and ("fp16", 256) not in default and all(d != "fp32" for d, _ in default)
    assert len(cc.selection(full=True, dtypes=("fp32",))) == len(cc.FULL_HEAD_DIMS)


def test_capture_refuses_the_interpreter():
    assert cc.interpreter_on()  # tests/conftest.py turns it on
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cc.capture_launches(90, "bf16", 64, False, "bottleneck")


# Runs without the interpreter: captures the sm_90 launches for D=64 fp16, compiles the forward as
# launched and once more with a register cap that forces spills, and records ptxas -v of that compile.
_SUBPROCESS = r"""
import contextlib, dataclasses, io, json, re, warnings
from triton import knobs
from livr_kernels import compile_check as cc

warnings.filterwarnings("ignore")
launches = cc.capture_launches(90, "fp16", 64, False, "bottleneck")
fwd = next(l for l in launches if l.kernel == "fwd")
variant = cc.Variant("fwd", 90, "fp16", 64, False, "bottleneck")
plain = cc.compile_launch(fwd, variant)
capped = dataclasses.replace(fwd, options={**fwd.options, "maxnreg": %(maxnreg)d})
log = io.StringIO()
with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    spilled = cc.compile_launch(capped, variant)
out = {
    "kernels": [l.kernel for l in launches],
    "fwd_constexprs": {k: v for k, v in fwd.constexprs.items() if k.startswith("BLOCK")},
    "fwd_options": fwd.options,
    "dkv_constexprs": {k: v for k, v in next(l for l in launches if l.kernel == "bwd_dkv").constexprs.items() if k.startswith("BLOCK")},
    "plain": dataclasses.asdict(plain) | {"problems": plain.problems()},
    "spilled": dataclasses.asdict(spilled) | {"problems": spilled.problems()},
    "ptxas_log": log.getvalue(),
}
print("RESULT" + json.dumps(out, default=str))
"""
# Far below the forward's ~230 registers at D=64, but enough for ptxas to compile at all.
SPILL_MAXNREG = 128


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS % {"maxnreg": SPILL_MAXNREG}],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_capture_uses_default_config(compiled):
    config = default_config(64, (9, 0))
    assert compiled["kernels"] == ["fwd", "bwd_preprocess", "bwd_dkv", "bwd_dq"]
    assert compiled["fwd_constexprs"] == {"BLOCK_D": 64, "BLOCK_M": config.fwd_block_m, "BLOCK_N": config.fwd_block_n}
    assert compiled["fwd_options"] == {"num_warps": config.fwd_warps, "num_stages": config.num_stages}
    assert compiled["dkv_constexprs"]["BLOCK_M"] == config.dkv_block_m
    assert compiled["dkv_constexprs"]["BLOCK_N"] == config.dkv_block_n


def test_real_sm90_forward_compiles_clean_with_wgmma(compiled):
    plain = compiled["plain"]
    assert plain["error"] is None
    assert SPILL_MAXNREG < plain["registers"] <= 255
    assert plain["stack"] == 0 and plain["local"] == 0 and plain["problems"] == []
    assert plain["mma"] == "wgmma" and plain["async_copies"]
    assert 0 < plain["shared"] <= cc.SHARED_LIMIT[90]


def test_spill_is_detected_and_matches_ptxas(compiled):
    spilled, log = compiled["spilled"], compiled["ptxas_log"]
    used = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    assert used and frame, log
    # cuobjdump reads the same numbers off the cubin that ptxas printed while building it.
    assert spilled["registers"] == int(used.group(1)) <= SPILL_MAXNREG
    assert spilled["stack"] == int(frame.group(1)) > 0
    assert int(frame.group(2)) > 0
    assert any("spills" in p for p in spilled["problems"])


def test_config_follows_the_triton_release():
    """Triton 3.6 spills 8 B in some forwards that fit under 3.9: those get their own tiles, the rest is shared."""
    import torch
    from livr_kernels.config import triton_version

    ampere_old = default_config(128, (8, 0), torch.bfloat16, version=(3, 6))
    ampere_new = default_config(128, (8, 0), torch.bfloat16, version=(3, 9))
    assert ampere_old.fwd_block_n < ampere_new.fwd_block_n
    assert default_config(64, (9, 0), torch.float16, version=(3, 6)).fwd_warps == 8
    assert default_config(256, (9, 0), torch.float16, version=(3, 6)) == default_config(256, (9, 0), torch.float16, version=(3, 9))
    assert default_config(128, (8, 0), torch.bfloat16) == default_config(128, (8, 0), torch.bfloat16, version=triton_version())
