"""Fix for the Triton interpreter's ``tl.dot`` on bfloat16 (Triton 3.9).

The interpreter keeps bf16 tensors as raw uint16 bits and multiplies those bits as integers,
which returns garbage silently. We widen bf16 operands to fp32 first: exact, since a bf16 is
the top half of an fp32. Real GPU compilation is untouched.
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


def patch_interpreter_dot() -> None:
    global _patched
    if _patched:
        return
    from triton.runtime.interpreter import InterpreterBuilder

    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _bf16_to_fp32(a), _bf16_to_fp32(b), d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_dot = create_dot
    _patched = True
