import os

# The kernels are decorated at import time; the interpreter must be on before that.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Two pytest workers on two cores: keep each to one BLAS thread to avoid oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
