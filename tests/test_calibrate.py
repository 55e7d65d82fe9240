"""``precision="auto"`` comes from timing real steps (fastvae/train/calibrate.py): a fake clock that makes one
precision faster decides it, the decision is cached per machine, model and batch, and the calibration leaves the
run exactly as it would be without it."""
import json

import pytest
import torch

from fastvae.losses import build_loss
from fastvae.machine import describe_machine, machine_label, machine_slug
from fastvae.models import DenseVAE
from fastvae.train import TrainConfig, calibrate, fit
from fastvae.train.objective import TrainObjective

CPU = torch.device("cpu")


class FakeClock:
    """Advances by ``costs[precision]`` every training step: the step's precision is what autocast says."""

    def __init__(self, fp32: float, bf16: float):
        self.now, self.costs, self.reads = 0.0, {"fp32": fp32, "bf16": bf16}, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


CLOCK: list = []  # the clock of the running test; module-level, so that the calibration's deep copies share it


class ClockedObjective(torch.nn.Module):
    """The real training objective of a tiny dense VAE; each call costs the clock what its precision costs,
    and ``non_finite_under_bf16`` makes the bf16 loss infinite."""

    def __init__(self, non_finite_under_bf16=False):
        super().__init__()
        torch.manual_seed(0)
        self.objective = TrainObjective(DenseVAE((1, 8, 8), 2, hidden=(8,)), build_loss("balanced"))
        self.non_finite_under_bf16 = non_finite_under_bf16

    def forward(self, x):
        bf16 = torch.is_autocast_enabled("cpu")
        CLOCK[0].now += CLOCK[0].costs["bf16" if bf16 else "fp32"]
        loss, *rest = self.objective(x)
        if bf16 and self.non_finite_under_bf16:
            loss = loss * float("inf")
        return (loss, *rest)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVAE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration.json"


def _choose(clock, *, batch=16, run_steps=100_000, objective=None, describe=None):
    CLOCK[:] = [clock]
    return calibrate.calibrate_precision(objective or ClockedObjective(), lambda p: torch.optim.Adam(p, lr=1e-3),
                                         torch.rand(batch, 1, 8, 8), CPU, run_steps=run_steps,
                                         describe=describe or {"model": "tiny"}, timer=clock)


@pytest.mark.parametrize("fp32, bf16, chosen", [(1.0, 2.0, "fp32"), (2.0, 1.0, "bf16"), (1.0, 0.99, "fp32")])
def test_the_precision_the_clock_measures_faster_is_chosen(cache, fp32, bf16, chosen):
    """fp32 faster: fp32; bf16 faster: bf16; bf16 within the margin of fp32: fp32 (the reference precision)."""
    choice = _choose(FakeClock(fp32, bf16))
    assert (choice.precision, choice.how) == (chosen, "measured")
    assert choice.ms_per_step == pytest.approx({"fp32": fp32 * 1e3, "bf16": bf16 * 1e3})
    assert choice.steps == calibrate.ROUNDS * calibrate.STEPS
    assert f"precision auto: {chosen}, measured on this machine" in choice.message()


def test_the_cached_decision_is_reused_for_the_same_machine_model_and_batch(cache):
    first = _choose(FakeClock(2.0, 1.0))
    assert first.precision == "bf16" and cache.is_file()
    again = FakeClock(1.0, 2.0)  # would choose fp32 if it were asked
    reused = _choose(again)
    assert (reused.precision, reused.how, again.reads) == ("bf16", "cached", 0)
    assert "as measured on" in reused.message()
    # another batch size or another model is another step: measured anew
    assert _choose(FakeClock(1.0, 2.0), batch=32).how == "measured"
    assert _choose(FakeClock(1.0, 2.0), describe={"model": "other"}).precision == "fp32"
    assert len(json.loads(cache.read_text())) == 3


class BusyClock(FakeClock):
    """fp32 faster, but every third read of the clock comes 10 s late: another process took the cores (two
    rounds of bf16 take more than twice as long as its third)."""

    def __init__(self):
        super().__init__(1.0, 2.0)
        self.reads_seen = 0

    def __call__(self) -> float:
        self.reads_seen += 1
        if self.reads_seen % 3 == 0:
            self.now += 10 * self.costs["fp32"]
        return super().__call__()


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(cache):
    busy = _choose(BusyClock())
    assert busy.how == "busy" and busy.spread > calibrate.NOISE
    assert "not cached" in busy.message() and not cache.exists()
    # the next run measures again, and caches a steady measurement
    assert (_choose(FakeClock(2.0, 1.0)).how, _choose(FakeClock(1.0, 2.0)).how) == ("measured", "cached")
    assert cache.is_file()


def test_a_foreign_cache_file_is_ignored_and_replaced(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("not json")
    assert _choose(FakeClock(2.0, 1.0)).how == "measured"
    assert len(json.loads(cache.read_text())) == 1


def test_a_precision_whose_loss_is_not_finite_is_never_chosen(cache):
    choice = _choose(FakeClock(2.0, 1.0), objective=ClockedObjective(non_finite_under_bf16=True))
    assert choice.precision == "fp32" and choice.ms_per_step["bf16"] == float("inf")


def test_a_run_too_short_to_measure_trains_in_fp32_without_timing(cache):
    clock = FakeClock(2.0, 1.0)
    choice = _choose(clock, run_steps=100)
    assert (choice.precision, choice.how, clock.reads) == ("fp32", "too-short", 0)
    assert not cache.exists()


def test_calibration_leaves_the_run_as_it_would_be_without_it(tmp_path, cache, monkeypatch):
    """Timing runs on copies and restores the random streams: an auto run that measured and chose fp32 ends
    bitwise equal to a run told fp32; its config.json keeps the concrete choice and what was measured."""
    x = torch.rand(64, 1, 8, 8)
    monkeypatch.setattr(calibrate, "BUDGET", 100.0)  # let a 4-step run measure
    monkeypatch.setattr(calibrate, "MARGIN", 1.0)  # bf16 would have to take no time at all
    runs = {}
    for precision in ("auto", "fp32"):
        torch.manual_seed(0)
        model = DenseVAE((1, 8, 8), 2, hidden=(8,))
        config = TrainConfig(out=str(tmp_path / precision), epochs=1, batch_size=16, progress=False,
                             tensorboard=False, precision=precision, log_every=2)
        runs[precision] = (fit(model, x, config), model)
    (auto, auto_model), (fp32, fp32_model) = runs["auto"], runs["fp32"]
    for a, b in zip(auto_model.state_dict().values(), fp32_model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(auto.policy.running_mse, fp32.policy.running_mse)
    saved = json.loads((auto.out_dir / "config.json").read_text())
    assert saved["precision"] == "fp32" and saved["auto"]["precision"]["how"] == "measured"
    assert set(saved["auto"]["precision"]["ms_per_step"]) == {"fp32", "bf16"}
    assert TrainConfig.load(auto.out_dir / "config.json").precision == "fp32"


def test_fit_trains_in_the_precision_measured_and_reuses_it(tmp_path, cache, monkeypatch):
    """The choice reaches the run (bf16 when bf16 measured faster) and a second run of the same step reuses it."""
    x = torch.rand(64, 1, 8, 8)
    monkeypatch.setattr(calibrate, "BUDGET", 100.0)
    monkeypatch.setattr(calibrate, "_time_candidates", lambda *args: ({"fp32": 2.0, "bf16": 1.0}, 1.0))
    config = dict(epochs=1, batch_size=16, progress=False, tensorboard=False)
    first = fit(DenseVAE((1, 8, 8), 2, hidden=(8,)), x, TrainConfig(out=str(tmp_path / "a"), **config))
    assert TrainConfig.load(first.out_dir / "config.json").precision == "bf16"

    def measured_again(*args):
        raise AssertionError("the cached decision should have been reused")

    monkeypatch.setattr(calibrate, "_time_candidates", measured_again)
    second = fit(DenseVAE((1, 8, 8), 2, hidden=(8,)), x, TrainConfig(out=str(tmp_path / "b"), **config))
    saved = json.loads((second.out_dir / "config.json").read_text())
    assert saved["precision"] == "bf16" and saved["auto"]["precision"]["how"] == "cached"


def test_the_machine_is_described_by_model_flags_cores_and_versions():
    described = describe_machine("cpu")
    assert described["kind"] == "cpu" and described["cores"] >= 1 and described["torch"] == torch.__version__
    assert set(described["isa"]) <= set(__import__("fastvae.machine").machine.ISA_FLAGS)
    label = machine_label(described)
    assert described["name"] in label and f"torch {torch.__version__}" in label
    slug = machine_slug({**described, "name": "Intel(R) Xeon(R) Platinum 8480+", "isa": ["avx512f", "amx_bf16"],
                         "cores": 2})
    assert slug == "intel-xeon-platinum-8480-amx-bf16-2c"
    assert machine_slug({**described, "name": "AMD EPYC", "isa": ["avx2", "avx512f", "avx512_bf16"],
                         "cores": 2}) == "amd-epyc-avx512-bf16-2c"


def test_a_compiled_run_times_eager_copies_of_its_step(tmp_path, cache, monkeypatch):
    """Under compile the calibration times the eager step: no candidate is compiled."""
    monkeypatch.setattr(calibrate, "BUDGET", 100.0)
    timed = []

    class Timed(Exception):
        """Stops the run once the calibration has been handed its objective (nothing needs to train)."""

    def record(objective, *args):
        timed.append(objective)
        raise Timed

    monkeypatch.setattr(calibrate, "_time_candidates", record)
    config = TrainConfig(out=str(tmp_path / "run"), epochs=1, batch_size=16, progress=False, tensorboard=False,
                         compile=True)
    with pytest.raises(Timed):
        fit(DenseVAE((1, 8, 8), 2, hidden=(8,)), torch.rand(64, 1, 8, 8), config)
    (objective,) = timed
    assert objective.runner is objective.model
