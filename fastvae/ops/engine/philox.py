"""The Philox stream of ``tl.randn`` for the CPU engine: ``fastvae.reference.philox_randn``, fast.

With numba (a dependency of fastvae) the noise comes from ``loops``'s compiled loop:
the spec's Philox words and float32 uniforms bit for bit, Box-Muller's ``log``, ``cos`` and ``sqrt`` in
vectorized float32 polynomials (within 4 ulp of the spec's float32 ``torch.log``/``torch.cos``), about 2 ns an
element on one core, less than ``torch.randn``. Without numba (or on a device other than the CPU, or when
numba fails: one warning) the words come from PyTorch integer ops written for few dispatches and
Box-Muller from PyTorch's float32 ops: the spec's bits, at about 55 ns an element, 25 times slower.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ...reference.philox import INT32_TO_UNIFORM, KEY_A, KEY_B, M32, MIN_UNIFORM, ROUND_A, ROUND_B, ROUNDS

_TWO_PI = 2 * math.pi


# ------------------------------------------------------------------------------------ numba loops
def _probe(loops: ModuleType) -> None:
    """Compile every loop once (numba caches the machine code on disk) on a tiny input."""
    loops.normal_loop(1, 0, 1, np.empty(1, np.float32))
    row, sums = np.zeros((1, 1), np.float32), np.empty(1)
    lo, hi = np.float32(-1), np.float32(1)
    loops.reparameterize_kl_rows(row.ctypes.data, 1, row.ctypes.data, 1, 1, 1, 1, 0, 1, True, lo, hi, True, row.copy(),
                                 True, row.copy(), True, sums, True, row.copy(), True, 1.0, np.empty(1, np.float32))
    at = row.ctypes.data
    loops.reparameterize_kl_rows_backward(at, 1, row, at, 1, at, 1, 1, 1, 0, 1, True, lo, hi, True, True, row.copy(),
                                          row.copy(), True, at, 1)
    loops.reparameterize_kl_pixels(at, 1, 1, at, 1, 1, 1, 1, 1, 1, 0, 1, True, lo, hi, True, row.copy(), True,
                                   row.copy(), True, sums, True, row.copy(), True, 1.0, np.empty(1, np.float32))
    loops.reparameterize_kl_pixels_backward(at, 1, 1, at, 1, 1, np.zeros(1, np.float32), at, 1, 1, at, 1, 1, 1, 1, 1, 0,
                                            1, True, lo, hi, True, True, True, row.copy(), row.copy(), True, at, 1, 1)
    loops.scaled_total(sums, 1.0, np.empty(1, np.float32))
    cube = np.zeros((1, 1, 1), np.float32)
    loops.column_moments(cube, 0, cube, True, row.copy(), row.copy())
    column = np.zeros(1, np.float32)
    loops.rows_variance_law_backward(column, column, row, column, row, row.copy(), row.copy())


@functools.lru_cache(maxsize=1)
def compiled() -> Optional[ModuleType]:
    """The compiled loops (the module ``loops``, every loop probed once), or None without numba or when
    it fails (one warning: the engine then runs on PyTorch ops)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return None
    try:
        from . import loops
        _probe(loops)
    except Exception as error:  # a broken numba install must not break the ops
        warnings.warn(f"fastvae: numba failed to compile the CPU loops ({error!r}); using PyTorch ops")
        return None
    return loops


def numba_available() -> bool:
    """Whether the CPU engine runs the numba loops."""
    return compiled() is not None


PARALLEL_MIN = 1 << 16
"""Below this many elements a second thread costs more than it saves."""

DRAWING_PARALLEL_MIN = 1 << 15
"""The same for the loops that draw the noise (~4 ns an element on one core, several times the others): a second
thread pays for waking it from 2 x this many elements on (measured on a 2-core Xeon: 0.94x -> 0.86x eager at
65536 elements, and no gain below)."""


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastvae-cpu")


if hasattr(os, "register_at_fork"):  # a forked child (a DataLoader worker) has none of the parent's threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def split(loop: Callable[[int, int], None], units: int, elements: int, draws: bool = False) -> bool:
    """``loop(a, b)`` over ``[0, units)`` in contiguous chunks, on up to ``torch.get_num_threads()`` threads
    when there are ``elements`` enough, ``PARALLEL_MIN`` a thread (``DRAWING_PARALLEL_MIN`` for a loop that ``draws``
    the noise); the loops release the GIL, and their results do not depend on the split.
    Whether it split (else one call ran ``loop(0, units)``)."""
    workers = min(torch.get_num_threads(), elements // (DRAWING_PARALLEL_MIN if draws else PARALLEL_MIN), units)
    if workers <= 1:
        loop(0, units)
        return False
    bounds = [units * k // workers for k in range(workers + 1)]
    jobs = [_pool(workers).submit(loop, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    loop(0, bounds[1])
    for job in jobs:
        job.result()
    return True


def philox_randn(seed: Tensor, shape: torch.Size | tuple[int, ...], device: torch.device) -> Tensor:
    """``fastvae.reference.philox_randn(seed, shape, device)``, fast on the CPU (see the module's docstring)."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    compiled_loops = compiled() if device.type == "cpu" and seed.device.type == "cpu" else None
    n = math.prod(shape)
    if compiled_loops is not None:
        eps = torch.empty(n, dtype=torch.float32)
        out, seed_value = eps.numpy(), seed.item()
        split(lambda a, b: compiled_loops.normal_loop(seed_value, a, b, out), n, n, draws=True)
        return eps.view(shape)
    u0, u1 = _torch_uniforms(seed, n, device)
    return u0.log_().mul_(-2.0).sqrt_().mul_(u1.cos_()).view(shape)


# ---------------------------------------------------------------------- PyTorch integer fallback
# Written for few ATen ops, as each costs microseconds of dispatch: the four 32-bit lanes travel as
# two stacked (2, N) tensors, so one op serves two lanes, and a round is 4 ops. Words are uint32 bit
# patterns, in int64 (zero-extended) or in int32 (as they are).
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)  # where the halves of an int64 lie in memory


def _constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """The round multipliers ``[[A], [B]]`` (2, 1) and the key bumps ``[r KEY_A, r KEY_B]`` of round
    ``r`` (rounds, 2), int64, made by ops on ``device`` (no host-to-device copy to wait on)."""
    lane = torch.arange(2, dtype=torch.int64, device=device)
    multipliers = torch.where(lane == 0, ROUND_A, ROUND_B).unsqueeze(1)
    rounds = torch.arange(ROUNDS, dtype=torch.int64, device=device).unsqueeze(1)
    return multipliers, rounds * torch.where(lane == 0, KEY_A, KEY_B)


def _words(t: Tensor) -> tuple[Tensor, Tensor]:
    """The low and high 32-bit words of the int64 ``t`` (last dim contiguous), as int32 views."""
    w = t.view(torch.int32)
    return w[..., _LO::2], w[..., _HI::2]


def _torch_uniforms(seed: Tensor, n: int, device: torch.device) -> Tensor:
    """``(2, n)`` float32: ``max(uniform(c0), 1e-7)`` and ``2 pi uniform(c1)`` of counters ``0 .. n-1``."""
    multipliers, bumps = _constants(device)
    seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    keys = _words(bumps + torch.stack((seed & M32, seed >> 32)))[0]  # (rounds, 2) int32: the keys of all rounds
    k0s, k1s = (k.unbind(0) for k in keys.unbind(1))
    offsets = torch.arange(n, dtype=torch.int64, device=device)
    x = torch.zeros((2, n), dtype=torch.int64, device=device)  # (c0, c2); only low words are written
    torch.bitwise_and(offsets, M32, out=x[0])
    x0, x2 = _words(x)[0]
    # Two product buffers alternate: a round reads the low words of the last one, (c3, c1), which
    # before the first round are (0, offset_hi).
    prods = torch.empty((2, 2, n), dtype=torch.int64, device=device).unbind(0)
    lo_words, hi_words = zip(*(_words(q) for q in prods))
    prods[1][0].zero_()
    torch.bitwise_right_shift(offsets, 32, out=prods[1][1])
    t = torch.empty((2, n), dtype=torch.int32, device=device)
    t0, t1 = t
    for r in range(ROUNDS):
        now, last = r % 2, 1 - r % 2
        torch.mul(x, multipliers, out=prods[now])  # (A c0, B c2), exact modulo 2**64
        torch.bitwise_xor(hi_words[now], lo_words[last], out=t)  # (hi(A c0) ^ c3, hi(B c2) ^ c1)
        torch.bitwise_xor(t1, k0s[r], out=x0)  # the new c0
        torch.bitwise_xor(t0, k1s[r], out=x2)  # the new c2
    c = torch.stack((x0, lo_words[now][1]))  # (c0, c1) as int32
    c ^= c >> 31  # the fold: ~c where c < 0, c elsewhere
    u = c.to(torch.float32).mul_(INT32_TO_UNIFORM)
    u[0].clamp_min_(MIN_UNIFORM)
    u[1].mul_(_TWO_PI)
    return u
