"""Run folders that one process at a time writes: an OS lock, unique auto names, a clean overwrite, provenance.

- ``run_lock(folder, command)``: an exclusive ``fcntl.flock`` on ``folder/.lock`` held for the life of a run
  (the OS drops it when the process dies, however it dies); a second writer gets ``RunFolderBusy`` naming
  the holder's pid and command.
- ``unique_folder(base)``: creates ``base`` atomically, or ``base-2``, ``base-3``, ... when it exists.
- ``empty_folder(folder)``: an ``--overwrite`` starts from an empty folder (the lock file stays).
- ``write_provenance`` / ``matches_checkpoint``: derived outputs (``two_stage/``, ``analysis/``, ``fid.json``)
  record the sha256 of the checkpoint they came from, and are reused only for that checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from .checkpoint import CHECKPOINT, checkpoint_digest

__all__ = ["LOCK", "PROVENANCE", "RunFolderBusy", "run_lock", "unique_folder", "make_folder", "empty_folder",
           "provenance", "write_provenance", "matches_checkpoint"]

LOCK = ".lock"
PROVENANCE = "source.json"


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


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str = "fastvae"):
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block."""
    folder = make_folder(folder)
    handle = open(folder / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderBusy(f"{folder} is in use by {holder}; wait for it to finish or choose another folder") \
                from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({command})\n")
        handle.flush()
        yield folder
    finally:
        handle.close()  # closing the descriptor releases the lock


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
