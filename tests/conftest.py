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


# ------------------------------------------------------------------------------ devices
def devices_under_test() -> list[str]:
    """The devices that device-parametrized tests run on: ``FASTVAE_TEST_DEVICES`` (comma-separated, as
    ``python -m bench.gpu`` sets it), else the CPU and, when there is one, CUDA."""
    names = os.environ.get("FASTVAE_TEST_DEVICES", "").strip()
    if names:
        return [n.strip() for n in names.split(",") if n.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])




def pytest_configure(config):
    config.addinivalue_line("markers", "devices: run every test of the module once per device of devices_under_test(), "
                                       "with that device as torch's default device")


def pytest_generate_tests(metafunc):
    marked = metafunc.definition.get_closest_marker("devices") is not None
    if marked and "device" not in metafunc.fixturenames:
        metafunc.fixturenames.append("device")
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", devices_under_test(), indirect=True)


@pytest.fixture
def device(request):
    """One device of ``devices_under_test()``; in a ``devices``-marked module also torch's default device for the test
    (tensors built without a device are made there), which the CPU needs no mode for."""
    name = getattr(request, "param", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"FASTVAE_TEST_DEVICES asks for {name}, but CUDA is not available")  # never a silent skip
    if name != "cpu" and request.node.get_closest_marker("devices") is not None:
        torch.set_default_device(name)
        try:
            yield torch.device(name)
        finally:
            torch.set_default_device(None)
        return
    yield torch.device(name)
