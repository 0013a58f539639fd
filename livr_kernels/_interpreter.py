"""Fixes for the Triton interpreter (CPU), applied before the kernels run under ``TRITON_INTERPRET=1``.

* ``tl.dot`` on bfloat16 (Triton 3.9): the interpreter keeps bf16 tensors as raw uint16 bits
  and multiplies those bits as integers, which returns garbage silently. bf16 operands are widened
  to fp32 first: exact, since a bf16 is the top half of an fp32.
* fp32 -> bf16 casts (Triton 3.6-3.9): the interpreter truncates the mantissa where the GPU rounds
  to nearest even, so bf16 results lean toward zero; the cast is replaced by the GPU's rounding.
* ``range(0, n)`` with a loaded scalar ``n`` (Triton 3.6): the interpreter holds every scalar as
  a 1-element array and its ``tensor.__index__`` calls ``int()`` on it, which NumPy 2.4 refuses
  ("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.9 squeezes the array
  first; the same squeeze is installed on releases that lack it. No kernel-side spelling avoids
  this: loads, arithmetic and reductions all yield 1-element arrays there, and a ``while`` loop
  would cost the compiled kernels their software pipelining.

Real GPU compilation is untouched.
"""
from __future__ import annotations

import numpy as np
import triton.language as tl

_patched = False


def _bf16_to_fp32(handle):
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = handle.data.astype(np.uint32) << np.uint32(16)
    return TensorHandle(bits.view(np.float32), tl.float32)


BF16_SHIFT = 16
BF16_HALF_ULP = 0x7FFF
BF16_QUIET_BIT = 0x40


def fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns of fp32 ``values``, rounded to nearest even as the GPU does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (BF16_HALF_ULP + ((bits >> BF16_SHIFT) & 1))) >> BF16_SHIFT
    nan = np.isnan(values)
    rounded = np.where(nan, (bits >> BF16_SHIFT) | BF16_QUIET_BIT, rounded)
    return rounded.astype(np.uint16)


def _patch_bf16_cast(interpreter) -> None:
    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(fp32_to_bf16_bits(src.data), dst_type.scalar)
        return original(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def _scalar_index(tensor) -> int:
    return int(np.asarray(tensor.handle.data).reshape(()))


def _patch_dot(interpreter) -> None:
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _bf16_to_fp32(a), _bf16_to_fp32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _patch_scalar_index(interpreter) -> None:
    """Wrap the per-launch patch of ``tl.tensor`` so loop bounds read 1-element arrays as scalars."""
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)

    interpreter._patch_lang_tensor = patch_lang_tensor


def patch_interpreter() -> None:
    """Install the fixes once per process (idempotent)."""
    global _patched
    if _patched:
        return
    from triton.runtime import interpreter

    _patch_dot(interpreter)
    _patch_bf16_cast(interpreter)
    _patch_scalar_index(interpreter)
    _patched = True


# The name ``attention.py`` imports.
patch_interpreter_dot = patch_interpreter
