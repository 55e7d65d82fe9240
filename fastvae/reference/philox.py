"""Philox 4x32-10 and the normal noise of Triton's ``tl.randn``, written from the definition.

A round maps the counter ``(c0, c1, c2, c3)`` with key ``(k0, k1)`` to
``(hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0))``, where ``hi`` and ``lo`` are the upper
and lower 32 bits of the 64-bit product; then the key grows by ``(KEY_A, KEY_B)`` mod 2**32. Ten rounds.
Triton's ``randint4x(seed, offset)`` starts from the counter ``(offset_lo, offset_hi, 0, 0)`` and the
key ``(seed_lo, seed_hi)``.

Words are uint32 values held in int64 tensors. Only tensor ops touch the seed, so it may live on any
device (nothing is read back to the host).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["philox_uint32", "philox_randn"]

M32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10
INT32_TO_UNIFORM = 4.6566127342e-10  # the largest scale with (2**31 - 1) * scale < 1 in float32
MIN_UNIFORM = 1.0e-7


def _mulhilo(multiplier: int, word: Tensor) -> tuple[Tensor, Tensor]:
    """The upper and lower 32 bits of ``multiplier * word``. The product is below 2**64, and int64
    multiplication wraps modulo 2**64, so the tensor holds its 64 bits (perhaps as a negative number)."""
    product = word * multiplier
    return (product >> 32) & M32, product & M32


def philox_uint32(seed: Tensor | int, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox 4x32-10 of counter ``(offset_lo, offset_hi, 0, 0)`` and key ``(seed_lo, seed_hi)``.

    ``seed``: a one-element integer tensor (or an int) in ``[0, 2**63)``; ``offsets``: int64 tensor of
    counters (>= 0). Returns four int64 tensors of uint32 values, of the shape of ``offsets``: the words
    of Triton's ``randint4x(seed, offsets)``.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(()).to(offsets.device)
    k0, k1 = seed & M32, (seed >> 32) & M32
    c0, c1 = offsets & M32, (offsets >> 32) & M32
    c2, c3 = torch.zeros_like(offsets), torch.zeros_like(offsets)
    for _ in range(ROUNDS):
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def uniform_from_word(word: Tensor) -> Tensor:
    """Triton's ``uint_to_uniform_float``: the word as an int32, folded to its magnitude (``~c`` for
    negative ``c``, that is ``2**32 - 1 - word`` for words from ``2**31``), times ``4.6566127342e-10``,
    in float32: a value in ``[0, 1)``."""
    folded = torch.where(word >= 2**31, M32 - word, word)
    return folded.to(torch.float32) * torch.tensor(INT32_TO_UNIFORM, dtype=torch.float32)


def philox_randn(seed: Tensor | int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Standard normal float32 noise of ``shape``: element ``i`` (flat, row-major) is ``tl.randn(seed, i)``.

    Box-Muller on the first two Philox words ``(c0, c1)``, every step and constant in float32:
    ``u0, u1 = uniform_from_word(c0, c1)``, ``eps = sqrt(-2 log(max(u0, 1e-7))) * cos(2 pi u1)``.
    """
    offsets = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    c0, c1, _, _ = philox_uint32(seed, offsets)
    u0 = torch.clamp_min(uniform_from_word(c0), MIN_UNIFORM)
    u1 = uniform_from_word(c1)
    two_pi = torch.tensor(2 * math.pi, dtype=torch.float32)
    return (torch.sqrt(-2.0 * torch.log(u0)) * torch.cos(two_pi * u1)).reshape(shape)
