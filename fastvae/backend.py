"""The one place that decides whether an op runs its Triton kernel or the engine (``fastvae.ops.engine``: plain
PyTorch on any device, numba loops on the CPU).

``FASTVAE_BACKEND`` (read at every call, so tests and users can change it at run time):

- ``auto`` (default): Triton for CUDA tensors when a supported Triton (>= 3.4) imports, the
  engine otherwise; CUDA tensors that fall back get a warning, once, that names the reason.
- ``triton``: always the Triton kernels. CPU tensors then need Triton's interpreter, which is
  chosen when the kernels are imported, with fastvae: ``TRITON_INTERPRET=1`` must be set before that.
- ``torch``: always the engine.

``use_backend(name)`` overrides the variable inside a ``with`` block.

An op decides once, in its forward (``decide``), and its backward runs on the same backend, whatever
is current when the backward runs: the decision is saved in the autograd context.

Each op module imports its kernel module statically, in one guarded import (``fastvae.ops.reparameterize``:
``from ..kernels import reparameterize as kernels_reparameterize``); when that fails (no Triton, or one the
kernels cannot use) the module runs on the engine and reports the error here (``kernels_unavailable``),
which is what the forced backend's error and the CUDA fallback warning name.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
MIN_TRITON = (3, 4)
"""The oldest Triton the kernels run on (``triton.knobs`` and the 32-bit Philox split of ``tl.randn``)."""
_override: str | None = None
_warned_fallback = False


def _installed_triton() -> str:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # not installed, or no metadata
        return "not installed"


_kernels_error: Exception | None = None
"""Why the Triton kernels failed to import (the first error an op module's guarded import reported),
or None when they imported."""


def kernels_unavailable(error: Exception) -> None:
    """Record that an op module's kernels failed to import, and why; returns None, the module's stand-in
    for its kernel module. ``ImportError`` without Triton; anything an unusable Triton raises."""
    global _kernels_error
    if _kernels_error is None:
        _kernels_error = error


def triton_available() -> bool:
    """True when Triton and ``fastvae.kernels`` imported on this machine."""
    return _kernels_error is None


def _require_kernels() -> None:
    """A RuntimeError that says why the kernels are unavailable, when they are."""
    if _kernels_error is not None:
        raise RuntimeError(
            f"FASTVAE_BACKEND=triton needs Triton, which failed to import: {_kernels_error!r}. "
            "Install it (pip install triton, Linux only) or use FASTVAE_BACKEND=torch."
        ) from _kernels_error


def requested() -> str:
    """The backend asked for: the ``use_backend`` override, else ``FASTVAE_BACKEND``, else ``auto``."""
    name = _override or os.environ.get("FASTVAE_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTVAE_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernel (True) or the engine (False)."""
    name = requested()
    if name == "torch":
        return False
    if name == "auto":
        if not tensor.is_cuda:
            return False
        if not triton_available():
            _warn_cuda_fallback()
            return False
        return True
    _require_kernels()
    from .kernels import INTERPRETED  # imported with the ops, which imported their kernel modules

    if tensor.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "FASTVAE_BACKEND=triton on CPU tensors runs the kernels in Triton's interpreter, "
            "which must be chosen before fastvae (and with it fastvae.kernels) is imported: set TRITON_INTERPRET=1 "
            "at the start of the process."
        )
    if tensor.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the Triton kernels run on CUDA (or CPU in interpret mode), not {tensor.device}")
    return True


def decide(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the backend an op on ``tensor`` runs now. The forward of each op
    calls it once and saves the answer for its backward."""
    return "triton" if use_triton(tensor) else "torch"


def _warn_cuda_fallback() -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    warnings.warn(
        f"fastvae: CUDA tensors run the slow plain-PyTorch engine, because the Triton kernels failed to "
        f"import (Triton {_installed_triton()}; fastvae needs Triton >= {'.'.join(map(str, MIN_TRITON))}): "
        f"{_kernels_error!r}",
        RuntimeWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops of the ``with`` block on backend ``name`` ('auto', 'triton' or 'torch')."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous
