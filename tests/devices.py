"""Devices for tests of the PyTorch backend: the CPU everywhere, CUDA where there is a GPU."""

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
