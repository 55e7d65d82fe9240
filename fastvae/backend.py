"""The one place that decides whether an op runs its Triton kernel or the PyTorch reference.

``FASTVAE_BACKEND`` (read at every call, so tests and users can change it at run time):

- ``auto`` (default): Triton for CUDA tensors when a supported Triton (>= 3.4) imports, the
  reference otherwise; CUDA tensors that fall back get a warning, once, that names the reason.
- ``triton``: always the Triton kernels. CPU tensors then need Triton's interpreter, which is
  chosen when the kernels are first imported: ``TRITON_INTERPRET=1`` must be set before that.
- ``torch``: always the plain-PyTorch reference.

``use_backend(name)`` overrides the variable inside a ``with`` block.

An op decides once, in its forward (``decide``), and its backward runs on the same backend, whatever
is current when the backward runs: the decision is saved in the autograd context.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from types import ModuleType

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


_kernels_or_error: ModuleType | Exception | None = None


def _import_kernels() -> ModuleType | Exception:
    """``fastvae.kernels``, imported once, or the error that its import raised. A plain module global
    rather than ``functools.lru_cache``, which torch.compile warns about when it traces an op's forward."""
    global _kernels_or_error
    if _kernels_or_error is None:
        try:
            import fastvae.kernels as kernels
        except Exception as error:  # ImportError without Triton; anything Triton raises on a bare machine
            _kernels_or_error = error
        else:
            _kernels_or_error = kernels
    return _kernels_or_error


def triton_available() -> bool:
    """True when Triton and ``fastvae.kernels`` import on this machine."""
    return not isinstance(_import_kernels(), Exception)


def kernels() -> ModuleType:
    """The ``fastvae.kernels`` module, or a RuntimeError that says why it is unavailable."""
    module = _import_kernels()
    if isinstance(module, Exception):
        raise RuntimeError(
            f"FASTVAE_BACKEND=triton needs Triton, which failed to import: {module!r}. "
            "Install it (pip install triton, Linux only) or use FASTVAE_BACKEND=torch."
        ) from module
    return module


def requested() -> str:
    """The backend asked for: the ``use_backend`` override, else ``FASTVAE_BACKEND``, else ``auto``."""
    name = _override or os.environ.get("FASTVAE_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTVAE_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernel (True) or the reference (False)."""
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
    module = kernels()
    if tensor.device.type == "cpu" and not module.INTERPRETED:
        raise RuntimeError(
            "FASTVAE_BACKEND=triton on CPU tensors runs the kernels in Triton's interpreter, "
            "which must be chosen before fastvae.kernels is imported: set TRITON_INTERPRET=1 "
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
        f"fastvae: CUDA tensors run the slow plain-PyTorch reference, because the Triton kernels failed to "
        f"import (Triton {_installed_triton()}; fastvae needs Triton >= {'.'.join(map(str, MIN_TRITON))}): "
        f"{_import_kernels()!r}",
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
