"""Crash-safe runs (issue 18): a save cut at each of its file operations, by an exception or by the death of
the process, leaves a run that resumes from the newest complete checkpoint and says what it repaired."""
import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch
from faults import FileFaults

import fastvae
from fastvae.train import TrainConfig, fit
from fastvae.cli import main
from fastvae.train.checkpoint import (CHECKPOINT, PREVIOUS, DiskFullError, checkpoint_digest, load_run_checkpoint,
                                      read_checkpoint, repair_run, save_checkpoint, weights_digest)


def _tiny_model():
    torch.manual_seed(0)
    return fastvae.DenseVAE((1, 8, 8), 4, hidden=(16,))


def _config(out, **fields):
    return TrainConfig(out=str(out), epochs=1, batch_size=100, log_every=1, checkpoint_every=1, progress=False,
                       tensorboard=False, n_samples=4, **fields)


@pytest.fixture(scope="module")
def digits():
    return fastvae.data.load_dataset("digits")[0][:1000]


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory, digits):
    """A run at step 2 (checkpoint.pt at step 2, checkpoint.prev.pt at step 1) and the state of step 3."""
    base = tmp_path_factory.mktemp("faults")
    fit(_tiny_model(), digits, _config(base / "run", max_steps=2))
    ahead = base / "ahead"
    shutil.copytree(base / "run", ahead)
    fit(_tiny_model(), digits, _config(ahead, max_steps=3), resume=True)
    return base / "run", read_checkpoint(ahead / CHECKPOINT)


def _weights(state) -> str:
    return weights_digest(state["model"])


def _leftovers(run):
    return sorted(p.name for p in run.iterdir() if ".tmp" in p.name)


def _assert_canonical(run):
    """No temporary files; each checkpoint file matches the digest in its own sidecar."""
    assert _leftovers(run) == []
    for name in (CHECKPOINT, PREVIOUS):
        if (run / name).is_file():
            read_checkpoint(run / name)  # verified against its own .sha256
            assert checkpoint_digest(run / name) is not None, name


def _save_ops(run, state) -> list:
    with FileFaults() as faults:
        save_checkpoint(state, run)
    return faults.ops


def _fault_points(tmp_path, saved_runs):
    run, new = saved_runs
    probe = tmp_path / "probe"
    shutil.copytree(run, probe)
    return _save_ops(probe, new)


def test_a_save_is_the_file_operations_the_fault_test_counts(tmp_path, saved_runs):
    ops = _fault_points(tmp_path, saved_runs)
    names = [name for name, _ in ops]
    # open+write+fsync the data and the digest, four renames, the folder's fsync
    assert names == ["open", "write", "fsync", "open", "write", "fsync", "replace", "replace", "replace", "replace",
                     "fsync"]
    assert [target for name, target in ops if name == "replace"] == [CHECKPOINT, "checkpoint.pt.tmp",
                                                                     "checkpoint.pt.sha256", "checkpoint.pt.tmp.sha256"]


@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_a_save_cut_at_every_file_operation_resumes_from_the_last_complete_checkpoint(tmp_path, saved_runs, digits,
                                                                                      mode):
    run, new = saved_runs
    old = read_checkpoint(run / CHECKPOINT)
    ops = _fault_points(tmp_path, saved_runs)
    names = [name for name, _ in ops]
    # the new checkpoint is complete once its digest is written (a dead process leaves what it wrote); a save
    # that raises undoes itself until its rename of checkpoint.pt.tmp over checkpoint.pt
    complete_after = (len(names) - names[::-1].index("write") if mode == "exit"
                      else [i for i, (n, t) in enumerate(ops, 1) if t == "checkpoint.pt.tmp" and n == "replace"][0])
    outcomes = []
    for k in range(1, len(ops) + 1):
        folder = tmp_path / f"{mode}-{k}"
        shutil.copytree(run, folder)
        if mode == "exit":
            pid = os.fork()
            if pid == 0:  # the child dies inside the save, at its k-th file operation (else exits 0 or 1)
                try:
                    with FileFaults(fail_at=k, mode="exit"):
                        save_checkpoint(new, folder)
                finally:
                    os._exit(0)
            assert os.waitpid(pid, 0)[1] >> 8 == 77, f"the child did not die at operation {k}"
        else:
            if k == len(ops):  # the folder's fsync: a failure there is not worth failing a complete save for
                with FileFaults(fail_at=k, mode="raise"):
                    save_checkpoint(new, folder)
            else:
                with pytest.raises(OSError, match="injected"), FileFaults(fail_at=k, mode="raise"):
                    save_checkpoint(new, folder)
            if k <= complete_after:
                assert _leftovers(folder) == [], f"operation {k}: a failed save left {_leftovers(folder)}"
        expected = new if k > complete_after else old
        notes = []
        state = load_run_checkpoint(folder, on_fallback=notes.append)  # read-only: nothing written
        assert (state["step"], _weights(state)) == (expected["step"], _weights(expected)), f"operation {k} ({mode})"
        repaired = repair_run(folder)
        _assert_canonical(folder)
        model, _ = fastvae.load(folder)
        assert weights_digest(model.state_dict()) == _weights(expected), f"operation {k} ({mode})"
        result = fit(_tiny_model(), digits, _config(folder, max_steps=expected["step"] + 1), resume=True)
        assert result.step == expected["step"] + 1
        _assert_canonical(folder)
        outcomes.append((k, ops[k - 1][0], expected["step"], notes, repaired))
    assert len(outcomes) == len(ops) == 11
    # the states that need it are repaired, and saying so
    assert any(repaired for *_, repaired in outcomes)
    for k, op, step, notes, repaired in outcomes:
        if repaired:
            assert all(str(tmp_path) in line for line in repaired)


# ---------------------------------------------------------------------------------------------- a full disk
def test_enospc_inside_a_save_is_one_error_naming_the_file_and_leaves_the_previous_checkpoint(tmp_path, saved_runs):
    run, new = saved_runs
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    writes = [k for k, (name, _) in enumerate(_fault_points(tmp_path, saved_runs), 1) if name in ("write", "open")]
    for k in writes:
        with pytest.raises(DiskFullError) as info, FileFaults(fail_at=k, error=errno.ENOSPC):
            save_checkpoint(new, folder)
        message = str(info.value.strerror)
        assert "no space left on the device writing" in message and ".tmp" in message and "MiB free" in message
        assert info.value.errno == errno.ENOSPC and "\n" not in message
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before, f"operation {k}"
    save_checkpoint(new, folder)  # space freed: the next save goes through
    assert read_checkpoint(folder / CHECKPOINT)["step"] == new["step"]


def _mount_tmpfs(folder, size: str) -> None:
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def test_a_real_full_disk_while_training_is_one_line_and_resume_works_after_freeing(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    try:
        out = disk / "run"
        args = ["--dataset", "digits", "--batch-size", "100", "--hidden", "256", "--latent", "4", "--no-progress",
                "--no-tensorboard", "--n-samples", "4", "--checkpoint-every", "1", "--log-every", "1"]
        assert main(["train", *args, "--max-steps", "2", "--out", str(out)]) == 0
        size = (out / CHECKPOINT).stat().st_size
        free = shutil.disk_usage(disk).free
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (free - size // 2))  # room for the metrics, not for another checkpoint
        before = (out / CHECKPOINT).read_bytes()
        process = subprocess.run([sys.executable, "-m", "fastvae", "train", "--resume", str(out), "--max-steps", "4"],
                                 capture_output=True, text=True, timeout=300)
        err = process.stderr.strip()
        assert process.returncode == 2, err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert f"no space left on the device writing {out / 'checkpoint.pt.tmp'}: it needs" in err and "MiB" in err
        assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []
        assert (out / CHECKPOINT).read_bytes() == before and read_checkpoint(out / CHECKPOINT)["step"] == 2
        filler.unlink()
        assert main(["train", "--resume", str(out), "--max-steps", "4"]) == 0
        assert read_checkpoint(out / CHECKPOINT)["step"] == 4
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_the_folder_a_kill_left_under_the_old_save_resumes_and_says_what_it_repaired(tmp_path, saved_runs, digits,
                                                                                    capsys):
    """The state of issue 18's defect 1: the old save had renamed checkpoint.pt to checkpoint.prev.pt but not yet
    its sidecar, so no checkpoint.pt, and checkpoint.prev.pt.sha256 holds the digest of an older checkpoint."""
    run, _ = saved_runs
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    step = read_checkpoint(folder / CHECKPOINT)["step"]
    os.replace(folder / CHECKPOINT, folder / PREVIOUS)
    assert load_run_checkpoint(folder)["step"] == step  # read-only: found, nothing written
    assert fit(_tiny_model(), digits, _config(folder, max_steps=step + 1), resume=True).step == step + 1
    err = capsys.readouterr().err
    assert f"repaired {folder}: {CHECKPOINT} was missing after an interrupted save: {PREVIOUS} (step {step})" in err
    assert read_checkpoint(folder / CHECKPOINT)["step"] == step + 1
    _assert_canonical(folder)
