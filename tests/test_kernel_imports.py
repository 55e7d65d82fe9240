"""Who imports whom: the kernels stand on Triton and torch alone, each op imports its kernel module
statically (one guarded import), ``import fastvae`` pulls in no compile tooling, and the vocabulary of
the ops (reductions, update rules, renormalize modes) has one definition each."""
from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fastvae import reference

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
OPS = {"reparameterize": "kernels_reparameterize", "balanced_mse": "kernels_balanced_mse", "moments": "kernels_moments"}
TOOLING = ("bench", "matplotlib", "fastvae.kernels.aot", "kernels.aot")


def _probe(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter in the checkout (where ``bench`` is importable, so an import
    of it would show) and return the JSON it prints last."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVAE_BACKEND")}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_LOADED = """
import json, sys
import fastvae
from fastvae import backend
ops = {name: getattr(sys.modules["fastvae.ops." + name], attr) for name, attr in %r.items()}
print(json.dumps({
    "modules": sorted(sys.modules),
    "kernels": {name: getattr(module, "__name__", None) for name, module in ops.items()},
    "available": backend.triton_available(),
    "error": repr(backend._kernels_error),
}))
"""


def _tooling(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == name or m.startswith(name + ".") for name in TOOLING)]


def test_import_fastvae_imports_the_kernels_statically_and_no_compile_tooling():
    for interpret in ("1", "0"):
        report = _probe(_LOADED % OPS, TRITON_INTERPRET=interpret)
        assert report["available"] and report["error"] == "None"
        assert report["kernels"] == {name: f"fastvae.kernels.{name}" for name in OPS}
        assert _tooling(report["modules"]) == []
        assert "fastvae.ops.reparameterize" in report["modules"]  # the probe saw the package


def test_without_triton_the_ops_hold_none_and_backend_names_the_reason():
    code = "import sys\nsys.modules['triton'] = None\n" + _LOADED % OPS
    report = _probe(code)
    assert not report["available"]
    assert report["kernels"] == {name: None for name in OPS}
    assert report["error"].startswith("ModuleNotFoundError(") and "triton" in report["error"]
    assert not [m for m in report["modules"] if m.startswith("fastvae.kernels.")]
    assert _tooling(report["modules"]) == []


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(level, module)`` of every import statement in ``path`` (``from . import x``: ``(1, "x")``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.append((node.level, node.module))
            else:
                found += [(node.level, alias.name) for alias in node.names]
    return found


def test_kernel_modules_import_only_triton_torch_and_each_other():
    sources = sorted(KERNELS.glob("*.py"))
    assert {p.stem for p in sources} >= {"__init__", "_launch", *OPS}
    siblings = {p.stem for p in sources}
    for path in sources:
        for level, module in _imports(path):
            top = module.split(".")[0]
            if level:
                assert level == 1 and top in siblings, f"{path.name}: from {'.' * level}{module}"
            else:
                allowed = top in ("triton", "torch", "__future__") or top in sys.stdlib_module_names
                assert allowed, f"{path.name} imports {module}: the kernels stand on Triton and torch alone"
    assert not (KERNELS / "aot.py").exists()
    for path in sources:
        assert "AOT_SPECS" not in path.read_text(), f"{path.name}: the AOT specs live in bench/aot/"


def test_each_op_imports_its_kernel_module_in_one_guarded_import():
    for name, alias in OPS.items():
        tree = ast.parse((REPO / "fastvae" / "ops" / f"{name}.py").read_text())
        guarded = [node for node in tree.body if isinstance(node, ast.Try)
                   and any(isinstance(s, ast.ImportFrom) and s.module == "kernels" and s.level == 2
                           and [(a.name, a.asname) for a in s.names] == [(name, alias)] for s in node.body)]
        assert len(guarded) == 1, f"fastvae/ops/{name}.py: one guarded `from ..kernels import {name} as {alias}`"
    sources = (REPO / "fastvae").rglob("*.py")
    offenders = [str(p.relative_to(REPO)) for p in sources if "backend.kernels()" in p.read_text()]
    assert offenders == []


def test_the_vocabulary_has_one_definition_each():
    # by module name: ``fastvae.ops`` re-exports functions of the same names as its modules
    _checks, ops_balanced_mse, ops_balanced_loss, config, two_stage = map(importlib.import_module, (
        "fastvae.ops._checks", "fastvae.ops.balanced_mse", "fastvae.ops.balanced_loss", "fastvae.train.config",
        "fastvae.two_stage"))

    assert _checks.REDUCTIONS is reference.REDUCTIONS
    assert ops_balanced_mse.UPDATE_RULES is ops_balanced_loss.UPDATE_RULES is reference.UPDATE_RULES
    assert config.UPDATE_RULES is reference.UPDATE_RULES
    assert two_stage.RENORMALIZE[1:] == reference.RENORMALIZE_MODES
    names = {"REDUCTIONS", "UPDATE_RULES", "RENORMALIZE_MODES", "accumulation_dtype"}
    homes = {}
    for path in (REPO / "fastvae").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined = [t.id for t in targets if isinstance(t, ast.Name) and t.id in names]
            elif isinstance(node, ast.FunctionDef):
                defined = [node.name] if node.name in names else []
            else:
                continue
            for name in defined:
                homes.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert homes == {"REDUCTIONS": ["fastvae/reference/reduce.py"],
                     "accumulation_dtype": ["fastvae/reference/reduce.py"],
                     "UPDATE_RULES": ["fastvae/reference/balanced_mse.py"],
                     "RENORMALIZE_MODES": ["fastvae/reference/moments.py"]}
