"""Counting the host syncs of a block of PyTorch code: ``with SyncCounter() as counter: ...``.

A CUDA graph cannot capture, and an eager GPU step stalls on, any op that makes the host wait for the device or
copies a host value to it. Those are ATen ops, the same on every device, so the CPU counts them too:

- ``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (a device-to-host read);
- ``aten.lift_fresh`` / ``aten.lift_fresh_copy``: ``torch.tensor(host values)`` (a host-to-device copy);
- ``aten.nonzero`` and ``aten.masked_select``: a result whose size the host must read;
- a copy (``_to_copy``, ``copy_``) between the CPU and another device, in either direction (``.tolist()`` and
  ``.cpu()`` of a device tensor, ``.to(device)`` of a host one).

Only ops dispatched under the mode are seen: the inside of a custom op (its kernel launcher) is not.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "SYNC_OPS"]

SYNC_OPS = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.lift_fresh_copy", "aten.nonzero",
            "aten.masked_select")
_COPIES = ("aten._to_copy", "aten.copy_", "aten.copy")


def _devices(values: Iterable) -> set[str]:
    return {v.device.type for v in values if isinstance(v, torch.Tensor)}


class SyncCounter(TorchDispatchMode):
    """Counts the syncing ops (``SYNC_OPS`` and host-device copies) by name, in ``counts`` (all of them) and, inside
    ``with counter.scope(name):`` blocks, in ``scoped[name]``; ``ops`` counts every op seen in a scope."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.scoped: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.ops: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._scopes: list[str] = []

    @contextlib.contextmanager
    def scope(self, name: str):
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func._schema.name.replace("::", ".")  # aten.add for every overload of aten::add
        for scope in self._scopes[-1:]:
            self.ops[scope][name] += 1
        if self._syncs(name, args, kwargs, result):
            self.counts[name] += 1
            for scope in self._scopes[-1:]:
                self.scoped[scope][name] += 1
        return result

    @staticmethod
    def _syncs(name: str, args, kwargs, result) -> bool:
        if name in SYNC_OPS:
            return True
        if name not in _COPIES:
            return False
        sources = _devices(args[1:2] if name != "aten._to_copy" else args[:1])
        targets = _devices([result] if name == "aten._to_copy" else args[:1])
        if name == "aten._to_copy" and "device" in kwargs and kwargs["device"] is not None:
            targets = {torch.device(kwargs["device"]).type}
        return len(sources | targets) > 1 and "cpu" in sources | targets

    def in_scope(self, scope: str) -> int:
        """The syncs counted inside ``scope``."""
        return sum(self.scoped[scope].values())
