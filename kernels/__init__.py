"""fastvae's Triton kernels, installed as ``fastvae.kernels`` (setup.py's package_dir).

One module per fused op holds its ``@triton.jit`` kernels and their launchers; ``_launch`` holds
what they share: launch counting, tile choice and the ticket workspace of one-launch reductions.
Importing this package needs Triton; ``fastvae.backend`` imports it lazily and falls back to the
reference when it is missing.
"""
from ._launch import INTERPRETED, count_launches, launch_counts
from . import balanced_mse, moments, reparameterize

__all__ = ["INTERPRETED", "count_launches", "launch_counts", "reparameterize", "balanced_mse", "moments"]
