"""``python -m bench.aot``: compile every kernel for every target, one line each (``harness.main``)."""
from .harness import main

main()
