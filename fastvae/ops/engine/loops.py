"""The engine's compiled loops for the CPU (numba): the noise of ``tl.randn``, and ``reparameterize_kl`` in one pass
forward and one pass backward.

Imported only through ``philox.compiled()``, which falls back to PyTorch ops when numba is missing or
fails. Every loop is written so that LLVM vectorizes it (16 float32 lanes with AVX-512): no calls inside, only
arithmetic and selects, and few arrays per loop. That is why ``log``, ``cos`` and ``exp`` are written out here
(Cephes' float32 range reductions and polynomials): numba's ``math.log`` is a scalar libm call, and no loop
around it vectorizes.

**Accuracy.** The Philox words and the float32 uniforms are the spec's bit for bit. Everything after them is
float32, as in the spec, with ``log``, ``cos`` and ``exp`` each within 2 ulp: ``eps`` lands within 4 ulp of
the spec's (the tests; at most 3 over 2**20 draws), ``z``, the KL and the gradients within the float32
tolerances of the tests. Each row's KL is summed in float64.

Shapes: the latents come as ``(rows, E)`` float32 rows, each of ``E`` contiguous elements; ``reparameterize_kl``'s
loops read them in place, at the address of row 0 and a row stride (so the halves of ``h.chunk(2, dim=1)`` need no
copy), and write C-contiguous ``(rows, E)`` arrays. Row ``r`` draws the noise of flat elements
``r E .. (r + 1) E - 1``, and each call takes a range of rows, so that rows may be split over threads without
changing a bit.

Vector width: every loop asks LLVM for 512-bit vectors (``_wide_vectors``), which it otherwise avoids on Intel's
AVX-512 CPUs (the noise: 4.6 -> 3.1 ns an element on a Sapphire Rapids-class Xeon, the same bits).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from ...reference.philox import INT32_TO_UNIFORM, KEY_A, KEY_B, M32, MIN_UNIFORM, ROUND_A, ROUND_B, ROUNDS


def _jit(function=None, **options):
    """``numba.njit(cache=True, nogil=True)``; in memory when no cache folder is writable."""
    def wrap(f):
        try:
            return numba.njit(cache=True, nogil=True, error_model="numpy", **options)(f)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, error_model="numpy", **options)(f)
    return wrap if function is None else wrap(function)


def _bitcast(source, target):
    @intrinsic
    def cast(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))
        return target(source), codegen
    return cast


@intrinsic
def _wide_vectors(typingctx):
    """Mark the function this is called in (after numba's inlining: the loop that calls it) with LLVM's
    ``"prefer-vector-width"="512"``: on CPUs where LLVM prefers 256-bit vectors although AVX-512 is there (Intel's
    since Skylake-X), its loops then vectorize on 512-bit registers, 16 float32 lanes; elsewhere it changes
    nothing (LLVM caps the width at the widest the CPU has). ``FunctionAttributes`` takes only LLVM's enumerated
    attributes, so the string attribute goes in through ``set.add``."""
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _float32_at(typingctx, address):
    """The float32 pointer at an integer address (a tensor's ``data_ptr()``)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))
    return types.CPointer(types.float32)(types.int64), codegen


@_jit(inline="always")
def _part_at(address, stride, r, parts, E):
    """Part ``r % parts`` (``E`` elements) of row ``r // parts`` of rows ``stride`` elements apart (``_row_at``)."""
    return numba.carray(_float32_at(address + ((r // parts) * stride + (r % parts) * E) * 4), E)


@_jit(inline="always")
def _row_at(address, stride, r, E):
    """Row ``r`` of float32 rows of ``E`` contiguous elements, ``stride`` elements apart from ``address`` on: a
    C-contiguous array over that memory (the halves of ``h.chunk(2, dim=1)`` read in place)."""
    return numba.carray(_float32_at(address + r * stride * 4), E)


_bits32 = _bitcast(types.float32, types.int32)
"""The bits of a float32 as an int32."""
_from_bits32 = _bitcast(types.int32, types.float32)
"""The float32 whose bits are the int32."""


# ------------------------------------------------------------------------------------------ Philox
_M32, _H32, _S32 = np.uint64(M32), np.uint64(2**31), np.uint64(32)
_RA, _RB, _KA, _KB = np.uint64(ROUND_A), np.uint64(ROUND_B), np.uint64(KEY_A), np.uint64(KEY_B)
_SCALE, _TINY = np.float32(INT32_TO_UNIFORM), np.float32(MIN_UNIFORM)
_TWO_PI32, _ZERO, _STEP1 = np.float32(2 * math.pi), np.uint64(0), np.uint64(1)


@_jit(inline="always")
def _seed_words(seed):
    """The low and high 32-bit words of an int64 seed, as uint64 keys."""
    return np.uint64(seed) & _M32, (np.uint64(seed) >> _S32) & _M32


@_jit(inline="always")
def _uniforms(counter, seed_lo, seed_hi):
    """``(max(uniform(c0), 1e-7), 2 pi uniform(c1))`` in float32 for one Philox counter (uint64), as
    ``tl.randn`` forms them: 10 rounds on ``(counter lo, counter hi, 0, 0)``, each word folded to an int32
    magnitude and scaled. uint64 holds every 32x32-bit product exactly."""
    c0, c1, c2, c3 = counter & _M32, counter >> _S32, _ZERO, _ZERO
    k0, k1 = seed_lo, seed_hi
    for _ in range(ROUNDS):
        pa, pb = _RA * c0, _RB * c2
        c0, c1, c2, c3 = (pb >> _S32) ^ c1 ^ k0, pb & _M32, (pa >> _S32) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + _KA) & _M32, (k1 + _KB) & _M32
    f0 = _M32 - c0 if c0 >= _H32 else c0  # the int32 fold: ~c for negative c
    f1 = _M32 - c1 if c1 >= _H32 else c1
    u0 = np.float32(np.int32(f0)) * _SCALE
    return (u0 if u0 > _TINY else _TINY), (np.float32(np.int32(f1)) * _SCALE) * _TWO_PI32


# ------------------------------------------------------------------- log, cos, exp for the vectorizer
# float32 throughout (16 lanes to a 512-bit vector): every constant is a float32, as one float64 operand
# would turn the whole expression into float64. Polynomials and reductions after Cephes' logf, sinf,
# cosf and expf (S. Moshier), each within 2 ulp.
_F = np.float32
_MANTISSA32, _ONE32 = np.int32((1 << 23) - 1), np.int32(127 << 23)
_SQRT2_32, _HALF, _ONE = _F(math.sqrt(2.0)), _F(0.5), _F(1.0)
_LN2_HI32, _LN2_LO32 = _F(0.693359375), _F(-2.12194440e-4)  # k LN2_HI32 exact for |k| < 2**15
_LOG_P = tuple(_F(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                               1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                               3.3333331174e-1))
_PIO2_A, _PIO2_B, _PIO2_C = _F(1.5703125), _F(4.837512969970703125e-4), _F(7.54978995489188216e-8)  # sum: pi/2
_TWO_OVER_PI = _F(2 / math.pi)
_SIN_P = tuple(_F(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1))
_COS_P = tuple(_F(c) for c in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2))
_LOG2E = _F(1 / math.log(2.0))
_EXP_P = tuple(_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                               1.6666665459e-1, 5.0000001201e-1))
_EXP_MAX, _EXP_MIN = _F(100.0), _F(-110.0)  # beyond float32's exp range on either side


@_jit(inline="always")
def _log(x):
    """``log(x)`` for a positive normal float32: ``x = m 2^e``, ``m`` in ``[sqrt(1/2), sqrt(2))``, ``f = m - 1``,
    ``log(1 + f) = f - f^2 / 2 + f^3 P(f)``, ``e ln 2`` added in two parts."""
    bits = _bits32(x)
    e = (bits >> 23) - np.int32(127)
    m = _from_bits32((bits & _MANTISSA32) | _ONE32)
    big = m > _SQRT2_32
    m = m * _HALF if big else m
    e = e + np.int32(1) if big else e
    f = m - _ONE
    z = f * f
    p = _LOG_P[0]
    for c in _LOG_P[1:]:
        p = p * f + c
    ef = _F(e)
    y = f * z * p + ef * _LN2_LO32 - _HALF * z
    return f + y + ef * _LN2_HI32


@_jit(inline="always")
def _cos(x):
    """``cos(x)`` for float32 ``0 <= x <= 2 pi``: ``x = k pi/2 + r`` (``|r| <= pi/4``, pi/2 in three parts),
    then Cephes' ``cos r`` or ``sin r`` polynomial and the quadrant's sign."""
    k = np.floor(x * _TWO_OVER_PI + _HALF)
    r = ((x - k * _PIO2_A) - k * _PIO2_B) - k * _PIO2_C
    z = r * r
    c = (_COS_P[0] * z + _COS_P[1]) * z + _COS_P[2]
    c = _ONE - _HALF * z + z * z * c
    s = (_SIN_P[0] * z + _SIN_P[1]) * z + _SIN_P[2]
    s = r + r * z * s
    quadrant = np.int32(k) & np.int32(3)
    value = s if quadrant & np.int32(1) else c
    return -value if quadrant == np.int32(1) or quadrant == np.int32(2) else value


@_jit(inline="always")
def _exp(x):
    """``exp(x)`` for any float32: ``x = k ln 2 + r``, Cephes' polynomial for ``e^r``, times ``2^k`` built from
    its bits in two halves (so that overflow gives inf and underflow a subnormal or 0); NaN stays NaN."""
    clipped = x if x < _EXP_MAX else _EXP_MAX  # NaN -> _EXP_MAX, replaced at the end
    clipped = clipped if clipped > _EXP_MIN else _EXP_MIN
    k = np.floor(clipped * _LOG2E + _HALF)
    r = (clipped - k * _LN2_HI32) - k * _LN2_LO32
    p = _EXP_P[0]
    for c in _EXP_P[1:]:
        p = p * r + c
    p = p * (r * r) + r + _ONE
    ki = np.int32(k)
    half = ki >> np.int32(1)
    value = p * _from_bits32((half + np.int32(127)) << np.int32(23)) * _from_bits32(
        (ki - half + np.int32(127)) << np.int32(23))
    return value if x == x else x


@_jit(inline="always")
def _normal(counter, seed_lo, seed_hi):
    """``tl.randn(seed, counter)``: Box-Muller on the uniforms, every step in float32."""
    u0, theta = _uniforms(counter, seed_lo, seed_hi)
    return math.sqrt(_F(-2.0) * _log(u0)) * _cos(theta)


@_jit
def normal_loop(seed, first, end, out):
    """``out[i] = _normal(i)`` for ``first <= i < end``: the noise alone (``philox_randn``), int64 seed."""
    _wide_vectors()
    seed_lo, seed_hi = _seed_words(seed)
    for i in range(first, end):
        out[i] = _normal(np.uint64(i), seed_lo, seed_hi)


@_jit(fastmath={"reassoc"})
def _row_sum(values):
    """The float64 sum of a float32 row, in any order (so that it vectorizes): deterministic for one build."""
    _wide_vectors()
    total = 0.0
    for v in values:
        total += np.float64(v)
    return total


@_jit
def scaled_total(sums, scale, out):
    """``out[0] = scale * sum(sums)``, the float64 values added in order, rounded once into ``out``: the batch KL
    from the rows' sums, the same bits however the rows were split over threads."""
    total = 0.0
    for v in sums:
        total += v
    out[0] = total * scale


# ------------------------------------------------------------------------------ reparameterize_kl
@_jit(inline="always")
def _clamped(logvar, clamp, lo, hi):
    """torch.clamp(logvar, lo, hi) when ``clamp`` (NaN stays NaN)."""
    if not clamp:
        return logvar
    return lo if logvar < lo else (hi if logvar > hi else logvar)


# Each inner loop below reads and writes few arrays, and every branch on an argument sits outside the inner loops:
# LLVM vectorizes a loop only when it can check at run time that its arrays do not overlap (it gives up beyond a
# handful of such checks) and when its body has no control flow it cannot turn into selects.
@_jit(inline="always")
def _z_row(mu, logvar, clamp, lo, hi, first, step, seed_lo, seed_hi, z):
    """``z[j] = mu[j] + exp(logvar[j] / 2) eps(first + j step)`` over one row (``step``: 1 along a row of the logical
    order, the pixels' count ``P`` along a pixel's channels)."""
    for j in range(mu.shape[0]):
        std = _exp(_HALF * _clamped(logvar[j], clamp, lo, hi))
        z[j] = mu[j] + std * _normal(first + np.uint64(j) * step, seed_lo, seed_hi)


@_jit(inline="always")
def _z_eps_row(mu, logvar, clamp, lo, hi, first, step, seed_lo, seed_hi, z, eps):
    """``_z_row``, and the noise it drew in ``eps``."""
    for j in range(mu.shape[0]):
        std = _exp(_HALF * _clamped(logvar[j], clamp, lo, hi))
        e = _normal(first + np.uint64(j) * step, seed_lo, seed_hi)
        eps[j] = e
        z[j] = mu[j] + std * e


@_jit(inline="always")
def _z_kl_row(mu, logvar, clamp, lo, hi, first, step, seed_lo, seed_hi, want_eps, z, eps, terms):
    """``_z_row`` (``_z_eps_row`` when ``want_eps``) and ``_kl_row`` in one pass, ``std`` computed once."""
    if want_eps:
        for j in range(mu.shape[0]):
            m, lv = mu[j], _clamped(logvar[j], clamp, lo, hi)
            std = _exp(_HALF * lv)
            e = _normal(first + np.uint64(j) * step, seed_lo, seed_hi)
            eps[j] = e
            z[j] = m + std * e
            terms[j] = _HALF * ((m * m + std * std) - lv - _ONE)
    else:
        for j in range(mu.shape[0]):
            m, lv = mu[j], _clamped(logvar[j], clamp, lo, hi)
            std = _exp(_HALF * lv)
            z[j] = m + std * _normal(first + np.uint64(j) * step, seed_lo, seed_hi)
            terms[j] = _HALF * ((m * m + std * std) - lv - _ONE)


@_jit(inline="always")
def _kl_row(mu, logvar, clamp, lo, hi, terms):
    """``terms[j] = ((mu^2 + std^2) - logvar - 1) / 2`` over one row, ``std = exp(logvar / 2)``."""
    for j in range(mu.shape[0]):
        m, lv = mu[j], _clamped(logvar[j], clamp, lo, hi)
        std = _exp(_HALF * lv)
        terms[j] = _HALF * ((m * m + std * std) - lv - _ONE)


@_jit
def reparameterize_kl_rows(mu, mu_stride, logvar, logvar_stride, E, parts, seed, first_row, end_row, clamp, lo, hi,
                           want_z, z, want_terms, terms, want_sums, sums, want_eps, eps, want_total, scale, total):
    """``reparameterize_kl`` on rows ``first_row .. end_row - 1`` of float32 ``(rows, E)`` latents,
    ``std = exp(logvar / 2)``, in float32. The latents are read in place: ``mu`` and ``logvar`` are the addresses of
    their row 0, rows of ``parts E`` contiguous elements ``mu_stride`` and ``logvar_stride`` elements apart, each
    row taken as ``parts`` rows of ``E`` (so that threads may share a single long sample); the rows below are those,
    and the outputs C-contiguous ``(rows, E)`` arrays:

    - ``z[r, j] = mu + std eps`` (``want_z``), and ``eps[r, j]`` the noise drawn (``want_eps``, with ``want_z``),
    - ``terms[r, j] = ((mu^2 + std^2) - logvar - 1) / 2``, the elementwise KL (``want_terms``),
    - ``sums[r] = sum_j terms[r, j]`` in float64 (``want_sums``),
    - ``total[0] = scale * sum_r sums[r]`` (``want_total``, with ``want_sums``, in a call that runs every row):
      ``scaled_total`` without a second call,

    with ``logvar`` clamped to ``[lo, hi]`` (float32) first when ``clamp``. Unused outputs may be empty."""
    _wide_vectors()
    seed_lo, seed_hi = _seed_words(seed)
    scratch = np.empty(E if want_sums else 0, np.float32)
    for r in range(first_row, end_row):
        first = np.uint64(r * E)
        m, lv = _part_at(mu, mu_stride, r, parts, E), _part_at(logvar, logvar_stride, r, parts, E)
        if want_z and (want_terms or want_sums):
            _z_kl_row(m, lv, clamp, lo, hi, first, _STEP1, seed_lo, seed_hi, want_eps, z[r],
                      eps[r if want_eps else 0], terms[r] if want_terms else scratch)
        elif want_z and want_eps:
            _z_eps_row(m, lv, clamp, lo, hi, first, _STEP1, seed_lo, seed_hi, z[r], eps[r])
        elif want_z:
            _z_row(m, lv, clamp, lo, hi, first, _STEP1, seed_lo, seed_hi, z[r])
        elif want_terms:
            _kl_row(m, lv, clamp, lo, hi, terms[r])
        elif want_sums:
            _kl_row(m, lv, clamp, lo, hi, scratch)
        if want_sums:
            sums[r] = _row_sum(scratch)
    if want_total:
        scaled_total(sums, scale, total)


@_jit(inline="always")
def _grad_mu_row(g_z, g_kl, g, elementwise, has_grad_z, m, d_mu):
    """``d_mu[j] = g_z[j] + g_kl m[j]`` (``g_kl`` the row's ``g_kl[j]``, or ``g`` for all), without ``g_z`` when
    it does not flow."""
    E = m.shape[0]
    if elementwise and has_grad_z:
        for j in range(E):
            d_mu[j] = g_z[j] + g_kl[j] * m[j]
    elif elementwise:
        for j in range(E):
            d_mu[j] = g_kl[j] * m[j]
    elif has_grad_z:
        for j in range(E):
            d_mu[j] = g_z[j] + g * m[j]
    else:
        for j in range(E):
            d_mu[j] = g * m[j]


@_jit(inline="always")
def _kl_grad(g, raw, clamp, lo, hi):
    """``(g (std^2 - 1) / 2, std)`` for one element, ``std = exp(clamp(raw) / 2)``."""
    std = _exp(_HALF * _clamped(raw, clamp, lo, hi))
    return _HALF * g * (std * std - _ONE), std


@_jit(inline="always")
def _through_clamp(d, raw, clamp, lo, hi):
    """torch.clamp's rule: ``d`` where ``lo <= raw <= hi`` (or no clamp), zero elsewhere."""
    return d if ((raw >= lo and raw <= hi) or not clamp) else _F(0.0)


@_jit(inline="always")
def _grad_logvar_row(g_z, g_kl, g, elementwise, has_grad_z, saved, eps, raw, clamp, lo, hi, first, step, seed_lo,
                     seed_hi, d_lv):
    """``d_lv[j] = g_kl (std^2 - 1) / 2 + g_z eps std / 2`` through the clamp, ``eps`` read from ``eps`` when
    ``saved``, else drawn from the seed (counters ``first + j step``; ``g_kl``, ``g``, ``elementwise`` as in
    ``_grad_mu_row``)."""
    E = raw.shape[0]
    if not has_grad_z and elementwise:
        for j in range(E):
            d_lv[j] = _through_clamp(_kl_grad(g_kl[j], raw[j], clamp, lo, hi)[0], raw[j], clamp, lo, hi)
    elif not has_grad_z:
        for j in range(E):
            d_lv[j] = _through_clamp(_kl_grad(g, raw[j], clamp, lo, hi)[0], raw[j], clamp, lo, hi)
    elif saved and elementwise:
        for j in range(E):
            d, std = _kl_grad(g_kl[j], raw[j], clamp, lo, hi)
            d_lv[j] = _through_clamp(d + _HALF * g_z[j] * std * eps[j], raw[j], clamp, lo, hi)
    elif saved:
        for j in range(E):
            d, std = _kl_grad(g, raw[j], clamp, lo, hi)
            d_lv[j] = _through_clamp(d + _HALF * g_z[j] * std * eps[j], raw[j], clamp, lo, hi)
    elif elementwise:
        for j in range(E):
            d, std = _kl_grad(g_kl[j], raw[j], clamp, lo, hi)
            e = _normal(first + np.uint64(j) * step, seed_lo, seed_hi)
            d_lv[j] = _through_clamp(d + _HALF * g_z[j] * std * e, raw[j], clamp, lo, hi)
    else:
        for j in range(E):
            d, std = _kl_grad(g, raw[j], clamp, lo, hi)
            e = _normal(first + np.uint64(j) * step, seed_lo, seed_hi)
            d_lv[j] = _through_clamp(d + _HALF * g_z[j] * std * e, raw[j], clamp, lo, hi)


@_jit
def reparameterize_kl_rows_backward(grad_z, grad_z_stride, grad_kl, mu, mu_stride, logvar, logvar_stride, E, seed,
                                    first_row, end_row, clamp, lo, hi, has_grad_z, has_grad_kl, grad_mu, grad_logvar,
                                    saved_eps, eps, eps_stride):
    """The gradients of ``reparameterize_kl_rows`` on rows ``first_row .. end_row - 1``, in float32:

    ``d mu = g_z + g_kl mu``, ``d logvar = g_z eps std / 2 + g_kl (std^2 - 1) / 2``, zero where the clamp
    cut ``logvar`` (torch.clamp's rule), ``eps`` read from ``eps`` (the forward's) when ``saved_eps``, else drawn
    again from the seed. ``grad_z``, ``mu``, ``logvar`` and ``eps`` are read in place, as the forward reads its
    latents: the addresses of row 0 of rows of ``E`` contiguous elements, each with its row stride; ``grad_z`` is read
    only when ``has_grad_z``, ``eps`` only when ``saved_eps``. ``grad_kl`` is a ``(rows or 1, E or 1)`` array: the
    elementwise, per-row or one gradient of the KL, broadcast. ``grad_mu`` and ``grad_logvar``: C-contiguous
    ``(rows, E)``."""
    _wide_vectors()
    seed_lo, seed_hi = _seed_words(seed)
    elementwise = grad_kl.shape[1] > 1
    for r in range(first_row, end_row):
        g_kl = grad_kl[r if grad_kl.shape[0] > 1 else 0]
        g = g_kl[0] if has_grad_kl else _F(0.0)
        g_z = _row_at(grad_z, grad_z_stride, r if has_grad_z else 0, E if has_grad_z else 0)
        _grad_mu_row(g_z, g_kl, g, elementwise, has_grad_z, _row_at(mu, mu_stride, r, E), grad_mu[r])
        _grad_logvar_row(g_z, g_kl, g, elementwise, has_grad_z, saved_eps,
                         _row_at(eps, eps_stride, r if saved_eps else 0, E if saved_eps else 0),
                         _row_at(logvar, logvar_stride, r, E), clamp, lo, hi, np.uint64(r * E), _STEP1, seed_lo,
                         seed_hi, grad_logvar[r])


# ------------------------------------------------------------------ reparameterize_kl on channels_last latents
@_jit(inline="always")
def _pixel_at(address, sample_stride, pixel_stride, b, p, C):
    """The ``C`` contiguous channels of pixel ``p`` of sample ``b`` of float32 latents whose samples are
    ``sample_stride`` and pixels ``pixel_stride`` elements apart from ``address`` on (``_layout.pixel_strides``)."""
    return numba.carray(_float32_at(address + (b * sample_stride + p * pixel_stride) * 4), C)


_PIXEL_BLOCK = 4096
"""The elementwise KL of this many elements (whole pixels) goes through a scratch block in L1 before it is summed."""


@_jit
def reparameterize_kl_pixels(mu, mu_sample, mu_pixel, logvar, logvar_sample, logvar_pixel, C, P, parts, seed,
                             first_unit, end_unit, clamp, lo, hi, want_z, z, want_terms, terms, want_sums, sums,
                             want_eps, eps, want_total, scale, total):
    """``reparameterize_kl_rows`` on ``(B, C, *spatial)`` latents in channels_last memory, read and written in memory
    order: ``mu`` and ``logvar`` are read in place (``_pixel_at``: the halves of ``chunk(2, dim=1)`` of a
    channels_last encoder output), and ``z``, ``terms`` and ``eps`` are C-contiguous ``(B P, C)`` arrays, row
    ``b P + p`` the channels of pixel ``p`` of sample ``b`` (a channels_last tensor's memory). The noise stays that of
    the logical (NCHW) flat index: element ``(b, c, p)`` draws counter ``b C P + c P + p``, ``eps`` bit for bit that of
    ``reparameterize_kl_rows``. A unit is part ``u % parts`` (``P / parts`` pixels) of sample ``u // parts``;
    ``sums[u]`` its KL in float64, summed over blocks of pixels in order; units ``first_unit .. end_unit - 1`` run
    here (threads split the units; the sums do not depend on the split). ``total`` and the flags as in
    ``reparameterize_kl_rows``."""
    _wide_vectors()
    seed_lo, seed_hi = _seed_words(seed)
    step = np.uint64(P)
    block = max(1, _PIXEL_BLOCK // C)
    scratch = np.empty((block if want_sums else 1, C), np.float32)
    flat = scratch.reshape(-1)
    part_pixels = P // parts
    for u in range(first_unit, end_unit):
        b = u // parts
        start = (u % parts) * part_pixels
        end = start + part_pixels
        acc = 0.0
        for p0 in range(start, end, block):
            p1 = min(p0 + block, end)
            for p in range(p0, p1):
                r = b * P + p
                m = _pixel_at(mu, mu_sample, mu_pixel, b, p, C)
                lv = _pixel_at(logvar, logvar_sample, logvar_pixel, b, p, C)
                first = np.uint64(b * C * P + p)
                out = terms[r if want_terms else 0] if want_terms else scratch[p - p0 if want_sums else 0]
                if want_z and (want_terms or want_sums):
                    _z_kl_row(m, lv, clamp, lo, hi, first, step, seed_lo, seed_hi, want_eps, z[r],
                              eps[r if want_eps else 0], out)
                elif want_z and want_eps:
                    _z_eps_row(m, lv, clamp, lo, hi, first, step, seed_lo, seed_hi, z[r], eps[r])
                elif want_z:
                    _z_row(m, lv, clamp, lo, hi, first, step, seed_lo, seed_hi, z[r])
                else:
                    _kl_row(m, lv, clamp, lo, hi, out)
            if want_sums:
                acc += _row_sum(flat[: (p1 - p0) * C])
        if want_sums:
            sums[u] = acc
    if want_total:
        scaled_total(sums, scale, total)


@_jit
def reparameterize_kl_pixels_backward(grad_z, grad_z_sample, grad_z_pixel, grad_kl, grad_kl_sample, grad_kl_pixel,
                                      g_values, mu, mu_sample, mu_pixel, logvar, logvar_sample, logvar_pixel, C, P,
                                      seed, first_row, end_row, clamp, lo, hi, has_grad_z, has_grad_kl, elementwise,
                                      grad_mu, grad_logvar, saved_eps, eps, eps_sample, eps_pixel):
    """``reparameterize_kl_rows_backward`` on channels_last latents in memory order, as
    ``reparameterize_kl_pixels`` reads them: rows ``first_row .. end_row - 1`` of ``B P`` pixels (row ``b P + p``),
    ``grad_z``, ``mu``, ``logvar``, ``eps`` and an elementwise ``grad_kl`` (``elementwise``) read in place at their
    sample and pixel strides, ``grad_mu`` and ``grad_logvar`` C-contiguous ``(B P, C)``; ``g_values`` the gradient
    of a reduced KL, one per sample (``B``) or one for all (``1``). The noise drawn again (no ``saved_eps``) is that
    of the logical flat index."""
    _wide_vectors()
    seed_lo, seed_hi = _seed_words(seed)
    step = np.uint64(P)
    for r in range(first_row, end_row):
        b, p = r // P, r % P
        g = g_values[b if g_values.shape[0] > 1 else 0] if has_grad_kl and not elementwise else _F(0.0)
        g_z = _pixel_at(grad_z, grad_z_sample, grad_z_pixel, b, p, C if has_grad_z else 0)
        g_kl = _pixel_at(grad_kl, grad_kl_sample, grad_kl_pixel, b, p, C if elementwise else 0)
        _grad_mu_row(g_z, g_kl, g, elementwise, has_grad_z, _pixel_at(mu, mu_sample, mu_pixel, b, p, C), grad_mu[r])
        _grad_logvar_row(g_z, g_kl, g, elementwise, has_grad_z, saved_eps,
                         _pixel_at(eps, eps_sample, eps_pixel, b, p, C if saved_eps else 0),
                         _pixel_at(logvar, logvar_sample, logvar_pixel, b, p, C), clamp, lo, hi,
                         np.uint64(b * C * P + p), step, seed_lo, seed_hi, grad_logvar[r])


# ------------------------------------------------------------------------------ moments, variance_law
@_jit
def column_moments(z, correction, logvar, with_logvar, mean, var):
    """Per-column ``mean`` and ``var`` (divisor ``N - correction``) of each ``(N, C)`` slab of float32 ``(A, N, C)``
    ``z`` (C-contiguous), into float32 ``(A, C)``; with ``with_logvar``, ``var`` also gets the column means of
    ``exp(logvar)`` (``logvar`` as ``z``): the law of total variance. Two passes accumulated in float64, the mean
    and then the squares of the deviations from it (stable when ``|mean| >> std``), in a fixed order."""
    _wide_vectors()
    A, N, C = z.shape
    total = np.empty(C)
    squares = np.empty(C)
    spread = np.empty(C)
    for a in range(A):
        total[:] = 0.0
        squares[:] = 0.0
        spread[:] = 0.0
        for r in range(N):
            row = z[a, r]
            for c in range(C):
                total[c] += np.float64(row[c])
        for c in range(C):
            total[c] /= N
        for r in range(N):
            row = z[a, r]
            for c in range(C):
                d = np.float64(row[c]) - total[c]
                squares[c] += d * d
        if with_logvar:
            for r in range(N):
                row = logvar[a, r]
                for c in range(C):
                    spread[c] += np.float64(_exp(row[c]))
        for c in range(C):
            mean[a, c] = total[c]
            var[a, c] = squares[c] / (N - correction) + spread[c] / N


_TILE = 1024
"""``rows_variance_law_backward`` runs blocks of whole rows of about this many elements as one flat loop, against
per-column factors tiled to the block's length: rows of a few columns would each pay a loop's setup."""


@_jit(inline="always")
def _affine_flat(x, shift, center, scale, out):
    """``out[j] = shift[j] + (x[j] - center[j]) scale[j]``."""
    for j in range(x.shape[0]):
        out[j] = shift[j] + (x[j] - center[j]) * scale[j]


@_jit(inline="always")
def _exp_scaled_flat(x, scale, out):
    """``out[j] = exp(x[j]) scale[j]``."""
    for j in range(x.shape[0]):
        out[j] = _exp(x[j]) * scale[j]


@_jit
def rows_variance_law_backward(grad_mean, grad_var, mu, mean, logvar, grad_mu, grad_logvar):
    """The gradients of ``variance_law`` over the ``N`` rows of float32 ``(N, C)`` ``mu`` and ``logvar``
    (C-contiguous), float32: ``d mu = g_mean / N + g_var 2 (mu - mean) / N``, ``d logvar = g_var exp(logvar) / N``,
    with ``g_mean`` and ``g_var`` of ``(C,)`` (zeros where no gradient flows), in flat blocks of whole rows
    (``_TILE``). One thread: a second costs more than it saves at 10000 x 16 (memory-bound)."""
    _wide_vectors()
    N, C = mu.shape
    n = _F(N)
    k = max(1, _TILE // C)
    shift = np.empty(k * C, np.float32)
    center = np.empty(k * C, np.float32)
    scale = np.empty(k * C, np.float32)
    spread = np.empty(k * C, np.float32)
    for i in range(k):
        for c in range(C):
            shift[i * C + c] = grad_mean[c] / n
            center[i * C + c] = mean[c]
            scale[i * C + c] = grad_var[c] * _F(2.0 / N)
            spread[i * C + c] = grad_var[c] / n
    m, d_mu = mu.reshape(-1), grad_mu.reshape(-1)
    lv, d_lv = logvar.reshape(-1), grad_logvar.reshape(-1)
    for r in range(0, N, k):
        base, count = r * C, (min(r + k, N) - r) * C
        _affine_flat(m[base:base + count], shift, center, scale, d_mu[base:base + count])
        _exp_scaled_flat(lv[base:base + count], spread, d_lv[base:base + count])
