"""``bench.process`` (the whole ``fastvae train`` process against pytorch/examples' VAE script) and
``bench.examples_vae`` (that script): they run, take turns, pair their ratios and keep the example free of fastvae.
Nothing here asserts anything about time."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import examples_vae, process

REPO = Path(__file__).resolve().parent.parent


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_the_example_trains_on_idx_files_and_writes_its_grids(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 130)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    out = tmp_path / "out"
    assert examples_vae.main(["--epochs", "2", "--out", str(out), "--data-root", str(tmp_path)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["reconstruction_1.png", "reconstruction_2.png",
                                                      "sample_1.png", "sample_2.png"]
    dataset = examples_vae.TorchvisionFashionMNIST.from_folder(tmp_path, train=False)
    image, label = dataset[3]
    assert len(dataset) == 130 and tuple(image.shape) == (1, 28, 28) and 0 <= label < 10


def test_the_example_imports_no_fastvae():
    """Its start-up is the example's own: torch, numpy and PIL, never fastvae."""
    code = "import sys, bench.examples_vae; print(any(m.split('.')[0] == 'fastvae' for m in sys.modules))"
    assert subprocess.check_output([sys.executable, "-c", code], cwd=REPO, text=True).strip() == "False"


def test_processes_take_turns_and_their_ratio_is_taken_pair_by_pair(tmp_path, monkeypatch):
    log = tmp_path / "order"
    script = "import sys, time; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); time.sleep(float(sys.argv[3]))"
    monkeypatch.setattr(process, "commands", lambda epochs, out: {
        "fastvae train": [sys.executable, "-c", script, str(log), "A", "0.05"],
        "pytorch/examples VAE": [sys.executable, "-c", script, str(log), "B", "0.2"]})
    result = process.measure(epochs=1, rounds=3, log=lambda line: None)
    assert log.read_text().split() == ["A", "B"] * 4  # the cold run of each, then the rounds
    assert set(result["cold"]) == {"fastvae train", "pytorch/examples VAE"}
    a, b = result["runs"]["fastvae train"], result["runs"]["pytorch/examples VAE"]
    ratios = sorted(x["wall_s"] / y["wall_s"] for x, y in zip(a, b))
    assert result["ratio_wall"] == {"min": ratios[0], "median": ratios[1], "max": ratios[2]}
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in a + b)
    rows = process.table(result)
    assert rows[-1].startswith(f"| fastvae / examples, run pair by run pair | {ratios[1]:.2f} [{ratios[0]:.2f}, ")


def test_a_failing_process_is_reported_in_one_line():
    with pytest.raises(RuntimeError, match=r"exited 3: the last line$"):
        process.run_process([sys.executable, "-c", "print('first'); print('the last line'); raise SystemExit(3)"],
                            env={})


def test_the_commands_are_the_cli_and_the_example():
    commands = process.commands(3, "/tmp/run")
    assert commands["fastvae train"][1:] == ["-m", "fastvae", "train", "--epochs", "3", "--out", "/tmp/run",
                                             "--no-progress", "--no-tensorboard"]
    assert commands["pytorch/examples VAE"][1:] == ["-m", "bench.examples_vae", "--epochs", "3"]
