"""The spec of every fused op: plain, obvious PyTorch formulas and their backward formulas.

One module per op (``reparameterize``, ``balanced_mse``, ``moments``), the noise (``philox``) and the
shared rules (``reduce``); this package's names are their ``__all__``, so a new op's spec module needs no
line here. The Triton kernels and the engine (``fastvae.ops.engine``) are tested against these functions;
nothing here is tuned for speed, and the ops never call it.

Each function takes the tensors of its public op in ``fastvae`` (the seed as an int or tensor, the options
as keywords) and is differentiable through ordinary autograd. The ``*_backward`` functions spell out the
gradient formulas that the backward kernels implement; the tests check them against autograd of the forward.

The vocabulary of the ops lives here, one definition each: ``REDUCTIONS`` and the accumulation rule
(``reduce``), ``UPDATE_RULES`` (``balanced_mse``), ``RENORMALIZE_MODES`` (``moments``); ``fastvae.ops``
imports them. Accumulation is in float32 (float64 for float64 inputs). Elementwise results keep the input dtype;
reduced losses come back in the accumulation dtype (float32 for half-precision inputs).

**Noise.** ``philox_randn`` is Philox 4x32-10 with Box-Muller exactly as Triton's ``tl.randn`` draws
it. The CPU engine draws the same stream: the same counters, words and float32 uniforms bit for bit, and,
where numba runs, Box-Muller's ``log`` and ``cos`` as vectorized float32 polynomials within 4 ulp
of this spec's (``fastvae/ops/engine/loops.py``; without numba, this spec's very bits). A GPU agrees to
about 1e-6, its ``log``/``cos`` being approximate. We kept the stream rather than drawing CPU noise from a
``torch.Generator`` keyed by the seed: compiled, the Philox stream costs less than ``torch.randn``, and a
seed then means one ``z`` on every backend to float32 rounding (a test on CPU of a run on GPU) and bit for
bit on one machine (a resumed run).
"""
import importlib
import pkgutil

__all__: list[str] = []
for _info in pkgutil.iter_modules(__path__):  # one module per op, and the shared rules
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    globals().update({_name: getattr(_module, _name) for _name in _module.__all__})
    __all__ += _module.__all__
del _info, _module
