"""Two small helpers shared across fastvae: ``eval_mode(*modules)`` and ``derive_seed(base, *keys)``."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode", "derive_seed"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the ``with`` block and give each its own train/eval mode back after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def derive_seed(base: int, *keys: int) -> int:
    """A seed for one use of a run's ``base`` seed: ``base * 1_000_003 + key`` folded over ``keys``
    (``derive_seed(seed, epoch)`` orders the data of ``epoch``). Distinct ``(base, keys)`` of small
    non-negative ints give distinct seeds."""
    seed = int(base)
    for key in keys:
        seed = seed * 1_000_003 + int(key)
    return seed
