"""One declaration per fused op, and everything built from it: the custom op, its fake, its autograd and the
eager fast path, registered in ``ALL``.

An op module declares its op once, as an ``Op``: the engine forward (plain PyTorch and the numba loops, whose
annotated signature is the op's schema), the kernel forward (the Triton launchers; same arguments), the fake
(output shapes), the engine and kernel backward, which tensors the backward needs (``saves``) and which
inputs get gradients (``differentiable``). From it ``Op`` builds

- the custom op ``fastvae::<name>``, which runs the engine or the kernel as ``fastvae.backend`` decides,
  and its fake;
- the backward custom op ``fastvae::<name>_backward(grad_<output>..., <saved>..., <arguments>..., needs,
  backend_name)``, which runs the backward on the backend its forward used;
- the autograd of the custom op (``register_autograd``; for an op that mutates an argument, which
  torch.library refuses a formula, an ``autograd.Function`` around it);
- the eager fast path: an ``autograd.Function`` whose forward is the engine forward and whose backward is the
  engine backward, with the same ``setup_context`` and the same backward code as the custom op's; only the
  dispatch around them differs. A custom op costs ~125 us per forward+backward on the CPU in torch.library's
  machinery, more than the whole computation at ``(128, 16)``; the fast path costs a few microseconds.

``op(*arguments)`` takes the fast path in plain eager mode on plain CPU tensors that run the engine
(``applies``), and the custom op everywhere else: under ``torch.compile`` and ``torch.jit.trace``, a
dispatch or function mode, tensor subclasses and functorch transforms, the Triton backend, every device but
the CPU. Without grad the fast path calls the engine directly.

The declaration also names what the tooling iterates: ``examples`` (arguments for the tests and ``fastvae
demo``, with non-default floats), ``bench`` (the modules holding its benchmark ``CASE``) and ``aot`` (the
module holding its ``AOT_SPECS``).
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import backend

ALL: dict[str, "Op"] = {}
"""Every declared op by name, in the order declared: what the package faces, the bench, the AOT harness,
``fastvae demo`` and the tests iterate."""

_PLAIN = (Tensor, torch.nn.Parameter)


def _plain_cpu(t: Tensor) -> bool:
    return type(t) in _PLAIN and t.is_cpu and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def applies(first: Tensor, *others: Tensor) -> bool:
    """Whether a call on these tensors takes the eager fast path now: eager (not compiling or tracing, no
    dispatch or function mode), plain CPU tensors (no FakeTensor, subclass or functorch wrapper) and the
    engine as the backend."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._get_tracing_state()  # torch.jit.trace records the custom op, not the engine's ATen ops
        and _get_current_dispatch_mode() is None
        and not torch._C._is_torch_function_mode_enabled()
        and _plain_cpu(first) and all(_plain_cpu(t) for t in others)
        and backend.decide(first) == "torch"
    )


def _is_tensor(annotation) -> bool:
    return annotation in (Tensor, Optional[Tensor])


@dataclasses.dataclass(eq=False)
class Op:
    """A fused op, declared once.

    ``engine(*args)`` and ``kernel(*args)`` return the outputs (a tuple when ``outputs`` names several);
    ``fake(*args)`` returns empty tensors of their shapes, dtypes and strides. ``engine_backward`` and
    ``kernel_backward`` take ``(grad_<output>..., <saves>..., <non-tensor arguments>..., needs)`` (a gradient
    None where it does not flow; ``needs``: a bool per ``differentiable`` input) and return a gradient per
    ``differentiable`` input (None or anything where not needed). ``backward_fake`` (default: ``empty_like`` of each
    input) gives their shapes. ``saves`` names inputs and outputs; ``non_differentiable`` outputs. ``kernel``
    None: the op runs its engine on every backend.
    """

    name: str
    engine: Callable
    fake: Callable
    engine_backward: Callable
    outputs: tuple[str, ...]
    saves: tuple[str, ...]
    differentiable: tuple[str, ...]
    kernel: Optional[Callable] = None
    kernel_backward: Optional[Callable] = None
    backward_fake: Optional[Callable] = None
    non_differentiable: tuple[str, ...] = ()
    mutates: tuple[str, ...] = ()
    examples: Optional[Callable[[int, int, torch.device], list[tuple]]] = None
    bench: tuple[str, ...] = ()
    aot: Optional[str] = None

    def __post_init__(self):
        if self.name in ALL:
            raise ValueError(f"fastvae op {self.name!r} is declared twice")
        hints = typing.get_type_hints(self.engine)
        parameters = list(inspect.signature(self.engine).parameters.values())
        self.arguments = tuple(p.name for p in parameters)
        self._defaults = tuple(p.default for p in parameters)
        self._tensor_positions = tuple(i for i, p in enumerate(parameters) if _is_tensor(hints[p.name]))
        self._param_positions = tuple(i for i, p in enumerate(parameters) if not _is_tensor(hints[p.name]))
        self._grad_positions = tuple(self.arguments.index(n) for n in self.differentiable)
        self._saved_from = tuple((n in self.outputs, (self.outputs if n in self.outputs else self.arguments).index(n))
                                 for n in self.saves)
        self._non_differentiable = tuple(self.outputs.index(n) for n in self.non_differentiable)
        self._save, self._setup, self._grad = self._autograd()
        self.custom = torch.library.custom_op(f"fastvae::{self.name}", self._forward, mutates_args=self.mutates,
                                              schema=torch.library.infer_schema(self.engine,
                                                                                mutates_args=self.mutates))
        self.custom.register_fake(self.fake)
        self.custom_backward = torch.library.custom_op(f"fastvae::{self.name.rstrip('_')}_backward", self._backward,
                                                       mutates_args=(), schema=self._backward_schema(hints))
        self.custom_backward.register_fake(self._fake_backward)
        # the operators themselves (what torch.compile traces inside an autograd.Function)
        self._forward_op = getattr(torch.ops.fastvae, self.name).default
        self._backward_op = getattr(torch.ops.fastvae, self.custom_backward._qualname.split("::")[1]).default
        if self.mutates:  # torch.library refuses a formula for a mutating op: an autograd.Function around it
            self._through_custom = self._function("Custom", self._forward_op, self._backward_op).apply
        else:
            backward_op, grad = self._backward_op, self._grad
            self.custom.register_autograd(lambda ctx, *grads: grad(ctx, grads, backward_op), setup_context=self._setup)
            self._through_custom = self.custom
        self._eager = self._eager_function()
        # autograd.Function.apply minus its Python prologue (functorch's dead-wrapper unwrapping over every
        # argument, ~3 us a call): the fast path takes no functorch-wrapped tensor (``applies``)
        self._eager_apply = super(torch.autograd.Function, self._eager).apply
        ALL[self.name] = self

    # -------------------------------------------------------------------------------- the two paths
    def __call__(self, *args):
        """The op on ``args`` (the engine's positional arguments): the eager fast path where it
        ``applies``, the custom op elsewhere."""
        tensors = [args[i] for i in self._tensor_positions if args[i] is not None]
        if applies(*tensors):
            if torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors):
                return self._eager_apply(*args, *self._defaults[len(args):])  # forward(ctx, *args) binds no defaults
            return self.engine(*args)
        return self._through_custom(*args)

    def _forward(self, *args):
        if backend.decide(args[0]) == "torch" or self.kernel is None:
            return self.engine(*args)
        return self.kernel(*args)

    def _backward(self, *args):
        *args, needs, backend_name = args
        run = self.engine_backward if backend_name == "torch" or self.kernel_backward is None else self.kernel_backward
        return self._complete(run(*args, needs), args, needs)

    def _engine_backward(self, *args):
        *args, needs, _ = args
        return self.engine_backward(*args, needs)  # gradients not needed are dropped by _grad

    def _fake_backward(self, *args):
        *args, needs, _ = args
        if self.backward_fake is not None:
            return self._complete(self.backward_fake(*args, needs), args, needs)
        saved = dict(zip(self.saves, args[len(self.outputs):]))
        return self._complete([torch.empty_like(saved[n]) for n in self.differentiable], args, needs)

    def _complete(self, grads, args: list, needs: list[bool]):
        """The backward op's outputs: a gradient per ``differentiable`` input, an empty tensor where not needed."""
        grads = grads if isinstance(grads, (tuple, list)) else (grads,)
        saved = dict(zip(self.saves, args[len(self.outputs):]))
        grads = tuple(g if need else saved[n].new_empty(0) for g, need, n in zip(grads, needs, self.differentiable))
        return grads if len(grads) > 1 else grads[0]

    # ----------------------------------------------------------------------------------- autograd
    def _function(self, kind: str, forward: Callable, backward_op: Callable) -> type:
        """An ``autograd.Function`` that runs ``forward`` and, backward, ``backward_op``, with ``_setup``
        and ``_grad`` (closures over plain tuples only: torch.compile traces them)."""
        setup, grad = self._setup, self._grad
        return type(f"_{_camel(self.name)}{kind}", (torch.autograd.Function,), {
            "forward": staticmethod(lambda *args: forward(*args)),
            "setup_context": staticmethod(setup),
            "backward": staticmethod(lambda ctx, *grads: grad(ctx, grads, backward_op)),
        })

    def _eager_function(self) -> type:
        """The eager fast path's ``autograd.Function``: ``forward(ctx, *args)`` runs the engine and then ``save``
        itself, so that ``apply`` skips what a ``setup_context`` costs it on every call (binding the arguments to
        ``forward``'s signature with ``inspect``: ~10 us, as much as the engine at ``(128, 16)``); the fast path
        runs outside functorch, which is what ``setup_context`` is for."""
        engine, save, grad, backward = self.engine, self._save, self._grad, self._engine_backward

        def forward(ctx, *args):
            output = engine(*args)
            save(ctx, args, output, "torch")  # the backend ``applies`` found
            return output

        return type(f"_{_camel(self.name)}", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(lambda ctx, *grads: grad(ctx, grads, backward)),
        })

    def _autograd(self):
        """``(save, setup_context, grad)``: what is saved after the forward (``save(ctx, inputs, output, backend)``;
        ``setup_context`` decides the backend), and the backward from it, shared by the custom op's autograd and the
        eager fast path."""
        saved_from, param_positions = self._saved_from, self._param_positions
        non_differentiable, grad_positions, n_args = self._non_differentiable, self._grad_positions, len(self.arguments)

        def save(ctx, inputs, output, backend_name):
            """Save what the backward needs and the backend it runs on."""
            outputs = output if isinstance(output, tuple) else (output,)
            ctx.save_for_backward(*((outputs if is_output else inputs)[i] for is_output, i in saved_from))
            ctx.params = tuple(inputs[i] for i in param_positions)
            ctx.backend = backend_name
            ctx.set_materialize_grads(False)  # an output that is not used gets None, not a zero fill (a launch)
            if non_differentiable:
                ctx.mark_non_differentiable(*(outputs[i] for i in non_differentiable))

        def setup(ctx, inputs, output):
            """``save`` right after the forward, in its backend state."""
            save(ctx, inputs, output, backend.decide(inputs[0]))

        def grad(ctx, grads, backward_op):
            needs = [ctx.needs_input_grad[i] for i in grad_positions]
            result = [None] * n_args
            grads = [None if i in non_differentiable else g for i, g in enumerate(grads)]
            if not any(needs) or all(g is None for g in grads):  # no gradient flows in: none flows out
                return tuple(result)
            computed = backward_op(*grads, *ctx.saved_tensors, *ctx.params, needs, ctx.backend)
            computed = computed if isinstance(computed, (tuple, list)) else (computed,)
            for position, gradient, need in zip(grad_positions, computed, needs):
                result[position] = gradient if need else None
            return tuple(result)

        return save, setup, grad

    def _backward_schema(self, hints: dict) -> str:
        """``(Tensor? grad_<output>..., Tensor? <saved>..., <non-tensor arguments>..., bool[] needs,
        str backend_name) -> (Tensor, ...)``, from the forward's schema."""
        forward = torch.library.infer_schema(self.engine, mutates_args=self.mutates)
        declared = _schema_arguments(forward)
        arguments = ([f"Tensor? grad_{n}" for n in self.outputs] + [f"Tensor? {n}" for n in self.saves]
                     + [declared[self.arguments[i]].split("=")[0] for i in self._param_positions]
                     + ["bool[] needs", "str backend_name"])
        n = len(self.differentiable)
        returns = "Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")"
        return f"({', '.join(arguments)}) -> {returns}"


def _schema_arguments(schema: str) -> dict[str, str]:
    """``{name: "Type name[=default]"}`` of an inferred schema ``(Type name, ...) -> ...``."""
    inside = schema[schema.index("(") + 1: schema.rindex(") ->")]
    return {part.split()[1].split("=")[0]: part for part in inside.split(", ") if part}


def _camel(name: str) -> str:
    return "".join(word.capitalize() for word in name.strip("_").split("_"))
