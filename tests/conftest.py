import pytest
import torch


@pytest.fixture(autouse=True)
def _fp32_parity():
    """Parity is measured in true fp32: no TF32, deterministic kernels."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
