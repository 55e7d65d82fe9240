"""Fault injection for the file operations of a save: ``FileFaults`` counts them and fails the k-th."""
from __future__ import annotations

import builtins
import errno
import os


class InjectedFault(OSError):
    pass


class FileFaults:
    """Within the ``with`` block, count every file operation (an ``open`` for writing, ``os.write``, ``os.fsync``,
    ``os.rename``, ``os.replace``, ``os.unlink``) into ``ops`` as ``(name, path or fd)``; with ``fail_at=k`` the
    k-th (from 1) does not happen: it raises ``OSError(error)`` (``mode="raise"``; a write first writes half of
    its bytes, as a disk filling up does) or ends the process at once with ``os._exit(exit_code)``
    (``mode="exit"``, as kill -9 or the OOM killer would)."""

    NAMES = ("write", "fsync", "rename", "replace", "unlink")

    def __init__(self, fail_at: int | None = None, mode: str = "raise", error: int = errno.EIO, exit_code: int = 77):
        self.fail_at, self.mode, self.error, self.exit_code = fail_at, mode, error, exit_code
        self.ops: list[tuple[str, object]] = []
        self._saved: dict = {}

    def _hit(self, name: str, target) -> bool:
        self.ops.append((name, os.path.basename(str(target)) if not isinstance(target, int) else target))
        if len(self.ops) != self.fail_at:
            return False
        if self.mode == "exit":
            os._exit(self.exit_code)
        return True

    def _wrap(self, name: str, real):
        def wrapped(*args, **kwargs):
            if self._hit(name, args[0]):
                if name == "write" and len(args[1]) > 1:
                    real(args[0], bytes(args[1][: len(args[1]) // 2]))
                raise InjectedFault(self.error, f"injected {os.strerror(self.error)} at {name}", str(args[0]))
            return real(*args, **kwargs)
        return wrapped

    def _open(self, real):
        def wrapped(file, mode="r", *args, **kwargs):
            if set(mode) & set("wax+") and self._hit("open", file):
                raise InjectedFault(self.error, f"injected {os.strerror(self.error)} at open", str(file))
            return real(file, mode, *args, **kwargs)
        return wrapped

    def __enter__(self) -> "FileFaults":
        self._saved = {name: getattr(os, name) for name in self.NAMES}
        self._saved["open"] = builtins.open
        for name in self.NAMES:
            setattr(os, name, self._wrap(name, self._saved[name]))
        builtins.open = self._open(self._saved["open"])
        return self

    def __exit__(self, *exc) -> None:
        builtins.open = self._saved.pop("open")
        for name, real in self._saved.items():
            setattr(os, name, real)
