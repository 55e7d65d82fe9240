"""Ahead-of-time compilation of the Triton kernels for real NVIDIA targets, and their machine code.

- ``bench.aot.harness``: the compile matrix, its worker processes and cache, and the checks on the
  machine code (registers, spills, access widths, 32-bit address arithmetic).
- ``bench.aot.<op>``: one spec module per kernel module of ``fastvae.kernels``: the launches that are
  compiled (``AOT_SPECS``) and the typical inputs they are compiled for.

Tooling, not part of the installed package: ``import fastvae`` never loads it.

    python -m bench.aot        # compile everything, one line per kernel, dtype, layout and target
"""
