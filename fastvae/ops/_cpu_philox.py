"""The Philox stream of ``tl.randn`` for the CPU engine: ``fastvae.reference.philox_randn``, fast.

The integer part (10 Philox rounds, then the fold to a uniform in float32) runs as one loop compiled
with numba when numba is installed (``pip install fastvae[cpu]``): about 1.6 ns an element on one core,
less than ``torch.randn``. Box-Muller's ``log``, ``sqrt`` and ``cos`` then run as PyTorch's vectorized
ops. Without numba (or on a device other than the CPU) the words come from PyTorch integer ops written
for few dispatches: ten times slower, the same bits. The compiled loop is cached on disk by numba.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
import math
import sys
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..reference.philox import INT32_TO_UNIFORM, KEY_A, KEY_B, M32, MIN_UNIFORM, ROUND_A, ROUND_B, ROUNDS

_TWO_PI = 2 * math.pi


# ------------------------------------------------------------------------------------ numba loop
_M32, _H32, _S32 = np.uint64(M32), np.uint64(2**31), np.uint64(32)
_RA, _RB, _KA, _KB = np.uint64(ROUND_A), np.uint64(ROUND_B), np.uint64(KEY_A), np.uint64(KEY_B)
_SCALE, _TINY = np.float32(INT32_TO_UNIFORM), np.float32(MIN_UNIFORM)
_TWO_PI32, _ZERO = np.float32(_TWO_PI), np.uint64(0)


def _uniforms_loop(seed_lo, seed_hi, start, u0, u1):
    """``u0[i] = max(uniform(c0), 1e-7)``, ``u1[i] = 2 pi uniform(c1)`` of Philox counter ``start + i``,
    float32; compiled by numba (uint64 holds every 32x32-bit product exactly)."""
    for i in range(u0.shape[0]):
        counter = np.uint64(start + i)
        c0, c1, c2, c3 = counter & _M32, counter >> _S32, _ZERO, _ZERO
        k0, k1 = seed_lo, seed_hi
        for _ in range(ROUNDS):
            pa, pb = _RA * c0, _RB * c2
            c0, c1, c2, c3 = (pb >> _S32) ^ c1 ^ k0, pb & _M32, (pa >> _S32) ^ c3 ^ k1, pa & _M32
            k0, k1 = (k0 + _KA) & _M32, (k1 + _KB) & _M32
        f0 = _M32 - c0 if c0 >= _H32 else c0  # the int32 fold: ~c for negative c
        f1 = _M32 - c1 if c1 >= _H32 else c1
        a = np.float32(np.int32(f0)) * _SCALE
        u0[i] = a if a > _TINY else _TINY
        u1[i] = (np.float32(np.int32(f1)) * _SCALE) * _TWO_PI32


@functools.lru_cache(maxsize=1)
def _compiled() -> Optional[Callable]:
    """The numba loop, compiled for its one signature, or None without numba (or when it fails)."""
    try:
        import numba
    except ImportError:
        return None
    error = None
    for cache in (True, False):  # no writable cache folder (a read-only install): compile in memory
        try:
            loop = numba.njit(cache=cache, nogil=True)(_uniforms_loop)
            probe = np.empty(1, np.float32)
            loop(np.uint64(0), np.uint64(0), 0, probe, probe.copy())
            return loop
        except Exception as failure:  # a broken numba install must not break the ops
            error = failure
    warnings.warn(f"fastvae: numba failed to compile the CPU Philox loop ({error!r}); using PyTorch integer ops")
    return None


_PARALLEL_MIN = 1 << 17  # below this many elements a second thread costs more than it saves


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastvae-philox")


def _run_loop(loop: Callable, seed: int, u: np.ndarray) -> None:
    """Fill ``u`` (2, n): the loop releases the GIL, so ``torch.get_num_threads()`` threads share the
    counters in contiguous chunks (the result does not depend on the split)."""
    lo, hi = np.uint64(seed & M32), np.uint64(seed >> 32)
    n = u.shape[1]
    workers = min(torch.get_num_threads(), n // _PARALLEL_MIN) if n >= 2 * _PARALLEL_MIN else 1
    if workers <= 1:
        loop(lo, hi, 0, u[0], u[1])
        return
    bounds = [n * k // workers for k in range(workers + 1)]
    jobs = [_pool(workers).submit(loop, lo, hi, a, u[0, a:b], u[1, a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
    loop(lo, hi, 0, u[0, :bounds[1]], u[1, :bounds[1]])
    for job in jobs:
        job.result()


def numba_available() -> bool:
    """Whether the CPU engine draws its noise with the numba loop."""
    return _compiled() is not None


def philox_randn(seed: Tensor, shape: torch.Size | tuple[int, ...], device: torch.device) -> Tensor:
    """``fastvae.reference.philox_randn(seed, shape, device)``, the same bits, fast on the CPU."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    loop = _compiled() if device.type == "cpu" and seed.device.type == "cpu" else None
    n = math.prod(shape)
    if loop is None:
        u = _torch_uniforms(seed, n, device)
    else:
        u = torch.empty((2, n), dtype=torch.float32)
        _run_loop(loop, seed.item(), u.numpy())  # a one-element int64 tensor
    u0, u1 = u
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
