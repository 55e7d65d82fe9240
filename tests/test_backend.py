"""Backend choice (FASTVAE_BACKEND), life without Triton, and the no-copy handling of views."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae import backend
from fastvae.kernels import _launch, count_launches
from fastvae.ops._layout import as_rows


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVAE_BACKEND")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True,
                          timeout=120)


def test_env_variable_picks_the_backend(monkeypatch):
    mu = torch.zeros(4, 3)
    monkeypatch.setenv("FASTVAE_BACKEND", "triton")
    with count_launches() as launches:
        fastvae.kl_divergence(mu, mu)
    assert launches["reparameterize_kl_fwd_kernel"] == 1
    monkeypatch.setenv("FASTVAE_BACKEND", "torch")
    with count_launches() as launches:
        fastvae.kl_divergence(mu, mu)
    assert not launches
    monkeypatch.setenv("FASTVAE_BACKEND", "auto")
    assert backend.use_triton(mu) is False  # CPU tensors take the engine under auto


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTVAE_BACKEND must be one of"):
        fastvae.kl_divergence(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        with backend.use_backend("fast"):
            pass


def test_use_backend_overrides_and_restores(monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "torch")
    with backend.use_backend("triton"):
        assert backend.requested() == "triton"
        with backend.use_backend("auto"):
            assert backend.requested() == "auto"
        assert backend.requested() == "triton"
    assert backend.requested() == "torch"


def test_forced_triton_on_cpu_without_interpreter_says_how_to_fix():
    result = _run(
        """
        import torch, fastvae
        fastvae.kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3))
        """,
        FASTVAE_BACKEND="triton",
    )
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1" in result.stderr


def test_fastvae_works_without_triton():
    """With Triton unimportable, fastvae imports, runs every op on the engine, and a forced
    Triton backend says that Triton is missing."""
    result = _run(
        """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch, fastvae
        from fastvae import backend
        assert not backend.triton_available()
        h = torch.randn(8, 6, requires_grad=True)
        mu, logvar = h.chunk(2, dim=-1)
        z, kl = fastvae.reparameterize_kl(mu, logvar, seed=0)
        loss = fastvae.balanced_mse(torch.sigmoid(z), torch.rand(8, 3), torch.ones(())) + kl
        loss.backward()
        mean, var = fastvae.moments(z.detach())
        fastvae.renormalize(z.detach(), *fastvae.variance_law(mu.detach(), logvar.detach()))
        assert h.grad is not None and torch.isfinite(h.grad).all()
        with backend.use_backend("triton"):
            try:
                fastvae.kl_divergence(mu, logvar)
            except RuntimeError as error:
                print("ERROR:", error)
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert "needs Triton" in result.stdout


def test_views_reach_the_kernels_without_copies():
    h = torch.randn(4, 5, 2 * 7)
    mu, logvar = h.chunk(2, dim=-1)
    for view in (mu, logvar, mu[0].t(), torch.ones(()).expand(4, 3, 7)):  # the gradient of a sum
        rows = as_rows(view, view.shape[-1])
        assert rows.data_ptr() == view.data_ptr() and rows.shape == (view.numel() // view.shape[-1], view.shape[-1])
    # leading dims that no single row stride can describe are copied
    permuted = mu.transpose(0, 1)
    rows = as_rows(permuted, 7)
    assert rows.is_contiguous() and torch.equal(rows, permuted.reshape(-1, 7))


class _RecordingKernel:
    """Stands for a jitted kernel: ``kernel[grid](*args)`` records the CUDA devices made current."""

    __name__ = "recording_kernel"

    def __init__(self, entered):
        self.entered, self.calls = entered, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(list(self.entered))


def _fake_cuda(shape, index):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(shape, device=f"cuda:{index}")


def test_launch_makes_the_tensors_device_current(monkeypatch):
    """A CUDA kernel launches on the current device: the launcher must make the tensors' device current
    (as inductor does), or a tensor on cuda:1 is read by a kernel running on cuda:0."""
    entered = []

    class RecordingDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()
            return False

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    kernel = _RecordingKernel(entered)
    _launch.launch(kernel, (1,), _fake_cuda(4, 1), None, 3, BLOCK=4)
    assert kernel.calls == [[torch.device("cuda:1")]]
    _launch.launch(kernel, (1,), torch.zeros(4), 3)  # CPU: no guard
    assert kernel.calls[-1] == []


def test_launch_refuses_tensors_on_two_devices():
    kernel = _RecordingKernel([])
    with pytest.raises(ValueError, match="one device"):
        _launch.launch(kernel, (1,), torch.zeros(4), _fake_cuda(4, 0))
    with pytest.raises(ValueError, match="one device"):
        _launch.launch(kernel, (1,), _fake_cuda(4, 0), _fake_cuda(4, 1))
    assert not kernel.calls


def test_cuda_fallback_without_a_usable_triton_warns_once_naming_the_version():
    result = _run(
        """
        import sys, warnings
        sys.modules["triton"] = None  # import triton now raises ImportError, as an old Triton's knobs would
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from fastvae import backend
        with FakeTensorMode():
            t = torch.empty(2, device="cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert backend.use_triton(t) is False and backend.use_triton(t) is False
            assert backend.use_triton(torch.zeros(2)) is False  # CPU tensors: no warning
        print(len(caught), caught[0].message if caught else "")
        """
    )
    assert result.returncode == 0, result.stderr
    count, message = result.stdout.split(" ", 1)
    assert count == "1"
    assert "slow plain-PyTorch engine" in message and "Triton >= 3.4" in message and "Triton 3." in message


def test_setup_states_the_real_triton_floor():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert f"triton>={'.'.join(map(str, backend.MIN_TRITON))}" in setup
    assert backend.MIN_TRITON >= (3, 4)  # triton.knobs and tl.randn's 32-bit Philox split
