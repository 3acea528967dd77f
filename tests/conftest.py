import ctypes
import os

import pytest
import torch


def _mkl_set_dynamic():
    """MKL's MKL_Set_Dynamic (linked into libtorch_cpu), or None for a torch built without it."""
    try:
        return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).MKL_Set_Dynamic
    except (OSError, AttributeError):
        return None


_MKL_SET_DYNAMIC = _mkl_set_dynamic()


def set_num_threads(threads: int) -> None:
    """torch.set_num_threads, leaving MKL free to choose its own thread count per call, as in a fresh process.

    torch.set_num_threads also fixes MKL's thread count, even to the value it had. From then on every MKL
    vector-math call (sin, exp, ... of 128 elements or more) runs as a parallel region: 8 ms a call instead of
    3 µs on this shared 2-core machine, so every test after the first module that used `one_thread` ran slower
    (a 1000-step scheduler trajectory: 16 s instead of 1 s)."""
    torch.set_num_threads(threads)
    if _MKL_SET_DYNAMIC is not None:
        _MKL_SET_DYNAMIC(1)


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
    set_num_threads(1)
    yield
    set_num_threads(threads)
