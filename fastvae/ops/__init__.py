"""The fused ops: input checks, one declaration per op (``_op.Op``), backend dispatch; no kernel code here.

``ALL`` holds every declared op by name. This package's names are the public names (``__all__``) of the
modules that declare them, and of ``balanced_loss`` (a plain composition, no custom op). Adding an op: its
module, and its name in the import line below.
"""
import sys

from . import reparameterize, balanced_mse, balanced_loss, moments, renormalize, variance_law  # noqa: F401
from ._op import ALL, Op  # noqa: F401 - the registry and the declaration

_modules = dict.fromkeys([*(sys.modules[op.engine.__module__] for op in ALL.values()), balanced_loss])
_public = {name: getattr(module, name) for module in _modules for name in module.__all__}
globals().update(_public)
__all__ = list(_public)
del _modules, _public
