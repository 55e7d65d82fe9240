"""The one place that decides whether an op runs its Triton kernel or the PyTorch reference.

``FASTVAE_BACKEND`` (read at every call, so tests and users can change it at run time):

- ``auto`` (default): Triton for CUDA tensors when Triton imports, the reference otherwise.
- ``triton``: always the Triton kernels. CPU tensors then need Triton's interpreter, which is
  chosen when the kernels are first imported: ``TRITON_INTERPRET=1`` must be set before that.
- ``torch``: always the plain-PyTorch reference.

``use_backend(name)`` overrides the variable inside a ``with`` block.
"""
from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch")
_override: str | None = None


@functools.lru_cache(maxsize=1)
def _import_kernels() -> ModuleType | Exception:
    try:
        import fastvae.kernels as kernels
    except Exception as error:  # ImportError without Triton; anything Triton raises on a bare machine
        return error
    return kernels


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
        return tensor.is_cuda and triton_available()
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
