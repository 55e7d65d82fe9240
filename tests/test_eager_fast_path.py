"""The eager fast path (``fastvae.ops._op``: the engine behind a lean autograd.Function) against the custom ops."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from fastvae.ops import _op
from fastvae.ops._checks import REDUCTIONS

from helpers import DTYPES, backward_names


def _latents(dtype):
    h = torch.randn(9, 2 * 12, dtype=torch.float64)
    mu, logvar = h.chunk(2, dim=-1)  # strided views, as an encoder's output gives them
    return mu.to(dtype).requires_grad_(), (0.5 * logvar).to(dtype).requires_grad_()


def _cases(dtype):
    """``name -> (fn, inputs)``: every public op, reduction and mode; ``fn(*inputs)`` returns a tuple of tensors."""
    mu, logvar = _latents(dtype)
    x_hat = torch.rand(6, 1, 4, 5, dtype=dtype).requires_grad_()
    x = torch.rand(6, 1, 4, 5, dtype=dtype)
    z4 = torch.randn(5, 3, 4, 2, dtype=dtype).requires_grad_()
    cases = {}
    for r in REDUCTIONS:
        cases[f"reparameterize_kl-{r}"] = (
            lambda m, lv, r=r: fastvae.reparameterize_kl(m, lv, seed=7, reduction=r), (mu, logvar))
        cases[f"reparameterize_kl-clamp-{r}"] = (
            lambda m, lv, r=r: fastvae.reparameterize_kl(m, lv, seed=7, reduction=r, logvar_clamp=(-0.3, 0.2)),
            (mu, logvar))
        cases[f"kl_divergence-{r}"] = (lambda m, lv, r=r: (fastvae.kl_divergence(m, lv, reduction=r),), (mu, logvar))
        for update in (False, True):
            cases[f"balanced_mse-{r}-update{update}"] = (
                lambda a, b, r=r, u=update: (
                    fastvae.balanced_mse(a, b, torch.full((), 0.3), update=u, reduction=r, full=True),),
                (x_hat, x))
    cases["reparameterize"] = (lambda m, lv: (fastvae.reparameterize(m, lv, seed=3),), (mu, logvar))
    cases["reparameterize-event_dims"] = (
        lambda a: fastvae.reparameterize_kl(a, a.flip(1), seed=3, event_dims=3, reduction="per_sample"), (z4,))
    cases["moments"] = (lambda z: fastvae.moments(z, dim=1, correction=1), (z4,))
    cases["moments-tuple"] = (lambda z: fastvae.moments(z, dim=(0, 2)), (z4,))
    cases["variance_law"] = (lambda m, lv: fastvae.variance_law(m, lv), (mu, logvar))
    cases["variance_law-dims"] = (lambda z: fastvae.variance_law(z, z * 0.5, dim=(0, 2, 3)), (z4,))
    target = torch.rand(3, 4, 2, dtype=dtype) + 0.5
    for mode in ("per_dim", "scalar"):
        cases[f"renormalize-{mode}"] = (lambda z, m=mode: (fastvae.renormalize(z, 0.5, target, dim=0, mode=m),), (z4,))
        cases[f"renormalize-{mode}-numbers"] = (
            lambda z, m=mode: (fastvae.renormalize(z, 0.1, 2.0, dim=2, mode=m),), (z4,))
    return cases


def _run(fn, inputs):
    """Outputs, input gradients (a fixed upstream gradient) and what autograd saved, packed by saved_tensors_hooks."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.stride(), t.detach().clone()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = fn(*inputs)
    differentiable = [o for o in outputs if o.requires_grad]
    grads = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape) for o in differentiable]
    grads = torch.autograd.grad(differentiable, [i for i in inputs if i.requires_grad], grads)
    return outputs, grads, saved


@pytest.fixture
def custom_ops_only(monkeypatch):
    """Turns the fast path off: every call goes through torch.ops.fastvae."""
    monkeypatch.setattr(_op, "applies", lambda *tensors: False)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fast_path_is_bit_identical_to_the_custom_ops(dtype, monkeypatch):
    for name, (fn, inputs) in _cases(dtype).items():
        fast = _run(fn, inputs)
        with monkeypatch.context() as m:
            m.setattr(_op, "applies", lambda *tensors: False)
            slow = _run(fn, inputs)
        for a, b in zip(fast[0] + fast[1], slow[0] + slow[1]):
            _same(a, b)
        # the same tensors saved for backward: the inputs, the seed, per-dimension statistics
        assert [s[:3] for s in fast[2]] == [s[:3] for s in slow[2]], name
        for a, b in zip(fast[2], slow[2]):
            _same(a[3], b[3])


def test_with_the_fast_path_off_the_graph_holds_the_custom_op(custom_ops_only):
    mu, logvar = _latents(torch.float32)
    z, _ = fastvae.reparameterize_kl(mu, logvar, seed=1)
    assert any(n.startswith("GeneratedBackwardFor_fastvae_reparameterize_kl") for n in backward_names([z]))


@pytest.mark.parametrize("name", ["reparameterize_kl", "balanced_mse_update", "moments", "renormalize", "variance_law"])
def test_each_op_builds_its_lean_function(name):
    mu, logvar = _latents(torch.float32)
    outputs = {
        "reparameterize_kl": lambda: fastvae.reparameterize_kl(mu, logvar, seed=1),
        "balanced_mse_update": lambda: (fastvae.balanced_mse(mu, logvar.detach(), torch.ones(())),),
        "moments": lambda: fastvae.moments(mu),
        "renormalize": lambda: (fastvae.renormalize(mu),),
        "variance_law": lambda: fastvae.variance_law(mu, logvar),
    }[name]()
    names = backward_names(outputs)
    assert not any(n.startswith("GeneratedBackwardFor") for n in names), names
    assert any(n.startswith("_") and n.endswith("Backward") for n in names), names


def test_no_grad_calls_build_no_graph_and_match():
    mu, logvar = _latents(torch.float32)
    with torch.no_grad():
        z, kl = fastvae.reparameterize_kl(mu, logvar, seed=5)
    assert not z.requires_grad and not kl.requires_grad
    z2, kl2 = fastvae.reparameterize_kl(mu, logvar, seed=5)
    assert torch.equal(z, z2) and torch.equal(kl, kl2)


def test_the_update_moves_running_mse_the_same_way(monkeypatch):
    x_hat, x = torch.rand(4, 10, requires_grad=True), torch.rand(4, 10)
    fast, slow = torch.ones(()), torch.ones(())
    fastvae.balanced_mse(x_hat, x, fast).backward()
    g_fast = x_hat.grad.clone()
    x_hat.grad = None
    monkeypatch.setattr(_op, "applies", lambda *tensors: False)
    fastvae.balanced_mse(x_hat, x, slow).backward()
    assert torch.equal(fast, slow) and torch.equal(g_fast, x_hat.grad) and float(fast) < 1


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_custom_ops():
    mu, logvar = _latents(torch.float32)
    with _Recorder() as recorder:
        assert not _op.applies(mu)
        fastvae.reparameterize_kl(mu, logvar, seed=2)
    assert any(op.startswith("fastvae.reparameterize_kl") for op in recorder.ops)


def test_fake_tensors_and_other_backends_use_the_custom_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = torch.zeros(2, 3)
    assert _op.applies(t)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(t)
        assert not _op.applies(fake)
        z = fastvae.reparameterize(fake, fake, seed=1)
        assert z.shape == (2, 3)
    with fastvae.use_backend("triton"):
        assert not _op.applies(t)
    assert not _op.applies(torch.zeros(2, 3, device="meta"))


def test_torch_compile_fullgraph_still_traces_the_custom_ops():
    mu, logvar = _latents(torch.float32)
    x = torch.rand(9, 12)

    def step(m, lv, running):
        z, kl = fastvae.reparameterize_kl(m, lv, seed=torch.tensor([11]))
        mean, var = fastvae.moments(z)
        return fastvae.balanced_mse(z.sigmoid(), x, running) + kl + var.sum(), mean

    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    r_eager, r_compiled = torch.ones(()), torch.ones(())
    loss, mean = step(mu, logvar, r_eager)
    grads = torch.autograd.grad(loss, (mu, logvar))
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c, mean_c = compiled(mu, logvar, r_compiled)
    grads_c = torch.autograd.grad(loss_c, (mu, logvar))
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(mean_c, mean)
    torch.testing.assert_close(r_compiled, r_eager)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b)
    # (balanced_mse's update op sits inside its autograd.Function's subgraph)
    assert {"fastvae.reparameterize_kl.default", "fastvae.moments.default"} <= set(traced), traced


def test_jit_trace_records_the_custom_op():
    mu, logvar = _latents(torch.float32)
    seed = torch.tensor([4])
    traced = torch.jit.trace(lambda m, lv, s: fastvae.reparameterize(m, lv, seed=s),
                             (mu.detach(), logvar.detach(), seed))
    assert "fastvae::reparameterize" in str(traced.graph)
    other = torch.randn(9, 12), torch.randn(9, 12)
    assert torch.equal(traced(*other, seed), fastvae.reparameterize(*other, seed=seed))
