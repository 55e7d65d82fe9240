"""The shape of the package: what ``import fastvae`` pulls in and what it leaves alone."""
import json
import os
import subprocess
import sys

_PROBE = """
import json, sys
path = list(sys.path)
import fastvae
print(json.dumps({"modules": sorted(sys.modules), "path_kept": sys.path == path}))
"""

#: tooling and plotting that the runtime package must not load: the benchmark suite, the ahead-of-time
#: compile checks, matplotlib (training writes its grids with PIL; figures belong to the commands that draw them)
_NOT_AT_IMPORT = ("matplotlib", "bench", "kernels.aot", "fastvae.kernels.aot", "fastvae.plots",
                  "fastvae.experiment_plots", "fastvae.cli")


def test_import_fastvae_pulls_in_no_plotting_no_tooling_and_keeps_sys_path(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = [m for m in report["modules"] if any(m == name or m.startswith(name + ".") for name in _NOT_AT_IMPORT)]
    assert loaded == []
    assert "fastvae.train.loop" in report["modules"] and "fastvae.ops" in report["modules"]  # the probe saw them
    assert report["path_kept"]


def test_the_layout_tree_follows_the_modules(tmp_path):
    """README's layout block is generated from the files: a new module shows up with its docstring's first
    sentence, and README's own block is what the modules say (``python -m bench.readme --check``)."""
    from bench import readme

    for folder in ("fastvae/train", "kernels", "bench", "tests"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "fastvae" / "__init__.py").write_text('"""The library. More words."""\n')
    (tmp_path / "fastvae" / "train" / "__init__.py").write_text('"""The loop."""\n')
    (tmp_path / "kernels" / "__init__.py").write_text('"""Kernels."""\n')
    (tmp_path / "bench" / "__init__.py").write_text('"""Bench."""\n')
    (tmp_path / "tests" / "test_a.py").write_text("")
    before = readme.layout_block(tmp_path)
    rows = [line.split() for line in before.splitlines()]
    assert ["fastvae/", "The", "library."] in rows and ["train/", "The", "loop."] in rows
    (tmp_path / "fastvae" / "train" / "step.py").write_text('"""One ``step``: forward, backward, update."""\n')
    after = readme.layout_block(tmp_path)
    assert after != before
    assert any(line.split() == ["step.py", "One", "step:", "forward,", "backward,", "update."]
               for line in after.splitlines())
    assert readme.render_all(readme.LAYOUT.read_text()) == readme.LAYOUT.read_text(), "run python -m bench.readme"
