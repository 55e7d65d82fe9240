"""GPU semantics for Triton's interpreter, so that the CPU-only suite sees what only a GPU would show.

The interpreter runs a grid's programs one after another, in program order, and passes a Python
float argument as a float64. A GPU runs the programs concurrently, in no set order, and passes a
Python float as a ``.param .f32``. Three context managers put that back:

- ``fp32_abi()``: every non-constexpr Python float kernel argument is rounded to float32 before an
  interpreted launch, as the GPU's ABI does. A float64 kernel that takes a scale factor as a float
  (``1 / n``) loses ~1e-8 relative accuracy under it.
- ``program_order("shuffled", seed)``: the programs of each launch run one after another in a
  random order (a kernel that assumes program ``n - 1`` runs last is caught).
- ``program_order("concurrent", seed)``: one thread per program, one thread running at a time, and a
  switch to a randomly chosen program before every global load, store and atomic: the interleavings
  of a GPU, at memory-operation granularity (a reduction that reads partials before every program
  has written its own, or takes its ticket before storing its partial, is caught).

And ``abort_launch_after_atomics(n)``: the launch raises at its ``n+1``-th atomic, as a launch that
never finishes; state that outlives it (a cached ticket counter) then poisons the next launch.

They patch ``triton.runtime.interpreter`` (Triton 3.8 and 3.9), which the kernels must have been
decorated under (``TRITON_INTERPRET=1`` at import).
"""
from __future__ import annotations

import contextlib
import inspect
import random
import threading

import numpy as np
from triton.runtime import interpreter as _interp

_MEMORY_OPS = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")


# ------------------------------------------------------------------------------------- fp32 ABI
@contextlib.contextmanager
def fp32_abi():
    """Round every non-constexpr Python float kernel argument to float32 (the GPU's ``.param .f32``)."""
    original = _interp._implicit_cvt

    def convert(arg):
        if isinstance(arg, float):
            arg = float(np.float32(arg))
        return original(arg)

    _interp._implicit_cvt = convert
    try:
        yield
    finally:
        _interp._implicit_cvt = original


# -------------------------------------------------------------------------------- program order
class _Order:
    """How the programs of a launch run: ``shuffled`` or ``concurrent``, from a seeded generator."""

    def __init__(self, mode: str, seed: int):
        if mode not in ("shuffled", "concurrent"):
            raise ValueError(f"mode must be 'shuffled' or 'concurrent', got {mode!r}")
        self.mode, self.rng = mode, random.Random(seed)
        self.launches = 0
        self.max_programs = 0

    def run(self, fn, args, grid) -> None:
        indices = [(x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
        self.launches += 1
        self.max_programs = max(self.max_programs, len(indices))
        self.rng.shuffle(indices)
        if self.mode == "shuffled" or len(indices) == 1:
            for idx in indices:
                _interp.interpreter_builder.set_grid_idx(*idx)
                fn(**args)
        else:
            _Concurrent(fn, args, indices, self.rng).run()


class _Program:
    def __init__(self, idx):
        self.idx = idx
        self.go = threading.Semaphore(0)
        self.done = False
        self.error: BaseException | None = None


class _Concurrent:
    """One thread per program; the scheduler (the launching thread) lets exactly one run at a time and
    hands over at every memory operation, to a program drawn at random."""

    running: dict[int, _Program] = {}  # thread id -> program, for the memory-op hook

    def __init__(self, fn, args, indices, rng):
        self.fn, self.args, self.rng = fn, args, rng
        self.programs = [_Program(idx) for idx in indices]
        self.back = threading.Semaphore(0)

    def _body(self, program: _Program) -> None:
        _Concurrent.running[threading.get_ident()] = program
        program.go.acquire()
        try:
            self.fn(**self.args)
        except BaseException as error:  # re-raised by the scheduler
            program.error = error
        finally:
            program.done = True
            del _Concurrent.running[threading.get_ident()]
            self.back.release()

    @classmethod
    def pause(cls) -> None:
        """Called by a program thread before each memory operation: give the turn back to the scheduler."""
        program = cls.running.get(threading.get_ident())
        if program is None:
            return
        program.scheduler.back.release()
        program.go.acquire()

    def run(self) -> None:
        threads = []
        for program in self.programs:
            program.scheduler = self
            thread = threading.Thread(target=self._body, args=(program,), daemon=True)
            thread.start()
            threads.append(thread)
        alive = list(self.programs)
        while alive:
            program = self.rng.choice(alive)
            _interp.interpreter_builder.grid_idx = program.idx
            program.go.release()
            self.back.acquire()
            if program.done:
                alive.remove(program)
        for thread in threads:
            thread.join()
        for program in self.programs:
            if program.error is not None:
                raise program.error


_order: _Order | None = None


def _grid_call(self, *args_dev, **kwargs):
    """``GridExecutor.__call__`` of Triton's interpreter, with the loop over programs replaced by ``_order``."""
    argspec = inspect.getfullargspec(self.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
    args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
    for hook in self.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    patch_scope = _interp._patch_lang(self.fn)
    try:
        args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
        args = {name: arg if name in self.constexprs else _interp._implicit_cvt(arg) for name, arg in args.items()}
        grid = self.grid(args) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        _interp.interpreter_builder.set_grid_dim(*grid)
        _order.run(self.fn, args, grid)
    finally:
        patch_scope.restore()
    self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


def _pausing(method):
    def wrapped(self, *args, **kwargs):
        _Concurrent.pause()
        return method(self, *args, **kwargs)

    return wrapped


@contextlib.contextmanager
def program_order(mode: str, seed: int = 0):
    """Run the programs of every interpreted launch of the block ``shuffled`` or ``concurrent``.
    Yields the ``_Order``, whose ``launches`` and ``max_programs`` say what ran under it."""
    global _order
    order = _Order(mode, seed)
    builder = _interp.InterpreterBuilder
    saved_call = _interp.GridExecutor.__call__
    saved_ops = {name: getattr(builder, name) for name in _MEMORY_OPS}
    _order, _interp.GridExecutor.__call__ = order, _grid_call
    for name, method in saved_ops.items():
        setattr(builder, name, _pausing(method))
    try:
        yield order
    finally:
        _order, _interp.GridExecutor.__call__ = None, saved_call
        for name, method in saved_ops.items():
            setattr(builder, name, method)


# ------------------------------------------------------------------------------- aborted launch
class LaunchAborted(RuntimeError):
    pass


@contextlib.contextmanager
def abort_launch_after_atomics(n: int):
    """The first launch of the block that reaches its ``n+1``-th atomic raises ``LaunchAborted`` there
    (its earlier atomics took effect), as a launch that never finishes on a GPU."""
    builder = _interp.InterpreterBuilder
    original = builder.create_atomic_rmw
    seen = [0]

    def create_atomic_rmw(self, *args, **kwargs):
        seen[0] += 1
        if seen[0] == n + 1:
            raise LaunchAborted(f"launch aborted after {n} atomic(s)")
        return original(self, *args, **kwargs)

    builder.create_atomic_rmw = create_atomic_rmw
    try:
        yield
    finally:
        builder.create_atomic_rmw = original
