"""``resolve_device(name)``: a ``TrainConfig.device`` string as a ``torch.device`` that exists on this machine.
(``TrainConfig.precision="auto"`` is decided by timing real steps: ``calibrate.py``.)"""
from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "available_devices"]


def available_devices() -> list[str]:
    """The device names this machine can run on: ``cpu``, ``cuda:0`` ... and ``mps`` where present."""
    names = ["cpu"] + [f"cuda:{k}" for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. Any other name must parse and exist
    here; else ``ValueError`` saying which devices are available."""
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {name!r}: {error}") from None
    here = ", ".join(available_devices())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (devices here: {here})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(devices here: {here})")
    elif device.type == "mps" and "mps" not in here:
        raise ValueError(f"device {name!r}: MPS is not available on this machine (devices here: {here})")
    elif device.type == "meta":
        raise ValueError(f"device {name!r}: a meta tensor holds shapes but no data, so nothing can be trained, "
                         f"loaded or sampled on it (devices here: {here})")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: not supported for training (devices here: {here})")
    return device
