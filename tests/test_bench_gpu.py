"""``python -m bench.gpu --dry-run``: the GPU acceptance run's flow on the CPU, so that it cannot rot (issue 21)."""
import torch

from bench import gpu
from bench.measure import device_name

CPU = device_name(torch.device("cpu"))


def test_dry_run_writes_every_section(tmp_path):
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = (tmp_path / f"{CPU}.md").read_text()
    assert "(dry run: CPU, interpreter, tiny sizes)" in text
    tests_line = text.split("## Tests on the device")[1].split("\n\n")[1]
    assert " passed" in tests_line and "failed" not in tests_line, tests_line
    ops = [line for line in text.split("## Ops")[1].split("## Training")[0].splitlines() if line.startswith("| ")]
    assert len(ops) >= 1 + 6  # the header, balanced_mse's three modes for eager and fused
    fused = [line for line in ops if "| fused |" in line]
    assert fused and all(" / -" not in line.split("|")[5] for line in fused)  # every fused row has a model count
    train = [line for line in text.split("## Training")[1].splitlines() if line.startswith("| dense |")]
    assert len(train) == 1 and "failed" not in train[0], train
    measured_launches = float(train[0].split("|")[5])
    assert measured_launches > 0


def test_predicted_seconds_is_the_larger_of_launch_and_memory_bounds():
    from bench.static import T_CPU_ATEN, T_GPU

    assert gpu.predicted_seconds(10, 0, 1e12) == 10 * T_CPU_ATEN
    assert gpu.predicted_seconds(1, 10**9, 1e9) == T_GPU + 1.0
