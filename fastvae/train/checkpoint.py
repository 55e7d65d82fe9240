"""Files a run can trust: one atomic save, a sha256 beside every checkpoint, a verified load, RNG state.

A checkpoint ``checkpoint.pt`` is written to ``checkpoint.pt.tmp``, fsynced and renamed over the old one, and its
sha256 goes to ``checkpoint.pt.sha256``. Before the rename the previous checkpoint (and its checksum) becomes
``checkpoint.prev.pt``, so that a damaged latest checkpoint can fall back to the one before it.
``read_checkpoint`` verifies the checksum and turns an empty, truncated, damaged or foreign file into one
``CheckpointError`` line that names the file and what is wrong with it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch

__all__ = ["CHECKPOINT", "PREVIOUS", "CheckpointError", "save_atomic", "save_atomic_bytes", "save_checkpoint",
           "read_checkpoint", "load_run_checkpoint", "checkpoint_digest", "weights_digest",
           "rng_state", "set_rng_state"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: empty, truncated, damaged (checksum) or not a fastvae checkpoint."""


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, then a rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_atomic(obj, path: str | Path) -> str:
    """``torch.save(obj)`` to ``path`` atomically, with its sha256 in ``path.sha256``; returns the hex digest.
    The same ``obj`` gives the same bytes, so the digest names the contents."""
    data = _torch_bytes(obj)
    digest = hashlib.sha256(data).hexdigest()
    path = Path(path)
    save_atomic_bytes(data, path)
    save_atomic_bytes(f"{digest}  {path.name}\n".encode(), path.with_name(path.name + _SUFFIX))
    return digest


def save_checkpoint(state: dict, run_dir: str | Path) -> str:
    """Save ``state`` as ``run_dir/checkpoint.pt``, keeping the one before as ``checkpoint.prev.pt``."""
    run_dir = Path(run_dir)
    latest, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    if latest.is_file():
        os.replace(latest, previous)
        sidecar = latest.with_name(CHECKPOINT + _SUFFIX)
        if sidecar.is_file():
            os.replace(sidecar, previous.with_name(PREVIOUS + _SUFFIX))
    return save_atomic(state, latest)


def checkpoint_digest(path: str | Path) -> str | None:
    """The recorded sha256 of the checkpoint at ``path`` (None when it has none)."""
    sidecar = Path(path).with_name(Path(path).name + _SUFFIX)
    with contextlib.suppress(OSError, IndexError, UnicodeDecodeError):
        return sidecar.read_text().split()[0]
    return None


def read_checkpoint(path: str | Path, *, map_location="cpu") -> dict:
    """The dict in checkpoint file ``path``, verified against its sha256. Raises ``FileNotFoundError`` when
    there is no file and ``CheckpointError`` (one line naming the file) when it cannot be trusted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); it is not a checkpoint")
    expected = checkpoint_digest(path)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{path}: damaged (its sha256 differs from the one recorded in {path.name}{_SUFFIX})")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad bytes
        what = ("not a fastvae checkpoint (it holds objects other than tensors and plain values)"
                if zipfile.is_zipfile(io.BytesIO(data)) else "truncated or not a PyTorch file")
        raise CheckpointError(f"{path}: {what} ({len(data)} bytes)") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a fastvae checkpoint (a PyTorch file without a 'model' entry)")
    return state


def load_run_checkpoint(run_dir: str | Path, *, map_location="cpu",
                        on_fallback: Callable[[str], None] | None = None) -> dict:
    """The latest trustworthy checkpoint of a run folder (or of a checkpoint file): ``checkpoint.pt``, or,
    when that one is damaged, ``checkpoint.prev.pt`` with a message to ``on_fallback`` (default: a warning)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / CHECKPOINT
    elif not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: is {run_dir!s} a run folder written by fastvae train?")
    previous = path.with_name(PREVIOUS)
    if not path.is_file() and not previous.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: is {run_dir!s} a run folder written by fastvae train?")
    try:
        return read_checkpoint(path, map_location=map_location)
    except (CheckpointError, FileNotFoundError) as error:
        if path.name != CHECKPOINT or not previous.is_file():
            raise
        state = read_checkpoint(previous, map_location=map_location)
        message = f"{error}; using the previous checkpoint {previous} (step {state.get('step')})"
        (on_fallback or (lambda m: warnings.warn(m, stacklevel=3)))(message)
        return state


def rng_state(device: torch.device) -> dict:
    """Torch's CPU generator state (and the device's CUDA generator's), to store in a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def weights_digest(state_dict: dict) -> str:
    """sha256 over a state_dict's names, dtypes, shapes and values: equal weights give equal digests,
    whatever else was saved beside them (timings, paths)."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
