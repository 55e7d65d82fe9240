"""Read-only run folders (issue 18): commands that only read a run work on a read-only bind mount, write nothing
into it, and still see a live writer where the folder is writable; lock-busy messages name the holder's pid."""
import os
import subprocess
import sys

import pytest

import fastvae
from fastvae.cli import main

TINY = ["--dataset", "digits", "--batch-size", "100", "--hidden", "16", "--latent", "4", "--no-progress",
        "--no-tensorboard", "--n-samples", "4"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ro") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    return run


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


@pytest.fixture
def read_only_run(base_run, tmp_path):
    """``base_run`` seen through a read-only bind mount (which root cannot write either)."""
    view = tmp_path / "ro-run"
    view.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    bind = subprocess.run(["mount", "--bind", str(base_run), str(view)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
        with pytest.raises(OSError):
            (view / "probe").write_text("")
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)


def test_reading_commands_work_on_a_read_only_run(read_only_run, base_run, tmp_path, monkeypatch, capsys):
    before = _snapshot(base_run)
    monkeypatch.setenv("FASTVAE_CACHE_DIR", str(tmp_path / "cache"))
    model, config = fastvae.load(read_only_run)
    assert config.dataset == "digits"
    out = tmp_path / "out"
    out.mkdir()
    assert main(["sample", str(read_only_run), "--out", str(out / "s.png"), "--n", "4"]) == 0
    assert main(["analyze", str(read_only_run), "--out", str(out / "analysis"), "--no-gain", "--limit", "200"]) == 0
    assert (out / "analysis" / "source.json").is_file()
    assert main(["two-stage", str(read_only_run), "--out", str(out / "second"), "--epochs", "1", "--n", "100",
                 "--hidden", "16", "--no-progress"]) == 0
    assert (out / "second" / "report.json").is_file()
    assert main(["fid-features", "--dataset", "digits", "--epochs", "1"]) == 0
    assert main(["fid", str(read_only_run), "--out", str(out / "fid.json"), "--n", "100",
                 "--extractor", "classifier"]) == 0
    assert (out / "fid.json").is_file()
    assert _snapshot(base_run) == before  # nothing written into the run
    capsys.readouterr()
    for args in (["sample", read_only_run], ["analyze", read_only_run, "--no-gain"]):
        with pytest.raises(SystemExit) as info:
            main(list(map(str, args)))
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"{read_only_run} is read-only" in err and "pass --out" in err


def _hold_lock(folder, write_pid_after: float):
    """A process that takes the run's exclusive lock and names itself in the lock file ``write_pid_after`` s
    later (the moment between the two is what a second process may see)."""
    code = f"""
import fcntl, os, sys, time
handle = os.fdopen(os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT), "r+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.truncate(0); handle.flush()
print("locked", flush=True)
time.sleep({write_pid_after})
handle.write(f"process {{os.getpid()}} (fastvae train)\\n"); handle.flush()
time.sleep(60)
"""
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_reader_still_sees_a_live_writer_and_the_message_names_its_pid(base_run, tmp_path, capsys):
    holder = _hold_lock(base_run, write_pid_after=0.4)
    try:
        commands = (["sample", base_run, "--out", tmp_path / "s.png"], ["train", "--resume", base_run, "--epochs", "2"])
        for args in commands:
            with pytest.raises(SystemExit):
                main(list(map(str, args)))
            err = capsys.readouterr().err
            assert f"in use by process {holder.pid} (fastvae train)" in err, err
    finally:
        holder.kill()
        holder.wait()


def test_readers_share_the_lock_and_do_not_block_each_other(base_run, tmp_path):
    from fastvae.train.runfolder import RunFolderBusy, read_lock, run_lock

    with read_lock(base_run), read_lock(base_run):
        with pytest.raises(RunFolderBusy, match="in use by"):
            with run_lock(base_run, "fastvae train"):
                pass
    with run_lock(base_run, "fastvae train"):  # released: a writer takes it
        pass
    assert (base_run / ".lock").read_text() == ""  # a clean exit names no holder
