"""The benchmarked ops, one module each: ``bench/cases/<op>.py`` holds the op's eager composition (the
plain PyTorch a user writes), the fused call, its inputs, its sizes (the typical one first), and its
traffic model. ``OPS`` maps each op's name to its ``OpBench``; the declaration of each fused op
(``fastvae.ops.ALL``) names its case modules, so a new op's case needs no line here.

Providers (``PROVIDERS``): ``eager``, the composition; ``compile``, ``torch.compile(eager,
dynamic=False, fullgraph=True)`` compiled afresh for each case; ``fused``, the public fastvae op (on
CUDA the Triton kernels; on CPU the custom op's CPU engine). Modes (``MODES``): ``forward`` (inputs
require grad, so the forward saves what backward needs), ``backward`` (``torch.autograd.grad`` of
outputs computed once, graph retained), ``full`` (both).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fastvae.reference import accumulation_dtype

PROVIDERS = ("eager", "compile", "fused")
MODES = ("forward", "backward", "full")
MODE_TITLES = {"forward": "forward", "backward": "backward", "full": "forward+backward"}


@dataclass(frozen=True)
class OpBench:
    """One fused op: its cases, how to build inputs, its providers and its bandwidth model.

    ``inputs(case, device, dtype)`` returns the positional arguments; tensors that require grad are
    the ones differentiated. ``min_bytes(case, mode, itemsize)`` is the traffic the op must move at
    least. ``cases[0]`` is the case README quotes; ``typical`` (default ``cases[-1]``) the static cost model's.
    """

    name: str
    cases: tuple[dict, ...]
    quick_cases: tuple[dict, ...]
    inputs: Callable[[dict, torch.device, torch.dtype], tuple]
    eager: Callable
    fused: Callable
    min_bytes: Callable[[dict, str, int], int]
    label: Callable[[dict], str]
    model: str  # the bandwidth model in words, printed under the op's tables
    typical: dict | None = None  # the static cost model's case (default: the last)

    def providers(self) -> dict[str, Callable]:
        return {"eager": self.eager, "compile": self.eager, "fused": self.fused}


def acc(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype (float32, float64 for float64)."""
    return t.to(accumulation_dtype(t.dtype))


def randn(shape, device, dtype, requires_grad=True) -> Tensor:
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def numel(case: dict) -> int:
    """Elements of the main input: the product of the case's sizes."""
    return math.prod(v if isinstance(v, int) else math.prod(v) for v in case.values())


def traffic(forward: int, backward: int, mode: str) -> int:
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def load() -> dict[str, OpBench]:
    """The benchmark of every declared op (``fastvae.ops.ALL``; an op names the modules of its ``CASE``s in its
    declaration's ``bench``): each op's first case, in the order the ops were declared, then the others."""
    from fastvae.ops import ALL

    modules = [m for op in ALL.values() for m in op.bench[:1]] + [m for op in ALL.values() for m in op.bench[1:]]
    cases = [importlib.import_module(m).CASE for m in modules]
    return {case.name: case for case in cases}


OPS: dict[str, OpBench] = load()
