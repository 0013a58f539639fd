import os

import torch

# Where a GPU exists the tests run the compiled kernels (test_kernels_cuda.py); elsewhere the
# kernels run under the Triton interpreter, which must be on before livr_kernels decorates them.
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests run the static tile table (reproducible); tests/test_autotune.py covers the tuner itself.
os.environ.setdefault("LIVR_AUTOTUNE", "0")
# Two pytest workers on two cores: keep each to one BLAS thread to avoid oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

torch.set_num_threads(1)

# Tests that drive the kernels on CPU tensors need the interpreter, which a GPU machine leaves off
# so that test_kernels_cuda.py runs compiled code: whole modules here, single tests or parameters
# by the ``interpreter`` mark.
INTERPRETER_MODULES = ("test_kernels.py", "test_tma.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs the Triton kernels on CPU tensors (needs TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="CPU-tensor kernel tests need TRITON_INTERPRET=1; test_kernels_cuda.py covers the compiled kernels here")
    for item in items:
        if item.path.name in INTERPRETER_MODULES or item.get_closest_marker("interpreter") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
