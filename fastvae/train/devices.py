"""``resolve_device(name)``: a ``TrainConfig.device`` string as a ``torch.device`` that exists on this machine;
``resolve_precision(name, device)``: ``TrainConfig.precision`` with ``auto`` decided for that device."""
from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "resolve_precision", "available_devices", "cpu_has_bf16_instructions"]


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
    elif device.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"device {name!r}: not supported for training (devices here: {here})")
    return device


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX), as torch reports it."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: ``bf16`` on a CPU with bf16 instructions, where bf16 autocast makes ``fastvae train``'s epoch
    faster (``bench/results/cpu.md``) and keeps the seed's results as closely as a second seed does
    (``bench/results/precision.md``, ``python -m bench.precision``), else ``fp32`` (CUDA included, until a GPU
    has measured the same). Any other value as it is."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_has_bf16_instructions() else "fp32"
