"""``cache_dir()``: the one folder where fastvae keeps what it can compute again but would rather not: the
auto-precision decisions (``calibration.json``), the FID classifiers (``fid/``) and the decoded datasets
(``datasets/``). ``$FASTVAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastvae``, else ``~/.cache/fastvae``. Everything
in it may be deleted at any time; a cache that cannot be written is skipped, never an error.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """``root`` when given, else ``$FASTVAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastvae``, else
    ``~/.cache/fastvae``."""
    if root is not None:
        return Path(root)
    if os.environ.get("FASTVAE_CACHE_DIR"):
        return Path(os.environ["FASTVAE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastvae"
