"""compile_check: cuobjdump parsing, spill and shared-memory detection, and one real sm_90 compile.

The real compile runs in a subprocess: pytest's conftest turns the Triton interpreter on, and
compiling needs the kernels decorated without it.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from livr_kernels import compile_check as cc
from livr_kernels.config import default_config
from livr_kernels.launch_capture import CAPTURE_SEQ_LEN

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
    # fp16 compiles to the same schedule as bf16: CI compiles bf16 only, --dtypes adds the others.
    assert cc.selection(quick=True) == [("bf16", 64), ("bf16", 128)]
    default = cc.selection()
    assert ("bf16", 256) in default and ("bf16", 80) in default and all(d == "bf16" for d, _ in default)
    both = cc.selection(dtypes=("fp16", "bf16"))
    assert ("fp16", 128) in both and ("fp16", 256) not in both
    assert len(cc.selection(full=True, dtypes=("fp32",))) == len(cc.FULL_HEAD_DIMS)


@pytest.mark.interpreter
def test_capture_refuses_the_interpreter():
    assert cc.interpreter_on()  # tests/conftest.py turns it on
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cc.capture_launches(90, "bf16", 64, False, "bottleneck")


# Runs without the interpreter: captures the sm_90 launches for D=64 fp16, compiles the forward as
# launched and once more with a register cap that forces spills, and records ptxas -v of that compile.
_SUBPROCESS = r"""
import contextlib, dataclasses, io, json, re, warnings
import torch
from triton import knobs
from livr_kernels import compile_check as cc
from livr_kernels.config import default_config

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
tma_config = dataclasses.replace(default_config(64, (9, 0), torch.float16), fwd_tma=True)
tma_fwd = next(l for l in cc.capture_launches(90, "fp16", 64, True, "bottleneck", config=tma_config) if l.kernel == "fwd")
tma = cc.compile_launch(tma_fwd, cc.Variant("fwd", 90, "fp16", 64, True, "bottleneck"))
atomic_dkv = next(l for l in cc.capture_launches(90, "fp16", 64, True, "bottleneck", changes={"dq_atomic": True})
                  if l.kernel == "bwd_dkv")
atomic = cc.compile_launch(atomic_dkv, cc.Variant("bwd_dkv", 90, "fp16", 64, True, "bottleneck", "dq_atomic"))
plain_dkv = cc.compile_launch(next(l for l in launches if l.kernel == "bwd_dkv"), cc.Variant("bwd_dkv", 90, "fp16", 64, False, "bottleneck"))
planned = [v.name for _, v in cc.plan([90], [("fp16", 64)], ["bottleneck"])]
yard = next(l for l in cc.capture_yardstick_launches(90, "fp16", 64) if l.kernel == "yardstick_fwd")
yardstick = cc.compile_launch(yard, cc.Variant(yard.kernel, 90, "fp16", 64, None, None))
dkv = next(l for l in launches if l.kernel == "bwd_dkv")
out = {
    "yardstick": dataclasses.asdict(yardstick),
    "yardstick_constexprs": {k: v for k, v in yard.constexprs.items() if k.startswith("BLOCK")},
    "rows": [dataclasses.asdict(r) for r in cc.yardstick_rows([plain, yardstick])],
    "kernels": [l.kernel for l in launches],
    "fwd_constexprs": {k: v for k, v in fwd.constexprs.items() if k.startswith("BLOCK")},
    "fwd_options": fwd.options,
    "dkv_constexprs": {k: v for k, v in dkv.constexprs.items() if k.startswith("BLOCK")},
    "dkv_lse_stride_attrs": dkv.attrs.get((list(dkv.signature).index("stride_lse"),), []),
    "plain": dataclasses.asdict(plain) | {"problems": plain.problems()},
    "spilled": dataclasses.asdict(spilled) | {"problems": spilled.problems()},
    "tma": dataclasses.asdict(tma) | {"problems": tma.problems(), "signature": tma_fwd.signature},
    "ptxas_log": log.getvalue(),
    "atomic": dataclasses.asdict(atomic) | {"problems": atomic.problems()},
    "plain_dkv": dataclasses.asdict(plain_dkv),
    "planned": planned,
}
print("RESULT" + json.dumps(out, default=str))
"""
# Far below the forward's 150-210 registers at D=64 (at 128, 3.6 fits it without a spill), but
# enough for ptxas to compile at all.
SPILL_MAXNREG = 96


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS % {"maxnreg": SPILL_MAXNREG}],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_yardstick_is_compiled_with_livr_tiles_and_livr_stays_within_its_limit(compiled):
    assert compiled["yardstick_constexprs"] == compiled["fwd_constexprs"]
    (row,) = [cc.YardstickRow(**r) for r in compiled["rows"]]
    assert row.kernel == "fwd" and row.step == compiled["fwd_constexprs"]["BLOCK_N"]
    # Each forward has a full-tile (or unmasked) loop and a masked one, both with wgmma.
    assert len(compiled["plain"]["loop_instructions"]) == 2 and len(compiled["yardstick"]["loop_instructions"]) == 2
    assert row.problems() == [], row.problems()
    # Three K/V buffers in both: the tile-index read one iteration ahead keeps every pipeline stage.
    assert row.livr_buffers == row.yardstick_buffers == compiled["fwd_options"]["num_stages"]
    # A tighter limit than the measured ratio fails.
    assert row.problems({"fwd": row.ratio * 0.99}) != []


def test_a_bloated_loop_fails_the_yardstick(compiled):
    """livr's masked loop (mask arithmetic, per-token id loads) stands in for a bloated full-tile loop."""
    (row,) = [cc.YardstickRow(**r) for r in compiled["rows"]]
    masked = compiled["plain"]["loop_instructions"][1]
    bloated = dataclasses.replace(row, livr_instructions=masked)
    assert masked > row.livr_instructions
    (problem,) = bloated.problems()
    assert "fwd sm_90 fp16 D=64" in problem and "limit 1.05x" in problem


def test_capture_uses_default_config(compiled):
    config = default_config(64, (9, 0))
    assert compiled["kernels"] == ["fwd", "bwd_preprocess", "bwd_dkv", "bwd_dq"]
    assert compiled["fwd_constexprs"] == {"BLOCK_D": 64, "BLOCK_M": config.fwd_block_m, "BLOCK_N": config.fwd_block_n}
    assert compiled["fwd_options"] == {"num_warps": config.fwd_warps, "num_stages": config.num_stages}
    assert compiled["dkv_constexprs"]["BLOCK_M"] == config.dkv_block_m
    assert compiled["dkv_constexprs"]["BLOCK_N"] == config.dkv_block_n


def test_dkv_reads_lse_rows_at_an_aligned_stride(compiled):
    """The capture's length (1000) is no multiple of 16, but the padded row stride of lse and delta
    is: the launch marks it divisible by 16, so dK/dV's loop copies lse and delta in vectors (Triton
    3.6 copied them one element at a time at a stride of n_q, 13-16% more SASS at D=64)."""
    assert CAPTURE_SEQ_LEN % 16 != 0
    assert ["tt.divisibility", 16] in [list(attr) for attr in compiled["dkv_lse_stride_attrs"]]


def test_real_sm90_forward_compiles_clean_with_wgmma(compiled):
    plain = compiled["plain"]
    assert plain["error"] is None
    assert SPILL_MAXNREG < plain["registers"] <= 255
    assert plain["stack"] == 0 and plain["local"] == 0 and plain["problems"] == []
    assert plain["mma"] == "wgmma" and plain["async_copies"]
    assert 0 < plain["shared"] <= cc.SHARED_LIMIT[90]


def test_tma_forward_compiles_clean_with_tensor_copies(compiled):
    """``fwd_tma`` hands K and V over as tensor descriptors and the sm_90 forward reads its tiles
    with the copy engine (bulk tensor copies in the PTX), without spills; the default does not."""
    tma, plain = compiled["tma"], compiled["plain"]
    assert tma["error"] is None and tma["problems"] == [], tma
    assert tma["tma_copies"] and not plain["tma_copies"]
    assert tma["signature"]["k"].startswith("tensordesc") and tma["signature"]["q"].startswith("*")
    assert tma["mma"] == "wgmma" and len(tma["loop_instructions"]) == 2


def test_atomic_dq_compiles_clean_with_global_atomic_adds(compiled):
    """``dq_atomic``: the sm_90 dK/dV adds dQ with fp32 atomics, without spills; the default does not."""
    atomic, plain = compiled["atomic"], compiled["plain_dkv"]
    assert atomic["error"] is None and atomic["problems"] == [], atomic
    # On sm_90, the lent GPU's, at D=64 with doc ids it fits in registers under both Triton releases
    # CI compiles with (D=80 does not under 3.9: compile_check lists it as spill*).
    assert atomic["stack"] == 0 and atomic["local"] == 0, atomic
    assert atomic["atomic_adds"] and not plain["atomic_adds"]
    assert atomic["mma"] == "wgmma" and len(atomic["loop_instructions"]) == 2


def test_plan_compiles_each_option_where_it_changes_a_kernel(compiled):
    """The option variants (``OPTION_VARIANTS``) add only the kernels they change, under their own name."""
    planned = compiled["planned"]
    assert planned.count("bwd_dkv+dq_atomic") == 2  # with and without doc ids
    assert planned.count("bwd_preprocess+dq_atomic") == 1  # it zeroes the accumulator
    assert not any(name in planned for name in ("fwd+dq_atomic", "bwd_dq+dq_atomic"))
    assert planned.count("fwd") == 2 and planned.count("bwd_dq") == 2


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


# Shaped like `cuobjdump -sass`: an outer loop (0x0040-0x0100) around two tile loops, one loop
# without a tensor-core instruction, and padding.
SASS_SAMPLE = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x0 */
        /*0040*/                   IMAD R2, R3, R4, RZ ;                  /* 0x0 */
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR20], RZ, !UPT ;  /* 0x0 */
        /*0060*/                   FFMA R5, R6, R7, R8 ;                  /* 0x0 */
        /*0070*/               @P1 BRA 0x50 ;                             /* 0x0 */
        /*0080*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;  /* 0x0 */
        /*0090*/                   NOP ;                                  /* 0x0 */
        /*00a0*/                   BRA.U !UP2, 0x80 ;                     /* 0x0 */
        /*00b0*/                   IADD3 R1, R1, 0x1, RZ ;                /* 0x0 */
        /*00c0*/               @P3 BRA 0xb0 ;                             /* 0x0 */
        /*0100*/               @P4 BRA 0x40 ;                             /* 0x0 */
        /*0110*/                   BRA 0x110;                             /* 0x0 */
"""


def test_sass_tile_loops_finds_innermost_tensor_core_loops():
    loops = cc.sass_tile_loops(SASS_SAMPLE)
    assert [(loop.start, loop.end, loop.instructions, loop.mma) for loop in loops] == [
        (0x50, 0x70, 3, 1),
        (0x80, 0xA0, 2, 1),  # the NOP is not counted
    ]


def test_pipeline_buffers_reads_multi_buffered_tiles():
    ttgir = """
    %a = ttg.local_alloc %q : (tensor<128x128xbf16, #blocked>) -> !ttg.memdesc<128x128xbf16, #shared, #smem>
    %4 = ttg.local_alloc : () -> !ttg.memdesc<1x1xi32, #shared1, #smem, mutable>
    %b_k = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared1, #smem, mutable>
    %b_v = ttg.local_alloc : () -> !ttg.memdesc<2x64x128xbf16, #shared, #smem, mutable>
    """
    assert cc.pipeline_buffers(ttgir) == [3, 2]


def test_yardstick_rows_pair_livr_with_the_yardstick_and_apply_limits():
    def report(kernel, loops, buffers, has_docs=False):
        r = _report()
        r.variant = cc.Variant(kernel, 90, "bf16", 128, has_docs, None if kernel.startswith("yard") else "bottleneck")
        r.tile, r.loop_instructions, r.buffers = "128x64", loops, buffers
        return r

    reports = [
        report("fwd", [376, 666], [3, 3]),
        report("fwd", [999, 999], [2, 2], has_docs=True),  # only the no-docs variant is compared
        report("yardstick_fwd", [364, 484], [3, 3]),
    ]
    (row,) = cc.yardstick_rows(reports)
    assert (row.livr_instructions, row.yardstick_instructions, row.step, row.livr_buffers) == (376, 364, 64, 3)
    assert row.problems() == []
    assert "1.033x" in row.problems({"fwd": 1.03})[0]
    table = cc.format_yardstick([row]).splitlines()
    assert table[1].split()[-1] == "ok" and "5.88" in table[1] and "5.69" in table[1]


@pytest.mark.interpreter
def test_yardstick_computes_causal_attention():
    """Under the interpreter: a yardstick that skipped work would make any loop look costly."""
    import torch
    from livr_kernels import KernelConfig
    from livr_kernels._interpreter import patch_interpreter
    from livr_kernels.yardstick import causal_bwd, causal_fwd

    patch_interpreter()
    config = KernelConfig(fwd_block_m=16, fwd_block_n=16, dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16)
    q, k, v, do = (torch.randn(1, 2, 64, 24) for _ in range(4))
    o, lse = causal_fwd(q, k, v, 24 ** -0.5, config)
    grads = causal_bwd(do, q, k, v, o, lse, 24 ** -0.5, config)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), do.double())
    for got, ref in zip((o,) + tuple(grads), (want,) + want_grads):
        assert (got.double() - ref).abs().max().item() < 1e-5


def test_blackwell_launches_carry_a_register_cap():
    """ptxas-blackwell spills at 80-128 registers unless given maxnreg (see config.py); others launch without."""
    import torch

    blackwell = default_config(128, (10, 0), torch.bfloat16).launch_options(8)
    assert blackwell == {"num_warps": 8, "num_stages": 3, "maxnreg": 255}
    assert "maxnreg" not in default_config(128, (9, 0), torch.bfloat16).launch_options(8)
    assert "maxnreg" not in default_config(128, (12, 0), torch.bfloat16).launch_options(8)
    # sm_120's ptxas stops at 128 registers at D=16 (8 B spilled in the forward) without the cap.
    for version in ((3, 6), (3, 9)):
        for block_d in (16, 32, 64):
            # Triton 3.6 spills dK/dV at D=64 with the cap (24-40 B), not without.
            capped = version == (3, 9) or block_d < 64
            assert default_config(block_d, (12, 0), torch.bfloat16, version=version).maxnreg == (255 if capped else 0)
            assert default_config(block_d, (8, 6), torch.bfloat16, version=version).maxnreg == 0


def test_both_stacks_are_held_to_the_yardstick():
    """`make compile-check-compat` (Triton 3.6, the GPU machine's) compares the SASS with the
    yardstick as `make compile-check` does (3.9): neither recipe skips it."""
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    recipes = {}
    for target in ("compile-check", "compile-check-compat"):
        match = re.search(rf"^{target}:[^\n]*\n((?:\t[^\n]*\n)+)", makefile, re.MULTILINE)
        assert match, f"no {target} recipe in the Makefile"
        recipes[target] = match.group(1)
    for target, recipe in recipes.items():
        assert "livr_kernels.compile_check" in recipe and "--no-yardstick" not in recipe, (target, recipe)


def test_an_option_variant_that_spills_is_listed_not_failed():
    """Autotuner candidates (``<kernel>+<option>``) are timed before use: their spill is a note."""
    option = cc.KernelReport(cc.Variant("bwd_dkv", 80, "bf16", 64, True, "bottleneck", "dq_atomic"), 8, 3, "32x128",
                             registers=255, stack=8, shared=1000)
    assert option.problems() == [] and "spills to local memory (8 B stack" in option.notes()[0]
    assert cc.format_table([option]).splitlines()[1].split()[-1] == "spill*"
    table = cc.KernelReport(cc.Variant("bwd_dkv", 80, "bf16", 64, True, "bottleneck"), 8, 3, "32x128",
                            registers=255, stack=8, shared=1000)
    assert table.notes() == [] and "spills" in table.problems()[0]
    too_big = dataclasses.replace(option, stack=0, shared=cc.SHARED_LIMIT[80] + 1)
    assert too_big.notes() == [] and "shared memory exceeds" in too_big.problems()[0]
