"""Recording what the host wrappers launch, for ahead-of-time compiles (``compile_check``).

The forward and backward host wrappers run on small CPU tensors with each kernel's ``run``
replaced by a recorder: the launch is not executed but kept in the form ``triton.compile`` takes
(signature, constexprs, divisibility attributes, options), exactly as a real launch would
specialise it. The plain causal yardstick kernels are recorded the same way.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

WARP_SIZE = 32
# The target setting. HQ and GROUP are constexprs, so the head counts are part of a variant.
TARGET_Q_HEADS = 16
TARGET_KV_HEADS = 2
# Length of the capture tensors. Not a multiple of 16, like most real lengths, so the length
# arguments get no divisibility hint (a multiple of 16 would compile a slightly different variant).
CAPTURE_SEQ_LEN = 1000
CAPTURE_DOCS = 3
# Short kernel name -> (module, attribute) of what the host wrappers launch.
KERNELS = {
    "fwd": ("livr_kernels.forward", "segment_attention_fwd_kernel"),
    "bwd_preprocess": ("livr_kernels.backward", "segment_attention_bwd_kernel_preprocess"),
    "bwd_dkv": ("livr_kernels.backward", "segment_attention_bwd_kernel_dkv"),
    "bwd_dq": ("livr_kernels.backward", "segment_attention_bwd_kernel_dq"),
}
# The plain causal kernels (livr_kernels/yardstick.py) that livr's main kernels are measured against.
YARDSTICK_KERNELS = {
    "fwd": ("livr_kernels.yardstick", "causal_fwd_kernel"),
    "bwd_dkv": ("livr_kernels.yardstick", "causal_bwd_dkv_kernel"),
    "bwd_dq": ("livr_kernels.yardstick", "causal_bwd_dq_kernel"),
}
YARDSTICK_PREFIX = "yardstick_"
ALL_KERNELS = {**KERNELS, **{YARDSTICK_PREFIX + name: where for name, where in YARDSTICK_KERNELS.items()}}
YARDSTICK_DTYPES = ("bf16", "fp16")
# The yardstick has no bounds masks: its length is a multiple of every block size.
YARDSTICK_SEQ_LEN = 1024

@dataclass
class KernelLaunch:
    """One intercepted kernel launch, in the form ``triton.compile`` takes it."""

    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, int]

    def key(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _jit_function(kernel: str):
    from triton.runtime.jit import JITFunction

    module, attr = ALL_KERNELS[kernel]
    fn = getattr(importlib.import_module(module), attr)
    # Heuristics / autotuner wrappers keep the JITFunction in ``.fn``.
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _capability(arch: int) -> Tuple[int, int]:
    return divmod(arch, 10)


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, WARP_SIZE)


def _recording(backend, launches: List["KernelLaunch"], kernels: Sequence[str]):
    """Context: each named kernel's launches are recorded (in launch form), not run."""
    from triton.runtime.jit import create_function_from_signature

    def recorder(kernel: str, fn):
        binder = create_function_from_signature(fn.signature, fn.params, backend)

        def run(*args, grid, warmup, **kwargs):
            # The same specialisation a real launch computes: types, divisibility by 16, ints equal to 1.
            bound, specialization, options = binder(*args, **kwargs)
            names = list(bound)
            signature = {name: spec[0] for name, spec in zip(names, specialization)}
            constexprs = {name: bound[name] for name, spec in zip(names, specialization) if spec[0] == "constexpr"}
            attrs = {
                (i,): backend.parse_attr(spec[1])
                for i, spec in enumerate(specialization)
                if spec[0] != "constexpr" and isinstance(spec[1], str)
            }
            launches.append(KernelLaunch(kernel, signature, constexprs, attrs, dict(options)))

        return run

    class Recording:
        def __enter__(self):
            self.patched = []
            for kernel in kernels:
                fn = _jit_function(kernel)
                fn.run = recorder(kernel, fn)
                self.patched.append(fn)

        def __exit__(self, *exc):
            for fn in self.patched:
                del fn.run

    return Recording()


def _capture_inputs(dtype: str, head_dim: int, n: int, kv_heads: int):
    import torch

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    shape_q = (1, TARGET_Q_HEADS, n, head_dim)
    shape_kv = (1, kv_heads, n, head_dim)
    q, do = torch.zeros(shape_q, dtype=torch_dtype), torch.zeros(shape_q, dtype=torch_dtype)
    k, v = torch.zeros(shape_kv, dtype=torch_dtype), torch.zeros(shape_kv, dtype=torch_dtype)
    return torch_dtype, q, k, v, do


def capture_launches(
    arch: int, dtype: str, head_dim: int, has_docs: bool, rule: str, config=None, changes=None
) -> List[KernelLaunch]:
    """Run the forward and backward host wrappers on CPU tensors, recording each kernel launch.

    ``config`` (a ``KernelConfig``) replaces ``default_config`` to try other tile sizes;
    ``changes`` (field -> value) are then applied to it, e.g. ``{"dq_atomic": True}``.
    """
    if interpreter_on():
        raise RuntimeError("capture_launches needs real JIT functions: unset TRITON_INTERPRET before importing livr_kernels")
    import torch
    from triton.compiler.compiler import make_backend

    from .backward import segment_attention_bwd
    from .blocks import SegmentLayout
    from .config import default_config
    from .forward import segment_attention_fwd
    from .segments import Segment, resolve_rule

    n = CAPTURE_SEQ_LEN
    seg = torch.full((1, n), int(Segment.TEXT), dtype=torch.int32)
    seg[:, n // 8: n // 2] = int(Segment.IMAGE)
    seg[:, n // 2 + n // 16: n // 2 + n // 8] = int(Segment.LATENT)
    seg[:, n - n // 16:] = int(Segment.ANSWER)
    doc = torch.arange(n, dtype=torch.int32)[None] * CAPTURE_DOCS // n if has_docs else None
    layout = SegmentLayout(seg, doc)
    torch_dtype, q, k, v, do = _capture_inputs(dtype, head_dim, n, TARGET_KV_HEADS)
    config = dataclasses.replace(config or default_config(head_dim, _capability(arch), torch_dtype), **(changes or {}))
    resolved = resolve_rule(rule)
    scale = head_dim ** -0.5
    launches: List[KernelLaunch] = []
    with _recording(make_backend(_target(arch)), launches, list(KERNELS)):
        # The launches are only recorded, so o and lse come back uninitialised: fine for the capture.
        o, lse = segment_attention_fwd(q, k, v, layout, resolved, scale, config)
        segment_attention_bwd(do, q, k, v, o, lse, layout, resolved, scale, config)
    return launches


def capture_yardstick_launches(arch: int, dtype: str, head_dim: int, config=None) -> List[KernelLaunch]:
    """The yardstick's launches with the tiles, warps and stages livr uses (``default_config``)."""
    if interpreter_on():
        raise RuntimeError("capture needs real JIT functions: unset TRITON_INTERPRET before importing livr_kernels")
    from triton.compiler.compiler import make_backend

    from .config import default_config
    from .yardstick import causal_bwd, causal_fwd

    torch_dtype, q, k, v, do = _capture_inputs(dtype, head_dim, YARDSTICK_SEQ_LEN, TARGET_KV_HEADS)
    config = config or default_config(head_dim, _capability(arch), torch_dtype)
    scale = head_dim ** -0.5
    launches: List[KernelLaunch] = []
    with _recording(make_backend(_target(arch)), launches, [YARDSTICK_PREFIX + name for name in YARDSTICK_KERNELS]):
        o, lse = causal_fwd(q, k, v, scale, config)
        # The yardstick backward has no GQA; one head group's K and V stand in (same tiles).
        causal_bwd(do, q, q, q, o, lse, scale, config)
    return launches
