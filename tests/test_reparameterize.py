"""reparameterize_kl, reparameterize and kl_divergence against the float64 reference, on both backends.

Tolerances (relative to |expected| plus the magnitude of the terms summed, see helpers.py):
float32 1e-5, float16 1e-3, bfloat16 1e-2, float64 1e-6 where the float32 noise enters, 1e-12 elsewhere.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.backend import use_backend
from fastvae.kernels import count_launches
from fastvae.kernels._launch import ZERO_FILL
from helpers import DTYPES, RTOL, RTOL_NOISE, assert_close_scaled

BACKENDS = ("triton", "torch")
pytestmark = pytest.mark.devices  # each test once per device (conftest.devices_under_test)
REDUCTIONS = ("none", "per_sample", "batchmean", "sum")
SHAPES = ((1, 1), (7,), (3, 5, 33), (1023, 3), (2, 1023))


def _latents(shape, dtype, *, spread=2.0, chunked=True):
    """mu and logvar of ``shape`` as the two halves of one encoder output (strided views)."""
    h = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64) * spread
    h = h.to(dtype)
    if not chunked:
        return h[..., : shape[-1]].contiguous(), h[..., shape[-1]:].contiguous()
    return h.chunk(2, dim=-1)


def _kl_scale(mu, logvar, reduction):
    """The magnitude of the terms of the KL, reduced like it."""
    terms = 0.5 * (mu * mu + torch.exp(logvar) + logvar.abs() + 1)
    return reference.reduce_loss(terms, reduction, (-1,), torch.float64)


def _upstream(mu, reduction):
    grad_z = torch.randn(mu.shape, dtype=torch.float64).to(mu.dtype)
    kl_like = reference.kl_divergence(mu, mu, reduction=reduction)
    grad_kl = torch.randn(kl_like.shape, dtype=torch.float64).to(kl_like.dtype)
    return grad_z, grad_kl


def _check_against_reference(mu, logvar, reduction, seed=1234):
    dtype = mu.dtype
    leaf_mu = mu.detach().clone().requires_grad_(True)
    leaf_lv = logvar.detach().clone().requires_grad_(True)
    z, kl = fastvae.reparameterize_kl(leaf_mu, leaf_lv, seed=seed, reduction=reduction)
    grad_z, grad_kl = _upstream(mu, reduction)
    torch.autograd.backward((z, kl), (grad_z, grad_kl))

    mu64 = mu.detach().double().requires_grad_(True)
    lv64 = logvar.detach().double().requires_grad_(True)
    z64, kl64 = reference.reparameterize_kl(mu64, lv64, seed=seed, reduction=reduction)
    torch.autograd.backward((z64, kl64), (grad_z.double(), grad_kl.double()))

    assert z.dtype == dtype and z.shape == mu.shape
    expected_kl_dtype = dtype if reduction == "none" else reference.accumulation_dtype(dtype)
    assert kl.dtype == expected_kl_dtype and kl.shape == kl64.shape
    with torch.no_grad():
        eps = reference.philox_randn(seed, mu.shape).double()
        m, lv = mu64.detach(), lv64.detach()
        std = torch.exp(lv / 2)
        assert_close_scaled(z, z64, rtol=RTOL_NOISE[dtype], scale=m.abs() + std * eps.abs())
        assert_close_scaled(kl, kl64, rtol=RTOL[dtype], scale=_kl_scale(m, lv, reduction))
        g_kl = reference.expand_reduced_grad(grad_kl.double(), reduction, mu.shape, (-1,))
        g_z = grad_z.double()
        assert_close_scaled(leaf_mu.grad, mu64.grad, rtol=RTOL_NOISE[dtype], scale=g_z.abs() + (g_kl * m).abs())
        assert_close_scaled(
            leaf_lv.grad, lv64.grad, rtol=RTOL_NOISE[dtype],
            scale=(g_z * eps * std).abs() / 2 + g_kl.abs() * (torch.exp(lv) + 1) / 2,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients_match_float64_reference(backend, dtype, shape):
    mu, logvar = _latents(shape, dtype)
    with use_backend(backend):
        for reduction in REDUCTIONS:
            _check_against_reference(mu, logvar, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logvar(backend, dtype):
    mu = torch.linspace(-5, 5, 61, dtype=torch.float64).to(dtype).reshape(1, 61).repeat(2, 1)
    logvar = torch.linspace(-30, 30, 61, dtype=torch.float64).to(dtype).reshape(1, 61).repeat(2, 1)
    with use_backend(backend):
        for reduction in REDUCTIONS:
            _check_against_reference(mu, logvar, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_are_read_in_place(backend):
    """Transposed, sliced and chunked inputs give the results of their contiguous copies."""
    base = torch.randn(16, 24, dtype=torch.float32)
    views = {
        "chunk": base.chunk(2, dim=-1),
        "transpose": (base[:, :12].t(), base[:, 12:].t()),
        "step": (base[::2, ::2], base[1::2, 1::2]),
        "leading": (base.view(4, 4, 24)[..., :12], base.view(4, 4, 24)[..., 12:]),
    }
    with use_backend(backend):
        for name, (mu, logvar) in views.items():
            z, kl = fastvae.reparameterize_kl(mu, logvar, seed=3, reduction="none")
            z_c, kl_c = fastvae.reparameterize_kl(mu.contiguous(), logvar.contiguous(), seed=3, reduction="none")
            torch.testing.assert_close(z, z_c, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(kl, kl_c, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_ops_agree_with_fused(backend):
    mu, logvar = _latents((9, 5), torch.float32)
    with use_backend(backend):
        z, kl = fastvae.reparameterize_kl(mu, logvar, seed=11, reduction="per_sample")
        torch.testing.assert_close(fastvae.reparameterize(mu, logvar, seed=11), z, rtol=0, atol=0)
        torch.testing.assert_close(fastvae.kl_divergence(mu, logvar, reduction="per_sample"), kl, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        for reduction in REDUCTIONS:
            assert torch.autograd.gradcheck(
                lambda m, v: fastvae.reparameterize_kl(m, v, seed=5, reduction=reduction), (mu, logvar)
            )
        assert torch.autograd.gradcheck(lambda m, v: fastvae.reparameterize(m, v, seed=5), (mu, logvar))
        assert torch.autograd.gradcheck(lambda m, v: fastvae.kl_divergence(m, v, reduction="none"), (mu, logvar))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Every reduction, with and without a seed (``kl_divergence``) and a reduction (``reparameterize``); the
    backward op is checked with every op of ``fastvae.ops.ALL`` (tests/test_ops.py)."""
    mu, logvar = (t.requires_grad_(True) for t in torch.randn(2, 5, 6).unbind(0))
    seed = torch.tensor([7])
    with use_backend(backend):
        for reduction in REDUCTIONS:
            torch.library.opcheck(torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, seed, reduction))
            torch.library.opcheck(torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, None, reduction))
        torch.library.opcheck(torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, seed, None))


def test_torch_compile_fullgraph():
    """A compiled encoder head + sampling + KL gives the eager values and gradients."""

    def step(h, seed):
        mu, logvar = h.chunk(2, dim=-1)
        z, kl = fastvae.reparameterize_kl(mu, logvar, seed=seed)
        return (z * z).sum() + kl

    h = torch.randn(8, 6, requires_grad=True)
    seed = torch.tensor([3])
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(h, seed)
    (grad_c,) = torch.autograd.grad(loss_c, h)
    loss_e = step(h, seed)
    (grad_e,) = torch.autograd.grad(loss_e, h)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, grad_e)


# ----------------------------------------------------------------------------------------- RNG
def test_same_seed_same_noise_on_both_backends():
    mu, logvar = _latents((33, 7), torch.float32)
    with use_backend("triton"):
        z_triton = fastvae.reparameterize(mu, logvar, seed=2**40 + 17)
    with use_backend("torch"):
        z_torch = fastvae.reparameterize(mu, logvar, seed=2**40 + 17)
    assert_close_scaled(z_triton, z_torch, rtol=1e-5, scale=mu.abs() + torch.exp(logvar / 2) * 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_seeds_give_different_streams(backend):
    zeros = torch.zeros(64, 16)
    with use_backend(backend):
        a = fastvae.reparameterize(zeros, zeros, seed=1)
        b = fastvae.reparameterize(zeros, zeros, seed=2)
    assert (a != b).float().mean() > 0.99
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 4 / math.sqrt(a.numel())


def _assert_standard_normal(eps: torch.Tensor) -> None:
    """Mean and variance within 4 standard errors of 0 and 1; neighbours uncorrelated within 4 SE."""
    eps = eps.double().flatten()
    n = eps.numel()
    assert abs(eps.mean()) < 4 / math.sqrt(n)
    assert abs(eps.var() - 1) < 4 * math.sqrt(2 / (n - 1))
    neighbour = torch.corrcoef(torch.stack([eps[:-1], eps[1:]]))[0, 1]
    assert abs(neighbour) < 4 / math.sqrt(n - 1)


def test_noise_statistics_over_a_million_draws():
    """The reference stream (which the kernel reproduces, tested above) over 1e6 draws."""
    _assert_standard_normal(reference.philox_randn(torch.tensor([0]), (10**6,)))


def test_kernel_noise_statistics():
    zeros = torch.zeros(2**16, 2)
    with use_backend("triton"):
        eps = fastvae.reparameterize(zeros, zeros, seed=99)
    _assert_standard_normal(eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_without_seed_are_fresh_and_reproducible(backend):
    zeros = torch.zeros(4096, 4)
    with use_backend(backend):
        torch.manual_seed(123)
        first, second = fastvae.reparameterize(zeros, zeros), fastvae.reparameterize(zeros, zeros)
        torch.manual_seed(123)
        again = fastvae.reparameterize(zeros, zeros)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert abs(torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1]) < 4 / math.sqrt(first.numel())


def test_philox_counter_uses_the_high_word():
    """Counters i and i + 2**32 draw different numbers: the stream does not wrap at 2**32 elements."""
    offsets = torch.tensor([5, 5 + 2**32, 2**33 + 5], dtype=torch.int64)
    words = reference.philox_uint32(torch.tensor([42]), offsets)
    assert len(set(words[0].tolist())) == 3
    assert all(((w >= 0) & (w < 2**32)).all() for w in words)


def test_philox_matches_published_known_answer():
    """Random123's known-answer test for Philox4x32-10: counter 0 and key 0 give 6627e8d5 e169c58d bc57ac4c 9b00dbd8."""
    words = reference.philox_uint32(torch.tensor([0]), torch.tensor([0]))
    assert [hex(int(w)) for w in words] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


def _philox_python(seed: int, offset: int) -> list[int]:
    """Philox4x32-10 in Python integers, straight from its definition."""
    m32 = 0xFFFFFFFF
    c = [offset & m32, (offset >> 32) & m32, 0, 0]
    k = [seed & m32, (seed >> 32) & m32]
    for _ in range(10):
        pa, pb = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(pb >> 32) ^ c[1] ^ k[0], pb & m32, (pa >> 32) ^ c[3] ^ k[1], pa & m32]
        k = [(k[0] + 0x9E3779B9) & m32, (k[1] + 0xBB67AE85) & m32]
    return c


def test_philox_matches_python_integers():
    """Whole words of every lane, seeds with either half at its extremes, counters across 2**32."""
    seeds = [0, 1, 2**32 - 1, 2**32 + 5, 2**63 - 1, 0x7A3C_0000_FFFF_0001]
    offsets = [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 2**62, 2**63 - 1, 123456789012345]
    offsets_t = torch.tensor(offsets, dtype=torch.int64).view(3, 4)
    for seed in seeds:
        words = torch.stack(reference.philox_uint32(torch.tensor([seed]), offsets_t))
        assert words.shape == (4, 3, 4)
        assert words.flatten(1).t().tolist() == [_philox_python(seed, o) for o in offsets], seed


def test_randn_is_box_muller_of_the_first_two_words():
    """Bit for bit the float32 formula: fold to int32 magnitude, scale, clamp, sqrt(-2 log u1) cos(2 pi u2)."""
    seed, n = torch.tensor([2**40 + 17]), 4099
    c0, c1, _, _ = reference.philox_uint32(seed, torch.arange(n))

    def uniform(c):
        folded = torch.where(c >= 2**31, 0xFFFFFFFF - c, c)
        return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    u1, u2 = torch.clamp_min(uniform(c0), 1.0e-7), uniform(c1)
    expected = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(torch.tensor(2 * math.pi, dtype=torch.float32) * u2)
    assert torch.equal(reference.philox_randn(seed, (n,)), expected)


def test_philox_reads_no_values_back_to_the_host():
    """The seed may live on the GPU: the reference only launches ops on it (meta tensors hold no values)."""
    seed = torch.tensor([3], device="meta")
    eps = reference.philox_randn(seed, (4, 5), device="meta")
    assert eps.shape == (4, 5) and eps.dtype == torch.float32
    words = reference.philox_uint32(seed, torch.arange(6, device="meta").view(2, 3))
    assert all(w.shape == (2, 3) and w.dtype == torch.int64 for w in words)


# ------------------------------------------------------------------------- memory and launches
def _saved_tensors(fn):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_kernels_save_only_inputs_and_seed_the_cpu_engine_also_the_noise(backend):
    """The Triton kernels (the GPU's memory design) save ``mu``, ``logvar`` and the seed and recompute the noise; the
    CPU engine also keeps the float32 noise it drew (an empty tensor on the kernels), so its backward draws nothing."""
    h = torch.randn(32, 16, requires_grad=True)
    mu, logvar = h.chunk(2, dim=-1)
    with use_backend(backend):
        saved, (z, kl) = _saved_tensors(lambda: fastvae.reparameterize_kl(mu, logvar, seed=1))
        (z.sum() + kl).backward()
    big = [t for t in saved if t.numel() > 1]
    inputs = [t for t in big if t.data_ptr() in (mu.data_ptr(), logvar.data_ptr()) and t.stride() == mu.stride()]
    assert {t.data_ptr() for t in inputs} == {mu.data_ptr(), logvar.data_ptr()} and len(inputs) == 2
    noise = [t for t in big if all(t is not i for i in inputs)]
    if backend == "torch":
        assert len(noise) == 1 and noise[0].dtype == torch.float32 and noise[0].shape == mu.shape
        torch.testing.assert_close(noise[0], reference.philox_randn(torch.tensor([1]), mu.shape), rtol=1e-5, atol=1e-5)
    else:
        assert noise == []
    small = [t for t in saved if t.numel() == 1]
    assert len(small) == 1 and small[0].dtype == torch.int64  # the seed
    assert h.grad is not None


def test_the_cpu_backward_reads_the_noise_the_forward_kept():
    """Replacing the saved noise by zeros on its way to the backward leaves only the KL's part of d logvar: the
    backward used the kept noise, it did not draw it again (and without a gradient nothing is kept)."""
    mu, logvar = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)

    def zero_noise(t):
        return t if t.numel() == 1 or t.data_ptr() in (mu.data_ptr(), logvar.data_ptr()) else torch.zeros_like(t)

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, zero_noise):
        z, kl = fastvae.reparameterize_kl(mu, logvar, seed=3, reduction="sum")
    grad_mu, grad_logvar = torch.autograd.grad((z, kl), (mu, logvar), (torch.ones_like(z), torch.ones(())))
    kl_only = (torch.exp(logvar) - 1).detach() / 2  # d KL / d logvar; g_z eps std / 2 read as 0
    torch.testing.assert_close(grad_logvar, kl_only)
    torch.testing.assert_close(grad_mu, 1 + mu.detach())
    with torch.no_grad():
        saved, _ = _saved_tensors(lambda: fastvae.reparameterize_kl(mu, logvar, seed=3))
    assert saved == []


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_launch_forward_and_one_backward(reduction):
    mu, logvar = (t.requires_grad_(True) for t in torch.randn(2, 300, 16).unbind(0))
    with use_backend("triton"):
        with count_launches() as forward:
            z, kl = fastvae.reparameterize_kl(mu, logvar, reduction=reduction)
        with count_launches() as backward:
            (z.sum() + kl.sum()).backward()
    # a total takes a ticket on a fresh zeroed workspace: one memset before the kernel
    expected = {"reparameterize_kl_fwd_kernel": 1, **({ZERO_FILL: 1} if reduction in ("batchmean", "sum") else {})}
    assert forward == expected, forward
    assert sum(backward.values()) == 1, backward


def test_total_reduction_is_deterministic_across_many_programs():
    mu, logvar = torch.randn(2, 5000, 3).unbind(0)
    with use_backend("triton"):
        results = {fastvae.kl_divergence(mu, logvar, reduction="sum").item() for _ in range(3)}
    assert len(results) == 1
    assert results.pop() == pytest.approx(
        reference.kl_divergence(mu.double(), logvar.double(), reduction="sum").item(), rel=1e-5)


# -------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.zeros(3, 4), torch.zeros(3, 5)), ValueError, "same shape"),
        (lambda: (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)), TypeError, "same dtype"),
        (lambda: (torch.zeros(3, 4), torch.zeros(3, 4, device="meta")), ValueError, "same device"),
        (lambda: (torch.zeros(0, 4), torch.zeros(0, 4)), ValueError, "empty"),
        (lambda: (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64)), TypeError,
         "float16, bfloat16"),
        (lambda: (torch.zeros(()), torch.zeros(())), ValueError, "at least 1 dimension"),
        (lambda: ([0.0], [0.0]), TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("op", ["reparameterize_kl", "reparameterize", "kl_divergence"])
def test_bad_inputs_raise_before_any_kernel(op, make, error, match):
    mu, logvar = make()
    with use_backend("triton"), count_launches() as launches:
        with pytest.raises(error, match=match) as info:
            getattr(fastvae, op)(mu, logvar)
    assert op in str(info.value)
    assert not launches


def test_bad_reduction_and_seed():
    mu = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastvae.reparameterize_kl(mu, mu, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastvae.kl_divergence(mu, mu, reduction="avg")
    with pytest.raises(TypeError, match="seed must be an int"):
        fastvae.reparameterize(mu, mu, seed=1.5)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        fastvae.reparameterize(mu, mu, seed=-1)
    with pytest.raises(ValueError, match="one-element integer tensor"):
        fastvae.reparameterize(mu, mu, seed=torch.tensor([1.0]))


def test_finite_check_names_op_and_tensor(monkeypatch):
    mu = torch.zeros(2, 3)
    logvar = torch.zeros(2, 3)
    logvar[1, 2] = float("nan")
    fastvae.kl_divergence(mu, logvar)  # off by default: NaN flows through
    monkeypatch.setenv("FASTVAE_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=r"reparameterize_kl: logvar holds NaN"):
        fastvae.reparameterize_kl(mu, logvar)
    mu[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"kl_divergence: mu holds inf"):
        fastvae.kl_divergence(mu, torch.zeros(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["reparameterize_kl", "reparameterize", "kl_divergence"])
def test_backward_runs_on_the_backend_of_its_forward(backend, op):
    """A forward inside use_backend(backend) whose backward runs after the block (here: inside the
    other backend) runs the backward of the forward's backend."""
    other = "torch" if backend == "triton" else "triton"
    mu, logvar = (t.requires_grad_(True) for t in torch.randn(2, 6, 5).unbind(0))
    with use_backend(backend):
        out = getattr(fastvae, op)(mu, logvar)
    total = sum(t.sum() for t in (out if isinstance(out, tuple) else (out,)))
    with use_backend(other), count_launches() as launches:
        total.backward()
    assert launches == ({"reparameterize_kl_bwd_kernel": 1} if backend == "triton" else {}), launches
