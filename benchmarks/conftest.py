import os

import torch

# Without CUDA the livr kernels run under the Triton interpreter, which has to be switched on
# before livr_kernels decorates them (the benchmark modules import it at collection).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
