"""Run folders that one process at a time writes: an OS lock, unique auto names, a clean overwrite, provenance.

- ``run_lock(folder, command)``: an exclusive ``fcntl.flock`` on ``folder/.lock`` held for the life of a run
  (the OS drops it when the process dies, however it dies); a second writer gets ``RunFolderBusy`` naming
  the holder's pid and command (read again until the holder has written it).
- ``read_lock(folder)``: the shared lock of a command that only reads a run; it opens the lock file read-only,
  so a read-only run folder can be read, and a live writer is still detected where there is one.
- ``unique_folder(base)``: creates ``base`` atomically, or ``base-2``, ``base-3``, ... when it exists.
- ``empty_folder(folder)``: an ``--overwrite`` starts from an empty folder (the lock file stays).
- ``write_provenance`` / ``matches_checkpoint``: derived outputs (``two_stage/``, ``analysis/``, ``fid.json``)
  record the sha256 of the checkpoint they came from, and are reused only for that checkpoint.
- ``record_dataset`` / ``repoint_dataset``: a run on a ``.npy``/``.npz`` file records its sha256, so that a resume
  may name the file's new place (``--dataset NEW`` or ``--data-root DIR``) when the contents are the same.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from .checkpoint import CHECKPOINT, checkpoint_digest

__all__ = ["LOCK", "PROVENANCE", "RunFolderBusy", "run_lock", "read_lock", "writable", "unique_folder", "make_folder",
           "empty_folder", "provenance", "write_provenance", "matches_checkpoint", "record_dataset", "repoint_dataset"]

LOCK = ".lock"
PROVENANCE = "source.json"
DATASET_RECORD = "dataset.json"


class RunFolderBusy(RuntimeError):
    """Another live process writes into this run folder."""


def make_folder(folder: str | Path) -> Path:
    """``mkdir -p folder`` with one line naming the problem (a file in the way, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise ValueError(f"cannot create the folder {folder}: {blocker} is a file, not a folder") from None
    except PermissionError:
        raise ValueError(f"cannot create the folder {folder}: permission denied") from None
    return folder


def _holder(folder: Path, handle, *, wait: float = 1.0) -> str:
    """Who holds the lock of ``folder``: the first line of its lock file when it names a live process. A holder
    writes that line just after taking the lock, so an empty (or dead) line is read again for up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        handle.seek(0)
        line = handle.readline().strip()
        pid = line.split()[1] if line.startswith("process ") and len(line.split()) > 1 else ""
        if pid.isdigit() and _alive(int(pid)):
            return line
        if time.monotonic() > deadline:
            return "another process (one reading the run holds a shared lock)"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(handle, folder: Path, mode: int) -> None:
    """``flock(handle, mode)`` without waiting; a lock held elsewhere is ``RunFolderBusy`` naming the holder."""
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise RunFolderBusy(f"{folder} is in use by {_holder(folder, handle)}; wait for it to finish or choose "
                            "another folder") from None


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str = "fastvae"):
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block."""
    folder = make_folder(folder)
    handle = os.fdopen(os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        _lock(handle, folder, fcntl.LOCK_EX)
        handle.seek(0)
        handle.write(f"process {os.getpid()} ({command})\n")  # over the old line, then cut: never empty
        handle.truncate()
        handle.flush()
        yield folder
        handle.seek(0)
        handle.truncate()  # a clean exit leaves no holder named
    finally:
        handle.close()  # closing the descriptor releases the lock


@contextlib.contextmanager
def read_lock(folder: str | Path):
    """For a command that only reads the run ``folder``: a shared lock on its lock file for the ``with`` block,
    refused (``RunFolderBusy`` naming the writer) while a writer holds it; opened read-only, so it writes nothing
    and works on a read-only folder. A folder without a lock file (or one this user cannot open) has no writer
    to wait for."""
    try:
        handle = open(Path(folder) / LOCK)
    except OSError:
        yield Path(folder)
        return
    try:
        _lock(handle, Path(folder), fcntl.LOCK_SH)
        yield Path(folder)
    finally:
        handle.close()


def writable(folder: str | Path) -> bool:
    """Whether this process may create files in ``folder`` (false on a read-only mount, even for root)."""
    return os.access(folder, os.W_OK | os.X_OK)


def unique_folder(base: str | Path) -> Path:
    """Create and return ``base``, or the first of ``base-2``, ``base-3``, ... that does not exist yet; the
    creation is atomic, so processes started in the same second get different folders."""
    base = Path(base)
    make_folder(base.parent)
    for k in range(1, 10_000):
        candidate = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ValueError(f"no free folder name next to {base}")


def empty_folder(folder: str | Path) -> None:
    """Remove everything in ``folder`` except its lock file: what an overwritten run leaves behind."""
    for entry in Path(folder).iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def provenance(run_dir: str | Path) -> dict:
    """``{"checkpoint": path, "sha256": digest}`` of the current checkpoint of ``run_dir``."""
    return {"checkpoint": str(Path(run_dir).resolve() / CHECKPOINT),
            "sha256": checkpoint_digest(Path(run_dir) / CHECKPOINT)}


def write_provenance(folder: str | Path, run_dir: str | Path) -> dict:
    """Record in ``folder/source.json`` which checkpoint of ``run_dir`` the outputs in ``folder`` came from."""
    record = provenance(run_dir)
    folder = make_folder(folder)
    (folder / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def matches_checkpoint(folder: str | Path, run_dir: str | Path) -> bool:
    """Whether ``folder`` holds outputs derived from the current checkpoint of ``run_dir``."""
    try:
        record = json.loads((Path(folder) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    digest = checkpoint_digest(Path(run_dir) / CHECKPOINT)
    return digest is not None and record.get("sha256") == digest


def record_dataset(run_dir: str | Path, path: str | Path) -> dict:
    """Record in ``run_dir/dataset.json`` the sha256 of the dataset file ``path`` a run trains on, so that the
    run can be pointed at the same data after the file moved (``repoint_dataset``)."""
    from ..data import file_digest

    record = {"path": str(Path(path).resolve()), "sha256": file_digest(path), "bytes": Path(path).stat().st_size}
    from .checkpoint import save_atomic_bytes

    save_atomic_bytes((json.dumps(record, indent=2) + "\n").encode(), Path(run_dir) / DATASET_RECORD)
    return record


def repoint_dataset(run_dir: str | Path, new: str | Path) -> str:
    """``new`` (resolved) when its contents are those recorded in ``run_dir/dataset.json``; else ValueError saying
    why the run cannot be pointed there."""
    from ..data import file_digest

    record_path = Path(run_dir) / DATASET_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{run_dir} recorded no digest of its dataset file ({DATASET_RECORD}), so it cannot be "
                         f"pointed at {new}; put the file back at its old path") from None
    if not Path(new).is_file():
        raise ValueError(f"--dataset {new}: no such file")
    if file_digest(new) != record.get("sha256"):
        raise ValueError(f"{new} is not the data the run trained on ({record.get('path')}): its sha256 differs from "
                         f"the one recorded in {record_path}")
    return str(Path(new).resolve())
