import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors through Triton's interpreter, which must
    os.environ.setdefault("TRITON_INTERPRET", "1")  # be switched on before triton is imported
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    """One random-weight tiny model for read-only tests (eval mode); every aggregation block active (no zero init)."""
    import catseg
    torch.manual_seed(0)
    return catseg.create_model("catseg_tiny", zero_init_residual=False).eval()
