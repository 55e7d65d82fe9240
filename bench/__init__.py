"""fastvae's benchmark suite: ``python -m bench`` (or ``fastvae bench``).

- ``bench.ops``: each fused op against its eager PyTorch composition and ``torch.compile`` of it, forward,
  backward and both: time, kernel launches, bytes saved for backward, and on CUDA peak memory and bandwidth.
- ``bench.loop``: epochs of ``fastvae.train.fit`` against a pytorch/examples-style loop and pythae's trainer.
- ``bench.report``: the markdown tables, CSV files and charts under ``bench/results/``.
- ``bench.accuracy``, ``bench.static``: kernel errors against the reference; the kernels' machine code.
"""
