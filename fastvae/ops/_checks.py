"""The one place that validates the inputs of the fused ops, before any kernel runs.

Every check raises ``ValueError`` (bad values, shapes, names) or ``TypeError`` (bad dtypes) with a
message that names the op and the argument. The finite check is opt-in (``FASTVAE_CHECK_FINITE=1``)
because it reads every element and, on CUDA, waits for the result.
"""
from __future__ import annotations

import math
import os
import weakref

import torch

from ..reference.reduce import REDUCTIONS  # noqa: F401 - the vocabulary of the spec, checked here

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def finite_check_enabled() -> bool:
    """FASTVAE_CHECK_FINITE=1, outside torch.compile (which cannot branch on tensor values)."""
    if torch.compiler.is_compiling():
        return False
    return os.environ.get("FASTVAE_CHECK_FINITE", "0").strip().lower() in ("1", "true", "yes", "on")


def check_float_tensor(op: str, name: str, tensor: object, *, min_dim: int = 1) -> torch.Tensor:
    """A floating tensor of a supported dtype with at least ``min_dim`` dims and no zero-size dim."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}"
        )
    if tensor.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(tensor.shape)}); an empty batch has no loss")
    return tensor


def check_same_layout(op: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """``a`` and ``b`` have the same shape, dtype and device."""
    first, second = names
    if a.shape != b.shape:
        raise ValueError(f"{op}: {first} and {second} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {first} and {second} must have the same dtype, got {a.dtype} and {b.dtype}")
    if not (a.is_cpu and b.is_cpu) and a.device != b.device:  # (two CPU tensors: no device objects to build)
        raise ValueError(f"{op}: {first} and {second} must be on the same device, got {a.device} and {b.device}")


def check_choice(op: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_finite(op: str, **tensors: torch.Tensor) -> None:
    """With FASTVAE_CHECK_FINITE=1, name the first tensor that holds NaN or inf."""
    if not finite_check_enabled():
        return
    for name, tensor in tensors.items():
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise ValueError(f"{op}: {name} holds {bad} (FASTVAE_CHECK_FINITE=1)")


def seed_tensor(op: str, seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The Philox seed as a one-element int64 tensor on ``device``, which the kernels read from memory.

    ``None`` draws a seed from torch's default generator for ``device``, so ``torch.manual_seed``
    makes a run reproducible and every call gets a fresh stream. A tensor seed (rather than a Python
    int) keeps ``torch.compile`` from specializing, and the GPU from syncing, on its value.
    """
    if seed is None:
        return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"{op}: seed must be an int or a one-element integer tensor, "
                             f"got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int, a one-element integer tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed must be in [0, 2**63), got {seed}")
    return torch.full((1,), seed, device=device, dtype=torch.int64)


def check_dim(op: str, dim: object, ndim: int) -> int:
    """``dim`` as an index in ``[0, ndim)``; negative values count from the end."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{op}: dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-D tensor, got {dim}")
    return dim % ndim


def check_correction(op: str, correction: object, n: int) -> int:
    """An int ``correction >= 0`` that leaves a positive divisor ``n - correction``."""
    if isinstance(correction, bool) or not isinstance(correction, int):
        raise TypeError(f"{op}: correction must be an int, got {type(correction).__name__}")
    if correction < 0:
        raise ValueError(f"{op}: correction must be >= 0, got {correction}")
    if n - correction <= 0:
        raise ValueError(f"{op}: correction ({correction}) must be smaller than the number of samples along dim ({n})")
    return correction


def check_positive(op: str, name: str, value: object) -> float:
    """A finite Python number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{op}: {name} must be positive and finite, got {value}")
    return float(value)


def check_per_dim(op: str, name: str, value: object, shape: torch.Size, device: torch.device, *,
                  min_value: float = -float("inf")) -> torch.Tensor | float:
    """A Python number (finite, >= ``min_value``) or a floating tensor on ``device`` of ``shape`` (or 0-d)."""
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
        if value.dim() > 0 and value.shape != shape:
            raise ValueError(f"{op}: {name} must be a number, a 0-d tensor or of the per-dimension shape "
                             f"{tuple(shape)}, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{op}: {name} must be on the device of the input ({device}), got {value.device}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got {type(value).__name__}")
    if not min_value <= value < float("inf"):
        raise ValueError(f"{op}: {name} must be finite and >= {min_value}, got {value}")
    return float(value)


def check_event_dims(op: str, event_dims: object, ndim: int) -> int:
    """An int in ``[1, ndim]``: the number of trailing dims that form one sample's latent."""
    if isinstance(event_dims, bool) or not isinstance(event_dims, int):
        raise TypeError(f"{op}: event_dims must be an int, got {type(event_dims).__name__}")
    if not 1 <= event_dims <= ndim:
        raise ValueError(f"{op}: event_dims must be in [1, {ndim}] for a {ndim}-D latent, got {event_dims}")
    return event_dims


def check_logvar_clamp(op: str, logvar_clamp: object) -> list[float] | None:
    """None, or ``(lo, hi)``: two finite numbers with ``lo <= hi``, returned as a list of floats."""
    if logvar_clamp is None:
        return None
    if not isinstance(logvar_clamp, (tuple, list)) or len(logvar_clamp) != 2:
        raise ValueError(f"{op}: logvar_clamp must be None or a pair (lo, hi), got {logvar_clamp!r}")
    lo, hi = logvar_clamp
    for value in (lo, hi):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{op}: logvar_clamp must hold two finite numbers, got {logvar_clamp!r}")
    if lo > hi:
        raise ValueError(f"{op}: logvar_clamp must have lo <= hi, got {logvar_clamp!r}")
    return [float(lo), float(hi)]


_VOUCHED: dict[int, tuple[weakref.ref, int]] = {}
"""Running estimates known positive: id -> (a weak reference to the tensor, its version when vouched for)."""


def vouch_running_estimate(value: torch.Tensor) -> None:
    """``value`` is known positive and finite (a module's buffer made from a checked ``init``, or an op's update with
    ``momentum > 0`` of a checked value: ``r' >= m r > 0``): the next check skips reading it back unless something
    else has written it since (its version moved)."""
    if torch.compiler.is_compiling() or value.device.type != "cpu":
        return
    _VOUCHED[id(value)] = (weakref.ref(value, lambda _, key=id(value): _VOUCHED.pop(key, None)), value._version)


def _vouched(value: torch.Tensor) -> bool:
    entry = _VOUCHED.get(id(value))
    return entry is not None and entry[0]() is value and entry[1] == value._version


def check_running_estimate(op: str, name: str, value: object, device: torch.device) -> torch.Tensor:
    """A one-element floating tensor on ``device``; on the CPU (or with FASTVAE_CHECK_FINITE=1) also
    positive and finite (reading it on CUDA would wait for the GPU; torch.compile cannot branch on it).
    On the CPU the value is read once, not again after the op's own update (``vouch_running_estimate``), so a
    training step reads nothing back from a tensor (the step a CUDA graph captures is the same code)."""
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.numel() != 1:
        described = (f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                     else type(value).__name__)
        raise ValueError(f"{op}: {name} must be a one-element floating tensor holding a positive value, "
                         f"got {described}")
    if value.device != device:
        raise ValueError(f"{op}: {name} must be on the device of the loss ({device}), got {value.device}")
    if (value.device.type == "cpu" and not torch.compiler.is_compiling() and not _vouched(value)) \
            or finite_check_enabled():
        number = float(value.detach().reshape(()))
        if not number > 0 or number == float("inf"):
            raise ValueError(f"{op}: {name} must be positive and finite, got {number}")
    return value


def check_dims(op: str, dim: object, ndim: int) -> int | tuple[int, ...]:
    """An int dim, or a tuple of distinct dims (as ``torch.var_mean``), normalized to ``[0, ndim)``;
    a one-element tuple is its int."""
    if not isinstance(dim, (tuple, list)):
        return check_dim(op, dim, ndim)
    dims = tuple(check_dim(op, d, ndim) for d in dim)
    if not dims:
        raise ValueError(f"{op}: dim must name at least one dim, got {tuple(dim)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{op}: dim must not repeat a dim, got {tuple(dim)}")
    return dims[0] if len(dims) == 1 else dims
