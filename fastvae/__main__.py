"""``python -m fastvae``: the ``fastvae`` command (``fastvae.cli.main``)."""
import sys

from .cli import main

sys.exit(main())
