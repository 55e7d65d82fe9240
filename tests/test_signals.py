"""Preemption (issue 18): SIGTERM, SIGHUP and SIGUSR1 stop training like Ctrl-C, mid-epoch and mid-save, real
signals to real processes; under DDP the ranks agree on the step."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import WORLD, _free_port

from fastvae.run import load_checkpoint
from fastvae.train.checkpoint import CHECKPOINT, PREVIOUS, read_checkpoint

TINY = ["--dataset", "digits", "--batch-size", "2", "--hidden", "16", "--latent", "4", "--no-progress",
        "--no-tensorboard", "--n-samples", "4", "--epochs", "5", "--precision", "fp32"]  # no calibration steps


def _python(code: str, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# the training command, with a hook that sends the signals from inside the run at a chosen moment:
# argv: OUT SIGNAL WHEN COUNT, WHEN "step" (after the 5th optimizer step's forward) or "save" (inside the
# 3rd checkpoint save, after its data is written); COUNT signals in a row
_TRAIN_WITH_SIGNAL = """
    import os, signal, sys
    from fastvae.cli import main
    from fastvae.train import checkpoint
    from fastvae.train.objective import TrainObjective

    out, signum, when, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    calls = {"n": 0}

    def send():
        for _ in range(count):
            os.kill(os.getpid(), signum)

    if when == "step":
        forward = TrainObjective.forward
        def hooked(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:
                send()
            return forward(self, *args, **kwargs)
        TrainObjective.forward = hooked
    else:
        write = checkpoint._write_file
        def hooked(path, data):
            write(path, data)
            if path.name == "checkpoint.pt.tmp":
                calls["n"] += 1
                if calls["n"] == 3:
                    send()
        checkpoint._write_file = hooked
    args = ["train"] + %s + ["--out", out] + (["--checkpoint-every", "1"] if when == "save" else [])
    sys.exit(main(args))
""" % (TINY,)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
def test_a_stop_signal_mid_epoch_checkpoints_the_step_and_exits_128_plus_the_signal(tmp_path, signum):
    out = tmp_path / "run"
    process = _python(_TRAIN_WITH_SIGNAL, out, int(signum), "step", 1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"interrupted at step 5 ({name}); checkpoint written. Continue with: fastvae train --resume {out}" in err
    assert "Traceback" not in err
    state = load_checkpoint(out)
    assert state["step"] == 5 and 0 < state["batch"] < state["steps_per_epoch"]  # the running step finished
    if signum == signal.SIGTERM:  # the resume itself is the same for every signal
        from fastvae.cli import main

        assert main(["train", "--resume", str(out), "--max-steps", "7"]) == 0
        assert load_checkpoint(out)["step"] == 7


def test_a_sigterm_sent_from_outside_mid_epoch(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fastvae", "train", *TINY, "--log-every", "1", "--out", str(out)],
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    import time

    deadline = time.monotonic() + 200
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    step = load_checkpoint(out)["step"]
    assert f"interrupted at step {step} (SIGTERM)" in err and f"fastvae train --resume {out}" in err


def test_a_sigterm_inside_a_save_lets_the_save_finish(tmp_path):
    out = tmp_path / "run"
    process = _python(_TRAIN_WITH_SIGNAL, out, int(signal.SIGTERM), "save", 1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err
    assert "interrupted at step 3 (SIGTERM)" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name) == []
    assert read_checkpoint(out / CHECKPOINT)["step"] == 3 and read_checkpoint(out / PREVIOUS)["step"] == 2


def test_a_second_sigterm_inside_a_save_abandons_it_and_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    process = _python(_TRAIN_WITH_SIGNAL, out, int(signal.SIGTERM), "save", 2)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err  # the second signal interrupts at once
    assert "Traceback" not in err and f"fastvae train --resume {out}" in err
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name) == []  # the cut save cleaned up
    assert read_checkpoint(out / CHECKPOINT)["step"] == 2  # the last complete checkpoint, verified
    from fastvae.cli import main

    assert main(["train", "--resume", str(out), "--max-steps", "4"]) == 0
    assert load_checkpoint(out)["step"] == 4


# ---------------------------------------------------------------------------------------------- DDP
def _worker(rank: int, port: int, out: str, results: str) -> None:
    from fastvae.data import load_dataset
    from fastvae.models import DenseVAE
    from fastvae.train import TrainConfig, TrainingInterrupted, fit
    from fastvae.train.objective import TrainObjective

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    if rank == 1:  # only rank 1 is signalled, inside its 4th step
        forward, calls = TrainObjective.forward, [0]

        def hooked(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return forward(self, *args, **kwargs)

        TrainObjective.forward = hooked
    x, _ = load_dataset("digits")
    config = TrainConfig(out=out, epochs=3, batch_size=20, log_every=3, progress=False, tensorboard=False,
                         n_samples=4)
    try:
        fit(DenseVAE((1, 8, 8), 4, hidden=(16,)), x[:600], config)
        stopped = None
    except TrainingInterrupted as stop:
        stopped = (stop.step, stop.signum)
    torch.save({"stopped": stopped}, f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_agree_on_the_stop_step_when_one_rank_is_signalled(tmp_path):
    out, results = str(tmp_path / "run"), str(tmp_path)
    mp.spawn(_worker, args=(_free_port(), out, results), nprocs=WORLD, join=True)
    stops = [torch.load(f"{results}/rank{r}.pt")["stopped"] for r in range(WORLD)]
    assert stops[0] == stops[1] == (6, signal.SIGTERM)  # agreed at the log row after the signal (step 6)
    state = load_checkpoint(out)
    assert state["step"] == 6 and len(state["rng"]) == WORLD
