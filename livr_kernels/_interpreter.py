"""Fixes for the Triton interpreter (CPU), applied before the kernels run under ``TRITON_INTERPRET=1``.

* ``tl.dot`` on bfloat16 (Triton 3.9): the interpreter keeps bf16 tensors as raw uint16 bits
  and multiplies those bits as integers, which returns garbage silently. bf16 operands are widened
  to fp32 first: exact, since a bf16 is the top half of an fp32.
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
    """Install both fixes once per process (idempotent)."""
    global _patched
    if _patched:
        return
    from triton.runtime import interpreter

    _patch_dot(interpreter)
    _patch_scalar_index(interpreter)
    _patched = True


# The name ``attention.py`` imports.
patch_interpreter_dot = patch_interpreter
