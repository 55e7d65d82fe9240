"""``fastvae bench``: the benchmark suite of a source checkout (``bench/`` beside ``fastvae/``), the same
as ``python -m bench``: the fused ops against eager PyTorch and ``torch.compile``, and the training loop
against a pytorch/examples-style loop (and pythae's trainer when installed)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def _bench_main():
    """``bench.__main__`` of the checkout this fastvae was imported from (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "bench" / "__main__.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return importlib.import_module("bench.__main__")
    return None


def register(subparsers) -> None:
    module = _bench_main()
    parser = subparsers.add_parser("bench", help="benchmark the fused ops and the training loop (python -m bench)",
                                   description=(module.__doc__ or "").split("\n\n")[0] if module else None)
    if module is not None:
        module.add_arguments(parser)
    else:
        parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)


def run(args) -> int:
    module = _bench_main()
    if module is None:
        raise SystemExit("fastvae bench needs the source checkout: bench/ lives beside fastvae/ in the repository "
                         "(git clone ... && pip install -e .), not in the installed package")
    args.command_line = "fastvae bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" else "fastvae bench"
    return module.run(args)
