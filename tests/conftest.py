"""Test set-up: the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before fastvae.kernels is first imported, so it is set here, before
any test module imports fastvae.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
