"""Files a run can trust: a crash-consistent save, a sha256 beside every checkpoint, a verified load, RNG state.

The names: ``checkpoint.pt`` (the latest checkpoint) with its sha256 in ``checkpoint.pt.sha256``, the one
before it as ``checkpoint.prev.pt`` (``checkpoint.prev.pt.sha256``). A save at step ``s``

1. writes ``checkpoint.pt.tmp`` and fsyncs it, then writes its sha256 to ``checkpoint.pt.tmp.sha256`` and
   fsyncs that (from here on the new checkpoint is complete on disk),
2. renames ``checkpoint.pt`` to ``checkpoint.prev.pt``, ``checkpoint.pt.tmp`` to ``checkpoint.pt``,
   ``checkpoint.pt.sha256`` to ``checkpoint.prev.pt.sha256`` and ``checkpoint.pt.tmp.sha256`` to
   ``checkpoint.pt.sha256``, then fsyncs the folder.

A digest names contents, not a file: a checkpoint file is *verified* when its sha256 equals any digest
recorded in the folder. Whatever operation of a save a process dies at, the folder holds at least one
verified file with the newest complete checkpoint (the renames move files and digests one at a time, never
destroying the last copy of either), so ``open_run_checkpoint`` takes the verified file with the highest step.
``repair_run`` (at resume, under the run's lock) finishes or undoes an interrupted save and says what it did.
A save that raises (a full disk, a read-only folder) removes what it wrote before its first rename, so the
previous checkpoint stands as it was; ENOSPC becomes ``DiskFullError``, one line naming the file and the space
it needs. ``read_checkpoint`` turns an empty, truncated, damaged or foreign file into one ``CheckpointError``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["CHECKPOINT", "PREVIOUS", "CheckpointError", "DiskFullError", "save_atomic", "save_atomic_bytes",
           "save_checkpoint", "read_checkpoint", "load_run_checkpoint", "repair_run", "checkpoint_digest",
           "weights_digest", "rng_state", "set_rng_state"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
_SUFFIX = ".sha256"
_TMP = ".tmp"
_PENDING = CHECKPOINT + _TMP  # the checkpoint being written
_CHUNK = 1 << 24  # bytes per os.write: a big checkpoint is many writes, each a point where the disk may fill
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: empty, truncated, damaged (checksum) or not a fastvae checkpoint."""


class DiskFullError(OSError):
    """ENOSPC while writing a file; the message names the file, the space it needs and the space free."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SUFFIX)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _disk_full(path: Path, needed: int) -> DiskFullError:
    free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
    message = (f"no space left on the device writing {path}: it needs {needed / 2**20:.2f} MiB free, "
               f"{free / 2**20:.2f} MiB are; free some space and run again")
    return DiskFullError(errno.ENOSPC, message, str(path))


def _write_file(path: Path, data: bytes) -> None:
    """``data`` into a new file ``path``, fsynced; on any failure the partial file is removed (ENOSPC raises
    ``DiskFullError``). Every write, fsync and the open are separate system calls, each one a failure point."""
    try:
        with open(path, "wb", buffering=0) as handle:
            view = memoryview(data)
            while view:
                view = view[os.write(handle.fileno(), view[:_CHUNK]):]
            os.fsync(handle.fileno())
    except BaseException as error:
        _unlink_quietly(path)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise _disk_full(path, len(data)) from None
        raise


def save_atomic_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, then a rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + _TMP)
    _write_file(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _digest_line(digest: str, name: str) -> bytes:
    return f"{digest}  {name}\n".encode()


def save_atomic(obj, path: str | Path) -> str:
    """``torch.save(obj)`` to ``path`` atomically, with its sha256 in ``path.sha256``; returns the hex digest.
    The same ``obj`` gives the same bytes, so the digest names the contents. The data and the digest are both
    written (as ``path.tmp`` and ``path.tmp.sha256``) before either is renamed, so a reader that accepts
    either recorded digest (``read_checkpoint``) never sees a file without its digest."""
    data = _torch_bytes(obj)
    digest = hashlib.sha256(data).hexdigest()
    path = Path(path)
    tmp = path.with_name(path.name + _TMP)
    _write_file(tmp, data)
    try:
        _write_file(_sidecar(tmp), _digest_line(digest, path.name))
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        _unlink_quietly(_sidecar(tmp))
        raise
    os.replace(_sidecar(tmp), _sidecar(path))
    _fsync_dir(path.parent)
    return digest


def save_checkpoint(state: dict, run_dir: str | Path) -> str:
    """Save ``state`` as ``run_dir/checkpoint.pt``, keeping the one before as ``checkpoint.prev.pt``, by the
    protocol of the module docstring; returns the sha256. Leftovers of an interrupted save are repaired first."""
    run_dir = Path(run_dir)
    latest, previous, pending = run_dir / CHECKPOINT, run_dir / PREVIOUS, run_dir / _PENDING
    if _has_leftovers(run_dir):
        repair_run(run_dir)
    data = _torch_bytes(state)
    digest = hashlib.sha256(data).hexdigest()
    committed = False
    try:  # a KeyboardInterrupt (a second Ctrl-C) may arrive between any two lines: all of them are in here
        _write_file(pending, data)
        _write_file(_sidecar(pending), _digest_line(digest, CHECKPOINT))
        if latest.is_file():
            os.replace(latest, previous)
        os.replace(pending, latest)
        committed = True
        if _sidecar(latest).is_file():
            os.replace(_sidecar(latest), _sidecar(previous))
        os.replace(_sidecar(pending), _sidecar(latest))
    except BaseException:
        if not committed:  # put back what stood before this save; after the commit the next open finishes it
            with contextlib.suppress(OSError):
                if not latest.exists() and previous.is_file():
                    os.replace(previous, latest)
            _unlink_quietly(pending)
            _unlink_quietly(_sidecar(pending))
        raise
    _fsync_dir(run_dir)
    return digest


def checkpoint_digest(path: str | Path) -> str | None:
    """The recorded sha256 of the checkpoint at ``path`` (None when it has none)."""
    return _recorded_digest(_sidecar(Path(path)))


def _recorded_digest(sidecar: Path) -> str | None:
    with contextlib.suppress(OSError, IndexError, UnicodeDecodeError):
        token = sidecar.read_text().split()[0]
        if _HEX64.fullmatch(token):
            return token
    return None


def _torch_load(path: Path, data: bytes, map_location) -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad bytes
        what = ("not a fastvae checkpoint (it holds objects other than tensors and plain values)"
                if zipfile.is_zipfile(io.BytesIO(data)) else "truncated or not a PyTorch file")
        raise CheckpointError(f"{path}: {what} ({len(data)} bytes)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a fastvae file (a PyTorch file holding a {type(state).__name__})")
    return state


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); it is not a checkpoint")
    return data


def read_checkpoint(path: str | Path, *, map_location="cpu", require_digest: bool = False,
                    key: str = "model") -> dict:
    """The dict in checkpoint file ``path``, verified against its sha256 (``path.sha256``, or the
    ``path.tmp.sha256`` of a save interrupted between its renames). Raises ``FileNotFoundError`` when there is
    no file and ``CheckpointError`` (one line naming the file) when it cannot be trusted: damaged, without a
    recorded digest when ``require_digest``, or a dict without ``key``."""
    path = Path(path)
    data = _read_bytes(path)
    recorded = {d for d in (checkpoint_digest(path), _recorded_digest(_sidecar(path.with_name(path.name + _TMP))))
                if d is not None}
    if recorded and hashlib.sha256(data).hexdigest() not in recorded:
        raise CheckpointError(f"{path}: damaged (its sha256 differs from the one recorded in {path.name}{_SUFFIX})")
    if require_digest and not recorded:
        raise CheckpointError(f"{path}: no sha256 recorded beside it ({path.name}{_SUFFIX}), so it cannot be trusted")
    state = _torch_load(path, data, map_location)
    if key not in state:
        raise CheckpointError(f"{path}: not a fastvae checkpoint (a PyTorch file without a {key!r} entry)")
    return state


# ---------------------------------------------------------------------------------------------- open and repair
@dataclass
class _Candidate:
    path: Path
    digest: str | None  # of its bytes; None when unreadable
    verified: bool
    rank: int  # among equal steps: the pending file is the newest, then the latest, then the previous


def _has_leftovers(run_dir: Path) -> bool:
    pending = run_dir / _PENDING
    return (pending.exists() or _sidecar(pending).exists()
            or ((run_dir / PREVIOUS).is_file() and not (run_dir / CHECKPOINT).exists()))


def _survey(run_dir: Path) -> tuple[list[_Candidate], set[str]]:
    """The checkpoint files of ``run_dir`` (pending, latest, previous) and every digest recorded there."""
    names = (_PENDING, CHECKPOINT, PREVIOUS)
    recorded = {d for d in (_recorded_digest(_sidecar(run_dir / n)) for n in names) if d is not None}
    candidates = []
    for rank, name in zip((2, 1, 0), names):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            digest = None
        # a checkpoint.pt or .prev.pt is only ever made by a rename of a complete file; one without a sidecar of
        # its own was written by hand or by another tool, and is trusted as such (the pending file never is)
        trusted = digest in recorded or (name != _PENDING and digest is not None and not _sidecar(path).exists())
        candidates.append(_Candidate(path, digest, trusted, rank))
    return candidates, recorded


def _newest(candidates: list[_Candidate], map_location, notes: list[str]) -> tuple[_Candidate, dict] | None:
    """The verified candidate with the highest step, loaded; loads that fail are noted and skipped."""
    best = None
    for candidate in candidates:
        if not candidate.verified:
            continue
        try:  # verified by the survey against every recorded digest, not only its own sidecar's
            state = _torch_load(candidate.path, _read_bytes(candidate.path), map_location)
            if "model" not in state:
                raise CheckpointError(f"{candidate.path}: not a fastvae checkpoint (a PyTorch file without a 'model' "
                                      "entry)")
        except (CheckpointError, OSError) as error:
            notes.append(str(error))
            continue
        key = (int(state.get("step", -1)), candidate.rank)
        if best is None or key > best[0]:
            best = (key, candidate, state)
    return None if best is None else (best[1], best[2])


def _why_not(candidate: _Candidate | None, path: Path) -> str:
    if candidate is None:
        return f"{path}: missing"
    return f"{path}: damaged (its sha256 differs from the one recorded in {path.name}{_SUFFIX})"


def load_run_checkpoint(run_dir: str | Path, *, map_location="cpu",
                        on_fallback: Callable[[str], None] | None = None) -> dict:
    """The newest verified checkpoint of a run folder (or the checkpoint file given), read without writing
    anything: ``checkpoint.pt`` when it verifies, else the newest verified of ``checkpoint.prev.pt`` and a
    complete ``checkpoint.pt.tmp`` left by an interrupted save, with a message to ``on_fallback`` (default: a
    warning). A checkpoint file without a sidecar of its own (written by hand) is read unverified."""
    path = Path(run_dir)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}: is {run_dir!s} a run folder written by fastvae train?")
        return read_checkpoint(path, map_location=map_location)
    latest = path / CHECKPOINT
    if not _has_leftovers(path) and latest.is_file() and checkpoint_digest(latest) is not None:
        with contextlib.suppress(CheckpointError):
            return read_checkpoint(latest, map_location=map_location)  # the common case: one hash, one load
    candidates, _ = _survey(path)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint at {latest}: is {run_dir!s} a run folder written by fastvae train?")
    notes: list[str] = []
    found = _newest(candidates, map_location, notes)
    by_name = {c.path.name: c for c in candidates}
    if found is None:
        raise CheckpointError(notes[0] if notes else _why_not(by_name.get(CHECKPOINT), latest))
    chosen, state = found
    if chosen.path.name != CHECKPOINT:
        why = _why_not(by_name.get(CHECKPOINT), latest) if chosen.path.name == PREVIOUS else \
            f"an interrupted save left {chosen.path.name}, a complete verified checkpoint newer than {CHECKPOINT}"
        kind = "the previous checkpoint" if chosen.path.name == PREVIOUS else "it"
        message = f"{why}; using {kind} {chosen.path} (step {state.get('step')})"
        (on_fallback or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    return state


def repair_run(run_dir: str | Path) -> list[str]:
    """Finish or undo an interrupted save in ``run_dir`` (call it holding the run's lock); returns one line per
    thing repaired. The newest verified checkpoint becomes ``checkpoint.pt`` (the one it replaces
    ``checkpoint.prev.pt``), each kept file gets its digest in its own ``.sha256``, and a partial
    ``checkpoint.pt.tmp`` is removed. Each step keeps the folder recoverable if the repair itself is cut short."""
    run_dir = Path(run_dir)
    if not _has_leftovers(run_dir):
        return []
    latest, previous, pending = run_dir / CHECKPOINT, run_dir / PREVIOUS, run_dir / _PENDING
    candidates, _ = _survey(run_dir)
    notes: list[str] = []
    found = _newest(candidates, "cpu", notes)
    at = {c.path.name: c for c in candidates}  # where each candidate's bytes are now
    done = []
    if found is not None and found[0].path == pending:
        if latest.is_file():
            os.replace(latest, previous)
            at[PREVIOUS] = at.pop(CHECKPOINT)
        os.replace(pending, latest)
        at[CHECKPOINT] = at.pop(_PENDING)
        done.append(f"{pending.name} (step {found[1].get('step')}) was complete: an interrupted save is finished, "
                    f"it is now {CHECKPOINT}")
    elif found is not None and found[0].path == previous and not latest.exists():
        os.replace(previous, latest)
        at[CHECKPOINT] = at.pop(PREVIOUS)
        done.append(f"{CHECKPOINT} was missing after an interrupted save: {PREVIOUS} (step {found[1].get('step')}) "
                    f"is {CHECKPOINT} again")
    for name in (PREVIOUS, CHECKPOINT):  # the previous first: until then the latest's sidecar may hold its digest
        candidate = at.get(name)
        if candidate is not None and candidate.verified and checkpoint_digest(run_dir / name) != candidate.digest:
            save_atomic_bytes(_digest_line(candidate.digest, name), _sidecar(run_dir / name))
            done.append(f"{name}{_SUFFIX} rewritten with the digest of {name}")
    if pending.exists():
        _unlink_quietly(pending)
        done.append(f"removed {pending.name}, a partial checkpoint left by an interrupted save")
    if _sidecar(pending).exists():
        _unlink_quietly(_sidecar(pending))
    _fsync_dir(run_dir)
    return [f"{run_dir}: {line}" for line in done]


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
