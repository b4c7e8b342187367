"""Where the kernel tests run: compiled on CUDA, or in Triton's interpreter on CPU.

Without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors, which
the suite's top-level ``conftest.py`` sets before anything imports triton. The
interpreter returns garbage for bf16 (see ARCHITECTURE notes), so CPU tests use float32
and float16 with small shapes; bf16 and large shapes run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def kernel_device() -> torch.device:
    """The device the compiled-or-interpreted kernel runs on in this session."""
    pytest.importorskip("triton")
    if INTERPRETED:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    return torch.device("cuda")


@pytest.fixture
def cuda() -> torch.device:
    """A CUDA device running compiled kernels (large shapes, bf16)."""
    pytest.importorskip("triton")
    if INTERPRETED or not torch.cuda.is_available():
        pytest.skip("needs CUDA with compiled Triton kernels")
    return torch.device("cuda")
