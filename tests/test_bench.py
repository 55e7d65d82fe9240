"""The benchmark suite runs and writes its files (no assertion about time), and what it measures is right:
the eager compositions agree with the reference, the launch and saved-bytes counters count what they say,
the torchvision-style dataset gives torchvision's tensors."""
from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

import fastvae
from bench import cases, measure, readme
from bench.__main__ import main as bench_main
from bench.cases import balanced_mse as balanced_case, moments as moments_case, renormalize as renormalize_case
from bench.cases import reparameterize_kl as latent_case, variance_law as variance_case
from bench.loop import TorchvisionFashionMNIST, as_uint8, load_fashion_mnist
from fastvae import reference

CPU = measure.device_name(torch.device("cpu"))  # the results files' name on this machine: cpu-<machine slug>


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_quick_run_writes_tables_csv_and_charts(tmp_path):
    assert bench_main(["--quick", "--only", "balanced_mse,loop", "--loop-models", "dense", "--out", str(tmp_path)]) == 0
    md = (tmp_path / f"{CPU}.md").read_text()
    for mode in ("forward", "backward", "forward+backward"):
        assert f"### balanced_mse: {mode}" in md
    assert ("| case | eager ms [p20, p80] | compile ms [p20, p80] | fused ms [p20, p80] | fused/eager "
            "| fused/compile |") in md
    assert "## Training loop" in md
    rows = _csv(tmp_path / f"{CPU}.csv")
    assert set(measure.Row.columns()) <= set(rows[0])
    measured = {(r["provider"], r["mode"]) for r in rows if r["op"] == "balanced_mse" and r["median_ms"]}
    assert measured == {(p, m) for p in cases.PROVIDERS for m in cases.MODES}
    fused_forward = next(r for r in rows if r["provider"] == "fused" and r["mode"] == "forward")
    assert int(fused_forward["triton_launches"]) >= 1  # counted in interpret mode, in a subprocess
    assert int(fused_forward["saved_beyond_inputs"]) <= 8  # the op saves its inputs and gamma^2 only
    loops = {r["loop"]: r for r in _csv(tmp_path / f"{CPU}_loop.csv")}
    expected = {"fastvae", "bare", "tensors", "tensors-bf16", "tensors-ftz", "plain"} | (
        {"pythae"} if importlib.util.find_spec("pythae") else set())
    assert set(loops) == expected
    # the bare step of fastvae's ops trains in the precision fastvae's auto chose; the careful loops in theirs
    assert loops["fastvae"]["precision"] in ("fp32", "bf16")
    assert loops["bare"]["precision"] == loops["fastvae"]["precision"]
    assert [loops[name]["precision"] for name in ("tensors", "tensors-bf16", "tensors-ftz")] == ["fp32", "bf16", "fp32"]
    for name in ("fastvae", "bare", "tensors", "tensors-bf16", "tensors-ftz", "plain"):
        assert 0 < float(loops[name]["step_gflops"]) and 0 < float(loops[name]["of_gemm"]), name
    assert all(float(r["epoch_s"]) > 0 and float(r["images_per_s"]) > 0 for r in loops.values())
    # every loop's epoch includes the same end-of-epoch work as fit's, so it is longer than its steps alone
    assert all(0 < float(r["train_s"]) < float(r["epoch_s"]) and float(r["cpu_s"]) > 0 for r in loops.values())
    assert float(loops["plain"]["vs_plain"]) == pytest.approx(1.0)
    png = tmp_path / f"{CPU}_balanced_mse.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run of another op keeps the first run's rows and sections
    assert bench_main(["--quick", "--only", "moments", "--providers", "eager,fused", "--out", str(tmp_path)]) == 0
    ops_now = {r["op"] for r in _csv(tmp_path / f"{CPU}.csv")}
    assert ops_now == {"balanced_mse", "moments"}
    md = (tmp_path / f"{CPU}.md").read_text()
    assert "### moments: forward" in md and "### balanced_mse: forward" in md and "## Training loop" in md


def test_unknown_name_is_refused():
    with pytest.raises(SystemExit, match="unknown name 'nope'"):
        bench_main(["--quick", "--only", "nope"])


def test_bench_is_python_m_bench_only_and_nothing_edits_sys_path():
    """The suite is ``python -m bench`` of a checkout; the installed package has no ``fastvae bench``
    and puts nothing on ``sys.path``."""
    from pathlib import Path

    from fastvae.cli import COMMANDS

    assert "bench" not in COMMANDS
    package = Path(fastvae.__file__).parent
    offenders = [str(p) for p in package.rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []


def test_readme_tables_are_generated_from_the_results_files():
    """README's performance tables (in docs/performance.md, which README links) are what ``python -m bench.readme``
    writes from bench/results/."""
    current = readme.PERFORMANCE.read_text()
    assert readme.render(current, readme.block()) == current, "run python -m bench.readme"
    assert readme.main(["--check"]) == 0


def test_readme_check_fails_when_a_number_drifts(tmp_path):
    import shutil

    machine = readme.machine_files()[0]  # the results of a machine that measured (not necessarily this one)
    for name in (f"{machine}.csv", f"{machine}_loop.csv", f"{machine}.json"):
        shutil.copy(readme.RESULTS / name, tmp_path / name)
    rows = _csv(tmp_path / f"{machine}_loop.csv")
    rows[0]["epoch_s"] = str(float(rows[0]["epoch_s"]) * 2)
    with open(tmp_path / f"{machine}_loop.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    current = readme.PERFORMANCE.read_text()
    assert readme.render(current, readme.block(tmp_path)) != current


def test_each_machine_keeps_its_own_results_and_tables(tmp_path):
    """A second machine's results sit beside the first one's: two sets of files, two named parts of the tables."""
    import json
    import shutil

    first = readme.machine_files()[0]
    for suffix in (".csv", "_loop.csv", ".json"):
        shutil.copy(readme.RESULTS / f"{first}{suffix}", tmp_path / f"{first}{suffix}")
        shutil.copy(readme.RESULTS / f"{first}{suffix}", tmp_path / f"cpu-intel-xeon-amx-bf16-2c{suffix}")
    shutil.copy(readme.RESULTS / "cpu-intel-xeon-amx-bf16-2c_process.json", tmp_path)  # a record, not a machine
    meta = json.loads((tmp_path / "cpu-intel-xeon-amx-bf16-2c.json").read_text())
    meta["machine"] = "Intel(R) Xeon(R) Platinum (avx512f, amx_bf16; 2 cores, 2 torch threads); torch 2.13.0+cpu"
    (tmp_path / "cpu-intel-xeon-amx-bf16-2c.json").write_text(json.dumps(meta))
    assert readme.machine_files(tmp_path) == sorted([first, "cpu-intel-xeon-amx-bf16-2c"])
    text = readme.block(tmp_path)
    assert "#### Intel(R) Xeon(R) Platinum (avx512f, amx_bf16" in text
    assert text.count("#### ") == 2 and text.count("| op | forward | backward | forward+backward |") == 2
    assert "Measured on 2 machine(s)" in text
    assert CPU.startswith("cpu-") and len(CPU) > len("cpu-")  # this machine's own name for its files


def test_step_flops_are_the_linear_layers_forward_and_backward():
    """A dense step's FLOPs: 2 B in out for each linear's forward, as much again for its weight's gradient and
    for its input's gradient, but the first layer's (the data needs none)."""
    from bench.loop import BATCH, build, step_flops

    linears = [m for m in build("dense").modules() if isinstance(m, torch.nn.Linear)]
    per_layer = [2 * BATCH * m.in_features * m.out_features for m in linears]
    assert step_flops("dense", torch.device("cpu")) == 3 * sum(per_layer) - per_layer[0]


def test_eager_compositions_agree_with_the_reference():
    torch.manual_seed(0)
    mu, logvar = torch.randn(64, 8), torch.randn(64, 8)
    z, kl = latent_case.eager(mu, logvar)
    torch.testing.assert_close(kl, reference.kl_divergence(mu, logvar, reduction="batchmean"))
    assert z.shape == mu.shape

    x = torch.rand(8, 1, 28, 28)
    x_hat = x + 0.1 * torch.randn_like(x)
    r_eager, r_ref = torch.full((), 0.5), torch.full((), 0.5)
    (loss,) = balanced_case.eager(x_hat, x, r_eager)
    torch.testing.assert_close(loss, reference.balanced_mse(x_hat, x, r_ref))
    torch.testing.assert_close(r_eager, r_ref)

    z = 3 + 2 * torch.randn(500, 8)
    for got, want in zip(moments_case.eager(z), reference.moments(z)):
        torch.testing.assert_close(got, want)
    target_mean, target_var = torch.zeros(8), torch.full((8,), 0.8)
    torch.testing.assert_close(renormalize_case.eager(z, target_mean, target_var)[0],
                               reference.renormalize(z, target_mean, target_var))
    for got, want in zip(variance_case.eager(mu, logvar), reference.variance_law(mu, logvar)):
        torch.testing.assert_close(got, want)


def test_kernel_counter_counts_computing_aten_ops_only():
    a, b = torch.randn(16, 4), torch.randn(16, 4)
    cpu = torch.device("cpu")
    assert measure.count_kernels(lambda: (a * b).sum(), cpu) == 2
    assert measure.count_kernels(lambda: a.view(-1).t().unsqueeze(0), cpu) == 0
    assert measure.count_kernels(lambda: a.to(torch.float64), cpu) == 1  # a copy counts once


def test_saved_for_backward_separates_inputs_from_intermediates():
    mu = torch.randn(128, 16, requires_grad=True)
    logvar = torch.randn(128, 16, requires_grad=True)
    total, beyond = measure.saved_for_backward(latent_case.eager, (mu, logvar))
    assert beyond >= 128 * 16 * 4  # autograd of the composition keeps at least one intermediate
    total, beyond = measure.saved_for_backward(lambda m, v: fastvae.reparameterize_kl(m, v), (mu, logvar))
    assert total == 3 * 128 * 16 * 4 + 8 and beyond == 128 * 16 * 4 + 8  # mu, logvar, the seed and the CPU's noise
    with fastvae.use_backend("triton"):  # the kernels (the GPU's path) recompute the noise
        total, beyond = measure.saved_for_backward(lambda m, v: fastvae.reparameterize_kl(m, v), (mu, logvar))
    assert total == 2 * 128 * 16 * 4 + 8 and beyond == 8  # mu, logvar and the int64 seed


def test_torchvision_style_dataset_gives_torchvision_tensors():
    images, labels = load_fashion_mnist(limit=64)
    dataset = TorchvisionFashionMNIST(as_uint8(images), labels)
    assert len(dataset) == 64
    image, target = dataset[5]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert torch.equal(image, images[5]) and target == int(labels[5])
    with pytest.raises(ValueError, match="uint8"):
        TorchvisionFashionMNIST(images[:, 0], labels)


def test_cpu_timer_reports_percentiles_from_torch_timer():
    settings = measure.Settings(budget_s=0.01, min_rounds=3)
    median, p20, p80, rounds = measure.time_cpu(lambda: torch.ones(64).sum(), settings)
    assert 0 < p20 <= median <= p80 < 50 and rounds >= 3


def test_the_other_loops_end_each_epoch_as_fit_does(tmp_path):
    """end_of_epoch: the test split evaluated without updating the running MSE, two grids and a checkpoint."""
    from bench.loop import TensorLoop, build, end_of_epoch

    torch.manual_seed(0)
    images = torch.rand(256, 1, 28, 28)
    loop = TensorLoop(build("dense"), images, torch.device("cpu"))
    loop.epoch()
    running = loop.running_mse.clone()
    loss = end_of_epoch(loop.model, loop.optimizer, loop.running_mse, images[:64], str(tmp_path), 1)
    assert loss == loss and torch.equal(loop.running_mse, running) and loop.model.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "recon-epoch001.png", "samples-epoch001.png"]
    state = torch.load(tmp_path / "checkpoint.pt")
    assert set(state) == {"model", "optimizer", "running_mse", "epoch"} and state["optimizer"]["state"]


def test_the_loop_overhead_is_fastvae_steps_over_the_bare_steps():
    rows = [{"model": "dense", "loop": "fastvae", "train_s": 2.1}, {"model": "dense", "loop": "bare", "train_s": 2.0},
            {"model": "conv", "loop": "fastvae", "train_s": 7.0}]
    assert readme.loop_overhead(rows) == ["dense 784-256-64-32-16 1.05x"]  # conv has no bare row: no claim
