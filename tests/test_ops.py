"""One op, one declaration: every op of ``fastvae.ops.ALL`` passes opcheck on both backends, its custom op and its
eager fast path agree bit for bit, and a new op needs nothing but its declaration."""
from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from fastvae.ops import ALL, _op

from helpers import backward_names

BACKENDS = ("torch", "triton")

OPS = list(ALL)


def _fresh(args: tuple) -> tuple:
    """``args`` with every tensor a new leaf (same values, strides, requires_grad), so runs never share state."""
    def copy(a):
        if not isinstance(a, torch.Tensor):
            return a
        leaf = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a.detach())
        return leaf.requires_grad_(a.requires_grad)
    return tuple(copy(a) for a in args)


def _run(op, args: tuple):
    """Outputs, gradients of the differentiable inputs (fixed upstream gradients), the tensors autograd saved,
    and the arguments after the call (an op may update one in place)."""
    saved = []

    def pack(t):
        saved.append(t.detach().clone())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = op(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    flowing = [o for o in outputs if o.requires_grad and o.numel()]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    upstream = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape) for o in flowing]
    grads = torch.autograd.grad(flowing, inputs, upstream, allow_unused=True) if flowing and inputs else ()
    return list(outputs), list(grads), saved, [a for a in args if isinstance(a, torch.Tensor)]


def _identical(a, b, what):
    assert (a is None) == (b is None), what
    if a is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
    assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), what


@pytest.mark.parametrize("name", OPS)
def test_custom_op_and_eager_path_agree_bit_for_bit(name, monkeypatch):
    """Outputs, saved tensors, gradients and in-place updates, at every example (non-default eps, momentum,
    clamp bounds and corrections), on CPU tensors with the engine: the fast path against the custom op."""
    op = ALL[name]
    examples = op.examples(6, 5, torch.device("cpu"))
    for i, args in enumerate(examples):
        fast = _run(op, _fresh(args))
        with monkeypatch.context() as m:
            m.setattr(_op, "applies", lambda *tensors: False)
            slow = _run(op, _fresh(args))
        for part, (a_part, b_part) in zip(("outputs", "grads", "saved", "arguments"), zip(fast, slow)):
            assert len(a_part) == len(b_part), (name, i, part)
            for k, (a, b) in enumerate(zip(a_part, b_part)):
                _identical(a, b, (name, i, part, k))


def test_renormalize_scalar_mode_saves_statistics_with_the_calls_eps():
    """The drift the twin autograd.Function had: its scalar-mode statistics ignored ``eps``."""
    z = torch.randn(7, 3, dtype=torch.float64).requires_grad_()
    for eps in (1e-6, 0.5):
        _, _, _, scalars = fastvae.ops.ALL["renormalize"](z, None, None, 0.0, 1.0, 0, "scalar", eps)
        var = z.detach().var(dim=0, correction=0)
        torch.testing.assert_close(scalars[1], torch.sqrt(var + eps).mean())


class _Recorder(TorchDispatchMode):
    """Records the arguments of every call of one op."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.calls = name, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().split("::")[-1].split(".")[0] == self.name:
            self.calls.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_every_op_passes_opcheck_forward_and_backward(name, backend):
    op = ALL[name]
    backward = op.custom_backward._qualname.split("::")[-1]
    with fastvae.use_backend(backend):
        for args in op.examples(4, 3, torch.device("cpu")):
            # a mutating op's autograd is the autograd.Function around it (torch.library refuses a formula)
            plain = tuple(a.detach() if isinstance(a, torch.Tensor) and op.mutates else a for a in _fresh(args))
            torch.library.opcheck(op.custom, plain)
            recorder = _Recorder(backward)
            with recorder:  # the backward op's arguments, as the forward's autograd passes them
                _run(op, _fresh(args))
            for call in recorder.calls:
                torch.library.opcheck(op.custom_backward, call)


# ----------------------------------------------------------------------------------- a sixth op
_TOY_OP = '''
"""A toy op: ``y = scale * x`` and ``s = sum(x^2)``."""
import torch
from torch import Tensor

from fastvae.ops import Op


def _engine(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return x * scale, (x * x).sum()


def _fake(x, scale):
    return torch.empty_like(x), x.new_empty(())


def _backward(grad_y, grad_s, x, scale, needs):
    grad = grad_y * scale if grad_y is not None else torch.zeros_like(x)
    return grad if grad_s is None else grad + 2 * grad_s * x


def _examples(n, d, device):
    return [(torch.randn(n, d, device=device).requires_grad_(), 1.5)]


TOY = Op("{name}", _engine, _fake, _backward, outputs=("y", "s"), saves=("x",), differentiable=("x",),
         examples=_examples, bench=("{package}.bench_case",), aot="{package}.aot_specs")
'''

_TOY_BENCH = '''
import torch

from bench.cases import OpBench
from {package}.toy import TOY


def eager(x):
    return 1.5 * x, (x * x).sum()


def fused(x):
    return TOY(x, 1.5)


CASE = OpBench("{name}", ({{"N": 64}},), ({{"N": 8}},), lambda case, device, dtype: (
    torch.randn(case["N"], device=device, dtype=dtype).requires_grad_(),), eager, fused,
    lambda case, mode, s: 2 * case["N"] * s, lambda case: f"N={{case['N']}}", "read x, write y")
'''

_TOY_AOT = '''
import torch

from bench.aot.harness import Spec

AOT_SPECS = [Spec("{name}", "forward", "the toy", lambda dtype, aligned: (torch.randn(4, dtype=dtype),),
                  lambda x: None, traffic={{}})]
'''


@pytest.fixture
def toy_op(tmp_path, monkeypatch):
    """A sixth op declared in a package of its own, outside fastvae: its declaration, bench case and AOT specs."""
    name = f"toy_{uuid.uuid4().hex[:8]}"
    package = f"toy_ops_{name}"
    root = tmp_path / package
    root.mkdir()
    (root / "__init__.py").write_text("")
    for file, text in (("toy.py", _TOY_OP), ("bench_case.py", _TOY_BENCH), ("aot_specs.py", _TOY_AOT)):
        (root / file).write_text(textwrap.dedent(text.format(name=name, package=package)))
    monkeypatch.syspath_prepend(str(tmp_path))
    import bench.cases  # noqa: F401 - its OPS (which other tests iterate) are computed before the toy exists

    module = __import__(f"{package}.toy", fromlist=["TOY"])
    try:
        yield module.TOY
    finally:
        ALL.pop(name, None)
        for key in [k for k in sys.modules if k.startswith(package)]:
            del sys.modules[key]


def test_a_sixth_op_needs_only_its_declaration(toy_op):
    from bench.aot import harness
    from bench.cases import load

    name = toy_op.name
    assert ALL[name] is toy_op
    x = torch.randn(5, 3, requires_grad=True)
    # the custom op: registration, fake, autograd
    torch.library.opcheck(getattr(torch.ops.fastvae, name).default, (x, 1.5))
    # the eager fast path: a lean autograd.Function, the same values as the custom op
    y, s = toy_op(x, 1.5)
    assert any(n.startswith("_Toy") and n.endswith("Backward") for n in backward_names([y])), backward_names([y])
    grad_fast = torch.autograd.grad(y.sum() + s, x)[0]
    y_custom, s_custom = toy_op.custom(x, 1.5)
    grad_custom = torch.autograd.grad(y_custom.sum() + s_custom, x)[0]
    assert torch.equal(y, y_custom) and torch.equal(s, s_custom) and torch.equal(grad_fast, grad_custom)
    torch.testing.assert_close(grad_fast, 1.5 + 2 * x.detach())
    # torch.compile(fullgraph=True) traces the custom op, forward and backward
    traced = []

    def record(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    compiled = torch.compile(lambda t: toy_op(t, 1.5)[0].sin().sum(), fullgraph=True, backend=record)
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], 1.5 * torch.cos(1.5 * x.detach()))
    assert f"fastvae.{name}.default" in traced, traced
    # the tooling: the bench's cases and the AOT harness's spec list
    assert load()[name].name == name
    assert f"{toy_op.bench[0].rsplit('.', 1)[0]}.aot_specs" in harness.spec_modules()
    assert [spec.op for spec in __import__(toy_op.aot, fromlist=["AOT_SPECS"]).AOT_SPECS] == [name]
    # and the demo runs it with its examples
    args = toy_op.examples(2, 2, torch.device("cpu"))[0]
    assert toy_op(*args)[0].shape == (2, 2)
