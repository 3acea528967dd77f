import pytest
import torch


@pytest.fixture(autouse=True)
def _fp32_parity():
    """Parity is measured in true fp32: no TF32, deterministic kernels."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: one thread is faster than two that spin against each other.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
