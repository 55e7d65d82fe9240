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
