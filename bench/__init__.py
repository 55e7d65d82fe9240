"""fastvae's benchmark suite: ``python -m bench``.

- ``bench.cases``: one module per fused op: its eager PyTorch composition, inputs, sizes, traffic model.
- ``bench.measure``: time (``torch.utils.benchmark.Timer``; ``triton.testing.do_bench`` on CUDA), kernel
  launches, bytes saved for backward, peak memory.
- ``bench.__main__``: the run: each op against its eager composition and ``torch.compile`` of it, forward,
  backward and both; ``bench.loop``: epochs of ``fastvae.train.fit`` against hand-written loops and pythae.
- ``bench.report``: the markdown tables, CSV files and charts under ``bench/results/``; ``bench.readme``:
  README's performance tables, generated from those files.
- ``bench.accuracy``, ``bench.static``: kernel errors against the reference; the kernels' machine code.
- ``bench.aot``: the ahead-of-time compile of every kernel for NVIDIA targets and the checks on its machine
  code (``harness``), with one spec module per kernel module (``bench/aot/<op>.py``: the launches compiled).
"""
