"""Test set-up: the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before fastvae.kernels is first imported, so it is set here, before
any test module imports fastvae; so is inductor's cache folder, before torch is imported.
"""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# inductor's on-disk cache outlives a change of a custom op's schema: a graph compiled against an older
# signature of fastvae's ops would be loaded and fail, so each test session compiles into its own folder
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastvae-inductor-"))
# precision="auto" caches what it measured per machine and step: the suite measures into a folder of its own
os.environ.setdefault("FASTVAE_CACHE_DIR", tempfile.mkdtemp(prefix="fastvae-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
