"""fastvae's Triton kernels, installed as ``fastvae.kernels`` (setup.py's package_dir).

One module per fused op holds its ``@triton.jit`` kernels and their launchers; ``_launch`` holds
what they share: launch counting, tile choice and the ticket workspace of one-launch reductions.
Importing this package needs Triton, torch and nothing else, and imports no op module: each op module of
``fastvae.ops`` imports its kernel module in one guarded import and runs on the CPU engine when Triton is missing
(``fastvae.backend`` keeps the reason). The ahead-of-time compile checks of these kernels live in
``bench/aot/``, outside the installed package.
"""
from ._launch import INTERPRETED, count_launches, launch_counts

__all__ = ["INTERPRETED", "count_launches", "launch_counts"]
