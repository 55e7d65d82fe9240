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
        fit(_tiny(), (x * 255).to(torch.int64), _config(tmp_path / "b"))
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


# ---------------------------------------------------------------------------------------- data paths, EMA, accumulation
def _weights(run):
    from fastvae.train.checkpoint import weights_digest

    return weights_digest(load_checkpoint(run)["model"])


class _EpochSampler(torch.utils.data.Sampler):
    """A user's sampler that gives epoch k the order fastvae's tensor path uses in epoch k."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):
        order = epoch_permutation(self.n, self.seed, self.epoch).tolist()
        self.epoch += 1
        return iter(order)

    def __len__(self):
        return self.n


def test_fit_over_a_dataset_or_dataloader_gives_the_weights_of_the_tensor_path(tmp_path, fashion):
    from torch.utils.data import DataLoader, TensorDataset

    x, x_test = fashion
    x, x_test = x[:200], x_test[:100]
    config = dict(epochs=2, batch_size=48, log_every=2, precision="fp32")  # auto would time a batch of the loader
    fit(_tiny(), x, _config(tmp_path / "tensor", **config), test_data=x_test)
    fit(_tiny(), TensorDataset(x), _config(tmp_path / "dataset", **config), test_data=TensorDataset(x_test))
    loader = DataLoader(TensorDataset(x, torch.zeros(200)), batch_size=48, sampler=_EpochSampler(200, 0),
                        generator=torch.Generator())  # its own generator: torch's default one feeds the noise
    fit(_tiny(), loader, _config(tmp_path / "loader", **config), test_data=[x_test])
    from pythae.data.datasets import BaseDataset  # items are dicts: {"data": x, "labels": y}

    fit(_tiny(), BaseDataset(x, torch.zeros(200)), _config(tmp_path / "pythae", **config), test_data=x_test)
    expected = _weights(tmp_path / "tensor")
    assert _weights(tmp_path / "dataset") == expected
    assert _weights(tmp_path / "loader") == expected
    assert _weights(tmp_path / "pythae") == expected
    rows = [json.loads(line) for line in (tmp_path / "tensor" / "metrics.jsonl").read_text().splitlines()]
    for name in ("dataset", "loader"):
        other = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in other] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    # a batch dict (diffusers' pixel_values), a transform hook, a one-shot iterator refused
    batches = [{"pixel_values": x[i:i + 50]} for i in range(0, 200, 50)]
    seen = []
    fit(_tiny(), batches, _config(tmp_path / "dicts", epochs=1),
        transform=lambda b: seen.append(b.shape[0]) or b.flip(-1))
    assert seen == [50, 50, 50, 50]
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(_tiny(), iter(batches), _config(tmp_path / "once"))
    with pytest.raises(ValueError, match="model takes"):
        fit(_tiny(), TensorDataset(torch.rand(10, 1, 8, 8)), _config(tmp_path / "shape"))


def test_uint8_images_train_bit_identically_to_their_float_images(tmp_path, fashion):
    from fastvae.data import as_images

    x, x_test = fashion
    as_uint8 = (x[:200] * 255).round().to(torch.uint8)
    test_uint8 = (x_test[:100] * 255).round().to(torch.uint8)
    fit(_tiny(), as_uint8, _config(tmp_path / "u8", epochs=1, precision="fp32"), test_data=test_uint8)
    fit(_tiny(), as_images(as_uint8), _config(tmp_path / "f32", epochs=1, precision="fp32"),
        test_data=as_images(test_uint8))
    assert _weights(tmp_path / "u8") == _weights(tmp_path / "f32")
    rows = {name: (tmp_path / name / "metrics.jsonl").read_text() for name in ("u8", "f32")}
    strip = [[{k: v for k, v in json.loads(r).items() if "time" not in k and k != "samples_per_s"}
              for r in text.splitlines()] for text in rows.values()]
    assert strip[0] == strip[1]
    images, _ = load_dataset("digits", keep_uint8=True)  # float sources stay float
    assert images.dtype == torch.float32
    assert load_dataset("fashion-mnist", download=False, keep_uint8=True)[0].dtype == torch.uint8


def test_ema_is_averaged_saved_resumed_and_loaded(tmp_path, fashion):
    x, _ = fashion
    x = x[:256]
    seen = []

    def record(model, epoch_end, **_):
        if not epoch_end:
            seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})

    model = _tiny()
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    fit(model, x, _config(tmp_path / "ema", ema=0.9, epochs=2, precision="fp32"), callbacks=[record])
    expected = dict(start)
    for weights in seen:
        expected = {n: 0.9 * expected[n] + 0.1 * weights[n] for n in expected}
    state = load_checkpoint(tmp_path / "ema")
    for name, value in expected.items():
        torch.testing.assert_close(state["ema"][name].double(), value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(state["ema"][name], state["model"][name])
    averaged, _ = fastvae.load(tmp_path / "ema")  # what sample, analyze and fid load
    trained, _ = fastvae.load(tmp_path / "ema", ema=False)
    for name, p in averaged.named_parameters():
        assert torch.equal(p, state["ema"][name]) and torch.equal(dict(trained.named_parameters())[name],
                                                                 state["model"][name])
    # interrupted after 3 steps and resumed: the same average as the straight run
    fit(_tiny(), x, _config(tmp_path / "part", ema=0.9, epochs=2, max_steps=3, precision="fp32"))
    fit(_tiny(), x, _config(tmp_path / "part", ema=0.9, epochs=2, precision="fp32"), resume=True)
    from fastvae.train.checkpoint import weights_digest

    assert weights_digest(load_checkpoint(tmp_path / "part")["ema"]) == weights_digest(state["ema"])
    with pytest.raises(ValueError, match="ema must be in"):
        TrainConfig(ema=1.0)


def test_grad_accumulation_is_the_step_of_the_larger_batch(tmp_path, fashion):
    """Float64, a loss with no running state (balanced with momentum 1: gamma stays 1) and no sampling noise:
    50 x 3 accumulated equals one batch of 150 (the last step: 50 + 12 samples, weighted 50/62 and 12/62) up to
    the summation order of the gradients; not bit-identical (the big batch sums all per-sample gradients in one
    reduction), within 1e-12."""
    x, _ = fashion
    x = x[:512].double()
    config = dict(epochs=2, loss="balanced", gamma_momentum=1.0, sampling=False, precision="fp32")
    runs = {}
    for name, kw in (("big", dict(batch_size=150)), ("accumulated", dict(batch_size=50, grad_accumulation=3))):
        model = _tiny().double()
        result = fit(model, x, _config(tmp_path / name, **config, **kw))
        runs[name] = (result.step, load_checkpoint(tmp_path / name)["model"])
    assert runs["big"][0] == runs["accumulated"][0] == 8
    for key, value in runs["big"][1].items():
        torch.testing.assert_close(runs["accumulated"][1][key], value, rtol=1e-12, atol=1e-14, msg=key)
    # drop_last drops the incomplete step, as the larger batch would
    result = fit(_tiny().double(), x, _config(tmp_path / "drop", **config, batch_size=50, grad_accumulation=3,
                                             drop_last=True))
    assert result.step == 2 * (512 // 150)


def test_tensorboard_asked_for_but_absent_is_a_one_line_error(tmp_path, fashion, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    with pytest.raises(ValueError, match="TensorBoard does not import"):
        fit(_tiny(), fashion[0], _config(tmp_path / "tb", tensorboard=True))
    assert not (tmp_path / "tb").exists()  # refused before the run folder was made
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "cli"), "--no-progress",
              "--tensorboard"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TensorBoard does not import" in err and "--no-tensorboard" in err
    fit(_tiny(), fashion[0][:64], _config(tmp_path / "quiet", tensorboard=None, epochs=1))  # unset: when installed


def test_commands_on_a_folder_with_ema_and_two_stage_on_the_limit(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from fastvae.train.grid import image_grid

    folder = tmp_path / "images"
    folder.mkdir()
    for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)):
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{folder}", "--epochs", "1", "--batch-size", "16", "--latent", "4",
                 "--hidden", "16", "--ema", "0.9", "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    state = load_checkpoint(run)
    assert state["config"]["dataset"] == f"folder:{folder}" and state["step"] == 3 and "ema" in state
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    with torch.no_grad():
        averaged = fastvae.load(run)[0].sample(4, generator=torch.Generator().manual_seed(0))
        trained = fastvae.load(run, ema=False)[0].sample(4, generator=torch.Generator().manual_seed(0))
    image_grid(averaged, tmp_path / "ema.png")
    image_grid(trained, tmp_path / "trained.png")
    drawn = (tmp_path / "s.png").read_bytes()
    assert drawn == (tmp_path / "ema.png").read_bytes() != (tmp_path / "trained.png").read_bytes()

    limited = tmp_path / "limited"
    assert main(["train", "--dataset", "digits", "--limit", "300", "--epochs", "1", "--batch-size", "100",
                 "--latent", "4", "--out", str(limited), "--no-progress", "--no-tensorboard"]) == 0
    capsys.readouterr()
    assert main(["two-stage", str(limited), "--epochs", "1", "--n", "100", "--hidden", "16", "--no-progress"]) == 0
    assert "on 300 codes" in capsys.readouterr().out
