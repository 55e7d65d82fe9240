"""Run folders under faults (issue 13): locks, unique names, clean overwrites, verified checkpoints, Ctrl-C,
devices, paths, bad data and the small things a user sees; each from the command line where a user meets it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import cli_error_line as _error_line

import fastvae
from fastvae.cli import main
from fastvae.run import load_checkpoint
from fastvae.train import CheckpointError, TrainConfig, fit

TINY = ["--dataset", "digits", "--batch-size", "100", "--hidden", "16", "--latent", "4", "--no-progress",
        "--no-tensorboard", "--n-samples", "4"]


def _spawn(*args, cwd=None, pythonpath=None):
    """``python -m fastvae ARGS`` as a separate process (stdout and stderr captured)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-m", "fastvae", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(condition, what, process=None, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-epoch digits run with checkpoints every 5 steps (so a previous checkpoint exists)."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--checkpoint-every", "5", "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


# ------------------------------------------------------------------------------------ 1. concurrent writers
def test_a_live_run_folder_refuses_a_second_writer_naming_the_holder(tmp_path, run):
    live = tmp_path / "live"
    first = _spawn("train", *TINY, "--epochs", "1000", "--out", live)
    try:
        _wait_for(lambda: (live / "config.json").is_file(), "the first run to start", first)
        for args in (["train", *TINY, "--out", live, "--overwrite"], ["analyze", live], ["sample", live]):
            second = _spawn(*args)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert f"in use by process {first.pid} (fastvae train)" in err and "Traceback" not in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the OS released the lock with the killed process: the folder can be taken over
    assert main(["train", *TINY, "--epochs", "1", "--out", str(live), "--overwrite"]) == 0


# ------------------------------------------------------------------------------------ 2. auto-named folders
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    clock = tmp_path / "clock"  # both processes read the same time, as two runs started in one second do
    clock.mkdir()
    (clock / "sitecustomize.py").write_text("import time\ntime.strftime = lambda *args: '20260101-000000'\n")
    runs = [_spawn("train", *TINY, "--epochs", "1", "--max-steps", "3", cwd=tmp_path, pythonpath=clock)
            for _ in range(2)]
    for process in runs:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders] == ["digits-dense-20260101-000000", "digits-dense-20260101-000000-2"]
    for folder in folders:
        assert TrainConfig.load(folder / "config.json").out == str(folder.relative_to(tmp_path))
        assert load_checkpoint(folder)["step"] == 3


def test_unique_folder_adds_a_suffix_on_collision(tmp_path):
    from fastvae.train.runfolder import unique_folder

    names = [unique_folder(tmp_path / "runs" / "digits-dense-20260101-000000").name for _ in range(3)]
    assert names == ["digits-dense-20260101-000000", "digits-dense-20260101-000000-2", "digits-dense-20260101-000000-3"]


# ------------------------------------------------------------------------------------ 3. overwrite and provenance
def test_overwrite_starts_from_an_empty_folder(run):
    for name in ("two_stage/checkpoint.pt", "analysis/latents.json", "images/samples-epoch099.png"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("old")
    for name in ("fid.json", "samples.png"):
        (run / name).write_text("old")
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run), "--overwrite"]) == 0
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == [".lock", "checkpoint.pt", "checkpoint.pt.sha256", "config.json", "images/recon-epoch001.png",
                    "images/samples-epoch001.png", "metrics.csv", "metrics.jsonl"]


def test_a_second_stage_is_reused_only_for_the_checkpoint_it_came_from(run, base_run):
    from fastvae import two_stage
    from fastvae.train.runfolder import write_provenance

    shutil.copytree(base_run, run / "two_stage")  # stands in for a second stage: any run folder loads
    with pytest.warns(UserWarning, match="no source.json"):
        assert two_stage.load_second_stage(run) is None  # no record of its source
    write_provenance(run / "two_stage", run)
    assert two_stage.load_second_stage(run) is not None
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0  # the run's checkpoint moves on
    with pytest.warns(UserWarning, match="another checkpoint"):
        assert two_stage.load_second_stage(run) is None
    record = json.loads((run / "two_stage" / "source.json").read_text())
    assert record["checkpoint"] == str(run.resolve() / "checkpoint.pt") and len(record["sha256"]) == 64


# ------------------------------------------------------------------------------------ 4. corrupted checkpoints
def _flip_block(path, size=4096):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = bytes(b ^ 0xFF for b in data[middle:middle + size])
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(run, capsys):
    previous_step = load_checkpoint(run / "checkpoint.prev.pt")["step"]
    _flip_block(run / "checkpoint.pt")
    with pytest.warns(UserWarning, match=r"checkpoint.pt: damaged .*using the previous checkpoint .*prev.pt"):
        model, _ = fastvae.load(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert "damaged" in err
    assert f"using the previous checkpoint {run / 'checkpoint.prev.pt'} (step {previous_step})" in err
    state = load_checkpoint(run)
    assert state["epoch"] == 3 and all(torch.isfinite(v).all() for v in state["optimizer"]["state"][0].values())


def test_a_damaged_checkpoint_without_a_previous_one_is_one_line(run, capsys):
    (run / "checkpoint.prev.pt").unlink()
    _flip_block(run / "checkpoint.pt")
    err = _error_line(capsys, ["train", "--resume", run, "--epochs", "3"])
    assert f"{run / 'checkpoint.pt'}: damaged" in err
    with pytest.raises(CheckpointError, match="damaged"):
        fastvae.load(run)


# ------------------------------------------------------------------------------------ 5. truncated, empty, foreign
@pytest.mark.parametrize("damage,match", [
    ("truncate", "truncated or not a PyTorch file"),
    ("empty", "the file is empty"),
    ("text", "truncated or not a PyTorch file"),
    ("foreign", "not a fastvae checkpoint"),
])
def test_unreadable_checkpoints_give_one_line_naming_the_file(run, capsys, damage, match):
    path = run / "checkpoint.pt"
    (run / "checkpoint.prev.pt").unlink()
    (run / "checkpoint.pt.sha256").unlink()  # as if written by hand or by another tool
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("hello\n")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    for args in (["sample", run], ["train", "--resume", run, "--epochs", "3"]):
        err = _error_line(capsys, args)
        assert str(path) in err and match in err


# ------------------------------------------------------------------------------------ 6. Ctrl-C
def test_ctrl_c_writes_a_checkpoint_at_the_step_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    # batches of 2: an epoch of many steps, so that the signal lands in the middle of one
    process = _spawn("train", *TINY, "--batch-size", "2", "--epochs", "5", "--log-every", "1", "--out", out)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, "a few steps", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"Continue with: fastvae train --resume {out}" in err and "Traceback" not in err
    state = load_checkpoint(out)
    assert state["step"] >= 3 and 0 < state["batch"] < state["steps_per_epoch"]  # in the middle of an epoch
    assert f"interrupted at step {state['step']}" in err
    assert main(["train", "--resume", str(out), "--max-steps", str(state["step"] + 2)]) == 0
    assert load_checkpoint(out)["step"] == state["step"] + 2


# ------------------------------------------------------------------------------------ 7. devices
def test_a_missing_device_is_named(tmp_path, capsys, monkeypatch, run):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _error_line(capsys, ["train", *TINY, "--device", "cuda", "--out", tmp_path / "x"])
    assert "CUDA is not available on this machine (devices here: cpu)" in err
    err = _error_line(capsys, ["sample", run, "--device", "cuda"])
    assert "CUDA is not available" in err
    assert "device 'gpu'" in _error_line(capsys, ["sample", run, "--device", "gpu"])


# ------------------------------------------------------------------------------------ 8. paths
def test_a_relative_dataset_path_is_stored_resolved(tmp_path, monkeypatch):
    x, _ = fastvae.data.load_dataset("digits")
    monkeypatch.chdir(tmp_path)
    np.save("data.npy", x[:200].numpy())
    assert main(["train", *TINY, "--dataset", "data.npy", "--epochs", "1", "--out", "run"]) == 0
    dataset = TrainConfig.load(tmp_path / "run" / "config.json").dataset
    assert dataset == str(tmp_path / "data.npy")
    monkeypatch.chdir(tmp_path.parent)  # another directory: the stored path still loads
    assert fastvae.data.load_dataset(dataset)[0].shape[0] == 200


def test_out_paths_through_a_file_or_a_missing_folder_are_one_line(tmp_path, capsys, run):
    (tmp_path / "file").write_text("")
    err = _error_line(capsys, ["train", *TINY, "--out", tmp_path / "file" / "sub"])
    assert f"{tmp_path / 'file'} is a file" in err
    err = _error_line(capsys, ["sample", run, "--out", tmp_path / "missing" / "dir" / "s.png"])
    assert "does not exist" in err


# ------------------------------------------------------------------------------------ 9. bad data and numbers
def test_non_finite_images_are_refused_before_training(tmp_path, capsys):
    x, _ = fastvae.data.load_dataset("digits")
    x = x[:100].clone()
    x[37, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in 1 sample.*index 37"):
        fit(fastvae.DenseVAE((1, 8, 8), 4, hidden=(16,)), x, TrainConfig(out=str(tmp_path / "a"), progress=False))
    np.save(tmp_path / "bad.npy", x.numpy())
    err = _error_line(capsys, ["train", *TINY, "--dataset", tmp_path / "bad.npy", "--out", tmp_path / "b"])
    assert "index 37" in err


def test_a_nan_batch_leaves_the_running_mse_finite():
    loss = fastvae.BalancedMSE()
    x = torch.rand(4, 8)
    loss(x + 0.1, x)
    before = loss.running_mse.clone()
    x_hat = x.clone()
    x_hat[1, 2] = float("nan")
    assert torch.isnan(loss(x_hat, x))
    assert torch.equal(loss.running_mse, before)
    loss(x + 0.05, x)  # and the next finite batch trains on
    assert torch.isfinite(loss.running_mse) and loss.running_mse < before


@pytest.mark.parametrize("momentum", [-1.0, 1.5, float("nan")])
def test_balanced_mse_momentum_is_checked_at_construction(momentum):
    with pytest.raises(ValueError, match="BalancedMSE: momentum must be a number in"):
        fastvae.BalancedMSE(momentum=momentum)


def test_one_row_moments_warn():
    with pytest.warns(UserWarning, match="one sample along dim 0"):
        fastvae.moments(torch.rand(1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastvae.moments(torch.rand(2, 5))


# ------------------------------------------------------------------------------------ 10. small things
def test_resuming_a_finished_run_says_so(run, capsys):
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "already finished its 2 epoch(s)" in out and f"fastvae train --resume {run} --epochs N" in out


def test_log_every_is_kept_beside_a_smaller_checkpoint_every_and_rows_have_mse(tmp_path):
    out = tmp_path / "run"
    args = ["--epochs", "1", "--log-every", "4", "--checkpoint-every", "2", "--out", str(out)]
    assert main(["train", *TINY, *args]) == 0
    import csv

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    steps_per_epoch = load_checkpoint(out)["steps_per_epoch"]
    expected = list(range(4, steps_per_epoch + 1, 4)) + ([steps_per_epoch] if steps_per_epoch % 4 else [])
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == expected
    assert all(r["mse"] and 0 < float(r["mse"]) < 1 for r in rows)


def test_argument_errors_are_one_line(capsys):
    err = _error_line(capsys, ["train", "--epochs", "zero"])
    assert err.startswith("fastvae train: error: argument --epochs: invalid int value")
    err = _error_line(capsys, ["analyze", "/nonexistent/run"])
    assert err.startswith("fastvae analyze: error:") and "/nonexistent/run" in err


def test_no_progress_bar_flood_when_stderr_is_not_a_terminal(tmp_path):
    process = _spawn("train", *[a for a in TINY if a != "--no-progress"], "--epochs", "2", "--out", tmp_path / "r")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "step/s" not in err and "\r" not in err
    assert "epoch 1/2: test loss" in out and "epoch 2/2: test loss" in out


def test_dataset_auto_says_where_it_found_fashion_mnist(tmp_path, capsys):
    from fastvae.data import fashion_mnist_folder
    from fastvae.train.from_config import resolved_dataset

    folder = fashion_mnist_folder()
    assert folder is not None and folder.is_dir()  # the test machine has it (the train tests use it)
    note = f"dataset auto: fashion-mnist, found in {folder}"
    assert resolved_dataset(TrainConfig(dataset="auto")) == ("fashion-mnist", note)


def test_the_fid_classifier_name_is_the_same_for_the_same_weights(tmp_path):
    from fastvae import fid

    x, y = fastvae.data.load_dataset("digits")
    names = []
    for k in range(2):
        net, info = fid.train_feature_classifier(x[:200], y[:200], epochs=1)
        info["seconds"] = float(k)  # a retrain takes another time
        fid.save_classifier(net, info, tmp_path / f"c{k}.pt")
        names.append(fid.load_classifier_extractor(tmp_path / f"c{k}.pt").name.replace(f"c{k}.pt", "c.pt"))
    assert names[0] == names[1]
