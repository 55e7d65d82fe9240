"""``flushed_denormals()``: subnormal floats flushed to zero on the CPU while a run trains, in every thread that
computes for torch.

Why: x86 CPUs compute an instruction with a subnormal operand or result 10-100x slower than one with normal
floats, and Adam makes subnormals that never leave: a weight whose gradient is exactly zero (a pixel that is 0 in
the whole batch, a ReLU unit dead for it) has its first moment multiplied by ``beta1 = 0.9`` at every step, down
through the subnormal range to the smallest subnormal, where ``0.9 x`` rounds back to ``x``. After two epochs of the
dense 784-256-64-32-16 VAE on Fashion-MNIST (batch 128) 116k of the first layer's 201k first moments were
subnormal, and the eager fp32 loop's epochs took 1.43, 1.82 and 2.06 s against 1.41, 1.44 and 1.42 s with
subnormals flushed (Intel Xeon with AMX, 2 threads; the bench's ``tensors`` and ``tensors-ftz`` loops measure it on
each machine). Flushing changes a result only where a value below 1.2e-38 (float32) would have survived: it
becomes 0.

How: ``torch.set_flush_denormal`` sets the FTZ and DAZ bits of the MXCSR register of the thread that calls it, and
each thread has its own register. Threads created later copy their creator's, so torch's OpenMP threads made before
the call keep theirs: ``set_flush_denormal`` below also runs it inside one parallel region of torch's OpenMP
runtime (``GOMP_parallel`` of the ``libgomp`` in torch's folder), where each of the pool's threads calls it. Where torch
does not run on libgomp (another runtime, another platform) only the calling thread and the threads it creates
later are set, and ``set_flush_denormal`` says so by returning ``"this thread"``.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

import torch

__all__ = ["flushed_denormals", "set_flush_denormal", "flushing_denormals"]

_PARALLEL_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def flushing_denormals() -> bool:
    """Whether this thread flushes subnormals now: the smallest positive float32 times 1 comes out 0."""
    smallest = torch.ones((), dtype=torch.int32).view(torch.float32)  # bits 0x00000001: 1.4e-45
    return bool(smallest * 1.0 == 0)


def _openmp_library():
    """torch's own ``libgomp`` (the one loaded from torch's folder; other packages may load another copy, whose
    threads are not torch's pool), or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        return None
    folder = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    own = [path for path in paths if os.path.realpath(path).startswith(folder)]
    for path in own or (paths if len(paths) == 1 else ()):
        try:
            library = ctypes.CDLL(path)
            library.GOMP_parallel.argtypes = [_PARALLEL_REGION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            return library
        except (OSError, AttributeError):
            continue
    return None


def set_flush_denormal(mode: bool) -> str:
    """``torch.set_flush_denormal(mode)`` in this thread and in every thread of torch's OpenMP pool: ``"all
    threads"``, ``"this thread"`` (no libgomp to reach the pool through) or ``"unsupported"`` (a CPU without the
    flags, where nothing changed)."""
    if not torch.set_flush_denormal(mode):
        return "unsupported"
    library = _openmp_library()
    if library is None:
        return "this thread"
    failed = []

    def each_thread(_):
        failed.append(not torch.set_flush_denormal(mode))

    region = _PARALLEL_REGION(each_thread)  # kept alive until GOMP_parallel returns
    library.GOMP_parallel(region, None, torch.get_num_threads(), 0)
    return "this thread" if any(failed) else "all threads"


@contextlib.contextmanager
def flushed_denormals(flush: bool = True):
    """Within the block subnormals are flushed to zero (``flush``) or kept (IEEE arithmetic), in this thread and its
    OpenMP pool (``set_flush_denormal``); afterwards both are as this thread was before. Yields what
    ``set_flush_denormal`` reached. OpenMP keeps a pool per thread that starts parallel work, so from any thread
    this sets the pool that thread's torch ops use."""
    before = flushing_denormals()
    reached = set_flush_denormal(flush)
    try:
        yield reached
    finally:
        if reached != "unsupported":
            set_flush_denormal(before)
