"""The house style holds everywhere: ``ruff check`` with the repository's ruff.toml (lines of at most 120
characters, pyflakes and pycodestyle errors and warnings) finds nothing."""
from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
