"""The training loop (fastvae.train), fastvae.load and the train / sample commands, on real data."""
import csv
import dataclasses
import json

import pytest
import torch

import fastvae
from fastvae.cli import main
from fastvae.data import load_dataset
from fastvae.models import DenseVAE
from fastvae.run import load_checkpoint
from fastvae.train import NonFiniteLossError, TrainConfig, epoch_permutation, fit


@pytest.fixture(scope="module")
def fashion():
    """512 training and 256 test images of the real Fashion-MNIST."""
    x, _ = load_dataset("fashion-mnist", download=False)
    x_test, _ = load_dataset("fashion-mnist", split="test", download=False)
    return x[:512].clone(), x_test[:256].clone()


def _tiny(seed=0):
    torch.manual_seed(seed)
    return DenseVAE((1, 28, 28), 4, hidden=(32,))


def _config(out, **kw):
    return TrainConfig(**{"out": str(out), "epochs": 2, "batch_size": 64, "progress": False, "log_every": 4,
                          "n_samples": 16, "tensorboard": False, **kw})


def test_config_round_trips_through_json(tmp_path):
    config = TrainConfig(dataset="digits", hidden=[64, 32], lr=3e-4, precision="bf16", out="runs/x")
    config.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == config
    assert json.loads((tmp_path / "c.json").read_text())["hidden"] == [64, 32]


@pytest.mark.parametrize("kw,error,match", [
    ({"loss": "l1"}, ValueError, "loss must be one of"),
    ({"epochs": 0}, ValueError, "epochs must be positive"),
    ({"batch_size": "64"}, TypeError, "batch_size must be an int"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"precision": "fp8"}, ValueError, "precision"),
    ({"model": "conv", "hidden": [64, 32]}, ValueError, "hidden"),
    ({"gamma_momentum": 2.0}, ValueError, "gamma_momentum"),
    ({"kl_weight": float("nan")}, ValueError, "kl_weight must be a finite number"),
    ({"kl": "half"}, ValueError, "kl must be one of"),
])
def test_bad_config_fields_are_named(kw, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**kw)
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"epoch": 3})


def test_fit_writes_the_run_and_load_reads_it_back(tmp_path, fashion):
    x, x_test = fashion
    seen = []
    model = _tiny()
    result = fit(model, x, _config(tmp_path / "run"), test_data=x_test,
                 callbacks=[lambda step, epoch_end, **kw: seen.append((step, epoch_end))])
    run = tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "metrics.csv",
                 "images/samples-epoch001.png", "images/recon-epoch002.png"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp"))
    assert result.step == 16 and result.epoch == 2
    assert seen == [(s, False) for s in range(1, 9)] + [(8, True)] + [(s, False) for s in range(9, 17)] + [(16, True)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16] and [r["epoch"] for r in test_rows] == [1, 2]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert test_rows[-1]["gamma"] == pytest.approx(float(result.policy.gamma)) and test_rows[-1]["gamma"] < 1
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == len(rows)
    loaded, config = fastvae.load(run)
    # a 16-step run is too short to time the precisions: auto trains it in fp32, and the run folder says so
    assert config == dataclasses.replace(_config(tmp_path / "run"), precision="fp32") and not loaded.training
    assert json.loads((run / "config.json").read_text())["auto"]["precision"]["how"] == "too-short"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(_tiny(), x, _config(run))


def test_resume_is_exact(tmp_path, fashion):
    """An interrupted run resumed from its last checkpoint ends bitwise equal to an uninterrupted one."""
    x, x_test = fashion
    whole = _tiny()
    whole_result = fit(whole, x, _config(tmp_path / "whole", checkpoint_every=5), test_data=x_test)

    def interrupt(step, **_):
        if step == 11:  # after the checkpoint at step 10, in the middle of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_tiny(), x, _config(tmp_path / "cut", checkpoint_every=5), test_data=x_test, callbacks=[interrupt])
    assert load_checkpoint(tmp_path / "cut")["step"] == 10
    resumed = _tiny(seed=1)  # another init: everything comes from the checkpoint
    resumed_result = fit(resumed, x, _config(tmp_path / "cut", checkpoint_every=5), test_data=x_test, resume=True)
    assert resumed_result.step == 16
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(whole_result.policy.running_mse, resumed_result.policy.running_mse)
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    steps = [json.loads(r)["step"] for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if json.loads(r)["split"] == "train"]
    assert steps == sorted(set(steps))  # rows written after the checkpoint were dropped, not repeated


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, fashion):
    x = fashion[0].clone()

    def corrupt(step, **_):
        if step == 11:  # an image of the 4th batch of epoch 2 (step 8 + 4 = 12) turns NaN
            x[epoch_permutation(x.shape[0], 0, 1)[3 * 64 + 5]] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"step 12 \(epoch 2\): the reconstruction term is nan") as info:
        fit(_tiny(), x, _config(tmp_path / "run", checkpoint_every=10), callbacks=[corrupt])
    assert "checkpoint" in str(info.value) and "(step 10)" in str(info.value)
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("kw", [
    {"loss": "beta", "kl_weight": 0.5},
    {"loss": "learned-gamma", "lr_schedule": "cosine", "warmup_steps": 2, "grad_clip": 1.0},
    {"precision": "bf16"},
])
def test_policies_schedule_clipping_and_bf16_train(tmp_path, fashion, kw):
    x, x_test = fashion
    result = fit(_tiny(), x, _config(tmp_path / "run", **kw), test_data=x_test)
    metrics = result.test_metrics
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "rec", "kl", "mse"))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if kw.get("loss") == "beta":
        assert metrics["gamma"] is None
    if kw.get("loss") == "learned-gamma":
        assert metrics["gamma"] != 1.0  # log_gamma was trained
        lrs = [r["lr"] for r in rows if r["split"] == "train"]
        assert lrs[-1] < lrs[0] and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at the end


def test_fit_rejects_bad_data(tmp_path, fashion):
    x, _ = fashion
    with pytest.raises(ValueError, match="model takes"):
        fit(_tiny(), torch.rand(10, 1, 8, 8), _config(tmp_path / "a"))
    with pytest.raises(TypeError, match="floating"):
        fit(_tiny(), (x * 255).to(torch.uint8), _config(tmp_path / "b"))
    with pytest.raises(TypeError, match="encode"):
        fit(torch.nn.Linear(3, 3), x, _config(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="resume"):
        fit(_tiny(), x, _config(tmp_path / "d"), resume=True)


# ---------------------------------------------------------------------------------------- commands
def test_train_and_sample_commands(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "100", "--hidden", "32",
            "--latent", "4", "--out", str(run), "--no-progress", "--no-tensorboard"]
    assert main(args) == 0
    assert "run folder" in capsys.readouterr().out
    config = TrainConfig.load(run / "config.json")
    assert config.hidden == [32] and config.dataset == "digits" and config.epochs == 1
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert load_checkpoint(run)["epoch"] == 2
    assert main(["sample", str(run), "--n", "9", "--out", str(tmp_path / "s.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size[0] > 3 * 8


@pytest.mark.parametrize("args,match", [
    (["train", "--loss", "l1"], "loss must be one of"),
    (["train", "--epochs", "zero"], "invalid int value"),
    (["train", "--dataset", "imagenet", "--out", "OUT"], "name must be one of"),
    (["train", "--resume", "OUT", "--lr", "0.1"], "cannot change --lr when resuming"),
    (["sample", "OUT"], "no checkpoint"),
])
def test_bad_command_arguments_give_clear_errors(tmp_path, capsys, args, match):
    args = [str(tmp_path / "x") if a == "OUT" else a for a in args]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


def test_default_falls_back_to_digits_without_fashion_mnist(tmp_path, monkeypatch, capsys):
    from fastvae import data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setenv("FASTVAE_DATA", str(tmp_path / "data"))
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().out
    config = TrainConfig.load(run / "config.json")
    assert config.dataset == "digits" and config.epochs == 1 and config.images_every == 25
    assert (run / "images" / "samples-epoch001.png").is_file()  # the last epoch always has its grids


# ---------------------------------------------------------------------------------------- objective options
def test_kl_modes_and_no_sampling_follow_their_formulas():
    from fastvae.losses import BetaLoss
    from fastvae.train.objective import TrainObjective

    model = _tiny()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        mu, logvar = model.encode(x)
    def mse(x_hat):  # BetaLoss's rec
        return float((x_hat.detach() - x).square().sum() / 8)

    full = float(0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum() / 8)
    expected = {"full": full, "quadratic": float(mu.square().sum() / 16), "none": 0.0}
    for kl, value in expected.items():
        with torch.no_grad():
            loss, rec, kl_term, _ = TrainObjective(model, BetaLoss(), kl_weight=0.5, kl=kl, sampling=False)(x)
        assert float(rec) == pytest.approx(mse(model.decode(mu)), rel=1e-5)  # z = mu
        assert float(kl_term) == pytest.approx(value, rel=1e-5, abs=1e-7)
        assert float(loss) == pytest.approx(float(rec) + 0.5 * value, rel=1e-5)
    torch.manual_seed(3)
    with torch.no_grad():
        _, rec_sampled, kl_sampled, _ = TrainObjective(model, BetaLoss(), kl="quadratic")(x)
    assert float(rec_sampled) != pytest.approx(mse(model.decode(mu)), rel=1e-5)  # z = mu + sigma eps
    assert float(kl_sampled) == pytest.approx(expected["quadratic"], rel=1e-5)


@pytest.mark.parametrize("kl", ["quadratic", "none"])
def test_fit_trains_with_other_kl_terms_and_without_sampling(tmp_path, fashion, kl):
    x, x_test = fashion
    result = fit(_tiny(), x, _config(tmp_path / "run", kl=kl, sampling=False, epochs=1), test_data=x_test)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    if kl == "none":
        assert all(r["kl"] == 0.0 and r["loss"] == pytest.approx(r["rec"]) for r in train_rows)
    assert TrainConfig.load(tmp_path / "run" / "config.json").kl == kl and result.step == 8


@pytest.mark.parametrize("kl,sampling", [("quadratic", False), ("none", True)])
def test_test_rows_are_computed_with_the_training_objective(tmp_path, fashion, kl, sampling):
    """The end-of-epoch rows of a --kl / --no-sampling run describe the model as trained: the KL term of its
    mode and z = mu (or z sampled with the evaluation's seed), recomputed here from the final model."""
    from fastvae._util import derive_seed, eval_mode

    x, x_test = fashion
    model = _tiny()
    # precision fp32: the rows are recomputed below in fp32
    config = _config(tmp_path / "run", kl=kl, sampling=sampling, epochs=1, seed=4, precision="fp32")
    result = fit(model, x, config, test_data=x_test)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    test_row = [r for r in rows if r["split"] == "test"][-1]
    with torch.no_grad(), eval_mode(model, result.policy):
        mu, logvar = model.encode(x_test)
        z = fastvae.reparameterize(mu, logvar, seed=derive_seed(config.seed, 0)) if sampling else mu
        x_hat = model.decode(z)
        rec = float(result.policy(x_hat, x_test))
    kl_term = float(mu.square().sum() / (2 * len(mu))) if kl == "quadratic" else 0.0
    assert test_row["kl"] == pytest.approx(kl_term, rel=1e-5, abs=1e-7)
    assert test_row["rec"] == pytest.approx(rec, rel=1e-5)
    assert test_row["loss"] == pytest.approx(rec + kl_term, rel=1e-5)
    assert test_row["mse"] == pytest.approx(float((x_hat - x_test).square().mean()), rel=1e-5)


def test_eval_mode_and_derive_seed():
    from fastvae._util import derive_seed, eval_mode

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).eval()
    with eval_mode(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(RuntimeError), eval_mode(a):
        raise RuntimeError
    assert a.training
    assert derive_seed(5, 3) == 5 * 1_000_003 + 3 and derive_seed(5) == 5
    assert len({derive_seed(s, e) for s in range(4) for e in range(50)}) == 200
    assert torch.equal(epoch_permutation(100, 5, 3),
                       torch.randperm(100, generator=torch.Generator().manual_seed(derive_seed(5, 3))))
