"""Shared test helpers: the per-dtype tolerance table, a comparison scaled to the values' terms, and the tiny
VAE for scikit-learn's 8x8 digits."""
from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Relative tolerance against the float64 reference, per dtype. float64 results that involve the noise
# are bounded by the float32 noise itself (eps is float32 by definition, and log/cos may differ by an ulp
# between libraries), hence RTOL_NOISE.
RTOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}
RTOL_NOISE = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-6}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float,
                        scale: torch.Tensor | float = 0.0) -> None:
    """``|actual - expected| <= rtol * (|expected| + scale)`` elementwise, infinities equal by sign.

    ``expected`` (float64) is first rounded to ``actual``'s dtype, so a value past that dtype's range
    is expected to be inf, as a correctly rounded result would be.

    ``scale`` is the magnitude of the terms that were added to get ``expected`` (a tensor of its shape
    or a number): the absolute error a sum can carry when its terms cancel.
    """
    expected = expected.detach().to(actual.dtype).to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = torch.as_tensor(scale, dtype=torch.float64).detach().cpu()
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (torch.sign(actual) == torch.sign(expected))
    assert not torch.isnan(actual).any(), "NaN in result"
    bound = rtol * (expected.abs() + scale)
    error = torch.where(both_inf, torch.zeros_like(actual), (actual - expected).abs())
    bad = ~(error <= bound)
    if bad.any():
        worst = torch.argmax(torch.where(bad, error / bound.clamp_min(1e-300), torch.zeros_like(error)))
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements differ beyond rtol={rtol}: worst at flat index "
            f"{int(worst)}: actual {actual.flatten()[worst].item()!r}, expected {expected.flatten()[worst].item()!r}, "
            f"bound {bound.flatten()[worst].item()!r}"
        )


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | float = 0.0) -> float:
    """``max |actual - expected| / (|expected| + scale)`` over finite elements, for reports."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    denom = (expected.abs() + torch.as_tensor(scale, dtype=torch.float64)).clamp_min(1e-300)
    ratio = ((actual - expected).abs() / denom)[finite]
    return float(ratio.max()) if ratio.numel() else 0.0


def tiny_digits_vae(latent: int = 4, seed: int = 0):
    """A small dense VAE for (1, 8, 8) digits, initialized from ``seed``, in eval mode."""
    from fastvae.models import DenseVAE

    torch.manual_seed(seed)
    return DenseVAE((1, 8, 8), latent_dim=latent, hidden=(32,)).eval()


def backward_names(outputs) -> set[str]:
    """The class names of every node of the autograd graph behind ``outputs``."""
    names, stack = set(), [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        names.add(type(node).__name__)
        stack += [n for n, _ in node.next_functions if n is not None and type(n).__name__ not in names]
    return names


def cli_error_line(capsys, args) -> str:
    """Run ``fastvae ARGS``, expect exit status 2 and return stderr, which must be one line without usage."""
    import pytest

    from fastvae.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(map(str, args)))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "usage:" not in err and "weights_only" not in err
    assert len(err.splitlines()) <= 2, err  # the message (and for argparse errors a pointer to --help)
    return err
