"""A training step reads nothing back from the device and copies no host value to it (issue 21): counted with a
TorchDispatchMode (``fastvae.train.syncs.SyncCounter``) around ``fit`` on the Triton path, in Triton's interpreter,
in one process and under gloo DDP with two processes. Log rows and checkpoints may sync; steps may not."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastvae import backend
from fastvae.models import DenseVAE
from fastvae.train import TrainConfig, fit, loop
from fastvae.train.syncs import SyncCounter

PATHS = [  # (loss, kl, sampling, extra config)
    ("balanced", "full", True, {}),
    ("balanced", "quadratic", False, {"lr_schedule": "cosine", "warmup_steps": 2}),
    ("balanced", "none", True, {"gamma_rule": "ema", "grad_clip": 1.0}),
    ("beta", "none", False, {"lr_schedule": "linear"}),
    ("learned-gamma", "full", False, {}),
    ("learned-gamma", "quadratic", True, {"precision": "bf16"}),  # autocast on the CPU
]


def _counted_fit(monkeypatch, images, config) -> SyncCounter:
    """``fit`` under a SyncCounter whose scope ``step`` holds each ``_Run.train_step``."""
    counter = SyncCounter()
    step = loop._Run.train_step

    def counted_step(run, rows):
        with counter.scope("step"):
            step(run, rows)

    monkeypatch.setattr(loop._Run, "train_step", counted_step)
    model = DenseVAE((1, 8, 8), 4, hidden=(16,))
    with backend.use_backend("triton"), counter:
        fit(model, images, config)
    return counter


def _config(tmp_path, name, **values) -> TrainConfig:
    values.setdefault("precision", "fp32")  # no calibration run (its cache would differ between the two fits)
    return TrainConfig(out=str(tmp_path / name), progress=False, tensorboard=False, n_samples=4, **values)


@pytest.mark.parametrize("loss,kl,sampling,extra", PATHS, ids=[f"{p[0]}-{p[1]}-{p[2]}" for p in PATHS])
def test_no_step_syncs_on_the_triton_path(tmp_path, monkeypatch, device, loss, kl, sampling, extra):
    images = torch.rand(48, 1, 8, 8)
    config = _config(tmp_path, "run", loss=loss, kl=kl, sampling=sampling, epochs=1, batch_size=16, log_every=2,
                     device=str(device), **extra)
    counter = _counted_fit(monkeypatch, images, config)
    assert counter.ops["step"]["aten.addmm"] > 0  # the scope saw the steps' ops
    assert counter.in_scope("step") == 0, dict(counter.scoped["step"])


def test_the_whole_loop_syncs_per_log_row_not_per_step(tmp_path, monkeypatch, device):
    """4 steps and 12 steps with one log row and one checkpoint each: the same syncs in all of ``fit``."""
    images = torch.rand(48, 1, 8, 8)
    run = {"epochs": 1, "device": str(device)}
    few = _counted_fit(monkeypatch, images, _config(tmp_path, "few", batch_size=12, log_every=4, **run))
    many = _counted_fit(monkeypatch, images, _config(tmp_path, "many", batch_size=4, log_every=12, **run))
    assert few.ops["step"]["aten.addmm"] * 3 == many.ops["step"]["aten.addmm"]
    assert sum(few.counts.values()) > 0 and many.counts == few.counts, (few.counts, many.counts)


# ------------------------------------------------------------------------------------------ DDP
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    counter = SyncCounter()
    step = loop._Run.train_step

    def counted_step(run, rows):  # DDP's start-up broadcast rewrites running_mse: the first step reads it once
        with counter.scope("step" if run.step else "first step"):
            step(run, rows)

    loop._Run.train_step = counted_step
    for loss, kl, sampling, precision in (("balanced", "full", True, "fp32"), ("learned-gamma", "quadratic", False,
                                                                             "bf16")):
        config = TrainConfig(out=os.path.join(root, f"{loss}-{kl}"), loss=loss, kl=kl, sampling=sampling, epochs=1,
                             batch_size=8, log_every=3, progress=False, tensorboard=False, n_samples=4,
                             precision=precision)
        torch.manual_seed(0)
        model = DenseVAE((1, 8, 8), 4, hidden=(16,))
        counter.scoped.clear()
        counter.ops.clear()
        with backend.use_backend("triton"), counter:
            fit(model, torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(1)), config)
        results[loss] = (dict(counter.scoped["first step"]), dict(counter.scoped["step"]),
                         counter.ops["step"]["c10d.allreduce_"])
    torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_no_step_syncs_under_ddp(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        for loss, (first, syncs, all_reduces) in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert all_reduces >= 2, (rank, loss, all_reduces)  # steps 2 and 3 of each rank all-reduce gradients
            assert syncs == {}, (rank, loss, syncs)
            assert sum(first.values()) <= 1 and set(first) <= {"aten._local_scalar_dense"}, (rank, loss, first)
