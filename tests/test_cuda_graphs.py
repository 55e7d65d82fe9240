"""``TrainConfig.cuda_graphs`` and the device learning rate, as far as the CPU allows (issue 21).

The capture path runs on the CPU with ``RecordingGraph`` in place of ``torch.cuda.CUDAGraph``: its capture runs the
body once under a SyncCounter (it is the step that the replay of a real capture would run) and each later replay
runs the recorded body again. So a run with graphs is the eager run bit for bit, the captured body makes no sync,
and outside the replays a step does nothing but copy its indices into the static buffer.
"""
import collections
import json
import math

import pytest
import torch

from fastvae.models import DenseVAE
from fastvae.train import TrainConfig, fit, graphs, loop
from fastvae.train.schedule import DeviceLR, lr_factor
from fastvae.train.syncs import SyncCounter


class RecordingGraph:
    """A stand-in for CUDAStepGraph on the CPU that records what it captures."""

    captures: list = []

    @staticmethod
    def supports(device):
        return True

    def __init__(self, device):
        self.body, self.pending = None, False

    def capture(self, body):
        counter = SyncCounter()
        with counter, counter.scope("capture"):
            body()
        RecordingGraph.captures.append(counter)
        self.body, self.pending = body, True  # capturing ran the step that the first replay would run

    def replay(self):
        if self.pending:
            self.pending = False
            return
        with _OUTER[-1].scope("graph") if _OUTER else _nothing():
            self.body()


_OUTER: list = []


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fit(tmp_path, name, images, **values):
    config = TrainConfig(out=str(tmp_path / name), epochs=3, batch_size=16, log_every=2, progress=False,
                         tensorboard=False, n_samples=4, precision="fp32", **values)
    torch.manual_seed(0)
    model = DenseVAE((1, 8, 8), 4, hidden=(16,))
    result = fit(model, images, config)
    rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in rows if '"train"' in r]
    return model, result, rows


@pytest.fixture
def recording(monkeypatch):
    RecordingGraph.captures = []
    monkeypatch.setattr(graphs, "StepGraph", RecordingGraph)
    return RecordingGraph


@pytest.mark.parametrize("n", [48, 40], ids=["full-batches", "last-batch-eager"])
def test_graph_replays_train_as_the_eager_steps_do(tmp_path, monkeypatch, device, n):
    """On the CPU with the recording fake: bit for bit. On CUDA with real graphs: the noise of a replay comes
    from the graph's own Philox offsets, so the runs agree as two seeds do (same loss scale, same steps)."""
    if device.type == "cpu":
        monkeypatch.setattr(graphs, "StepGraph", RecordingGraph)
    RecordingGraph.captures = []
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    eager_model, eager, eager_rows = _fit(tmp_path, "eager", images, cuda_graphs=False, device=str(device))
    graph_model, graphed, graph_rows = _fit(tmp_path, "graphs", images, cuda_graphs=True, device=str(device))
    assert graphed.step == eager.step == 9
    if device.type != "cpu":
        final = [json.loads(rows[-1])["loss"] for rows in (eager_rows, graph_rows)]
        assert all(math.isfinite(v) for v in final) and abs(final[0] - final[1]) < 0.1 * abs(final[0]), final
        return
    assert len(RecordingGraph.captures) == 1
    for name, value in eager_model.state_dict().items():
        assert torch.equal(value, graph_model.state_dict()[name]), name
    assert torch.equal(eager.policy.running_mse, graphed.policy.running_mse)
    strip = [r.split('"samples_per_s"')[0] for r in eager_rows]
    assert strip == [r.split('"samples_per_s"')[0] for r in graph_rows]  # losses, gamma and lr of every log row


def test_the_capture_is_an_eager_step_and_replays_touch_only_the_static_rows(tmp_path, monkeypatch, recording):
    images = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    counter = SyncCounter()
    step = loop._Run.train_step
    scopes = iter(f"step {k}" for k in range(1, 100))

    def counted_step(run, rows):
        with counter.scope(next(scopes)):
            step(run, rows)

    monkeypatch.setattr(loop._Run, "train_step", counted_step)
    _OUTER.append(counter)
    try:
        with counter:
            _fit(tmp_path, "graphs", images, cuda_graphs=True)
    finally:
        _OUTER.pop()
    captured = recording.captures[0]
    assert captured.in_scope("capture") == 0, dict(captured.scoped["capture"])
    # step 4 is the capture (after WARMUP_STEPS eager steps): the same ops as eager step 3, plus the one copy
    # of the indices into the static buffer (the rows clone)
    assert graphs.WARMUP_STEPS == 3
    assert captured.ops["capture"] == counter.ops["step 3"]
    assert counter.ops["step 4"] == captured.ops["capture"] + collections.Counter({"aten.clone": 1})
    for k in range(5, 10):  # replays: outside the graph only the copy into the static rows
        assert counter.ops[f"step {k}"] == {"aten.copy_": 1}, (k, counter.ops[f"step {k}"])
        assert counter.ops["graph"]["aten.addmm"] > 0


def test_cuda_graphs_refusals(tmp_path):
    images = torch.rand(16, 1, 8, 8)
    model = DenseVAE((1, 8, 8), 4, hidden=(16,))
    config = TrainConfig(out=str(tmp_path / "run"), epochs=1, progress=False, tensorboard=False, cuda_graphs=True,
                         device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs needs CUDA, the run is on cpu"):
        fit(model, images, config)
    assert graphs.StepGraphs(None, torch.device("cpu"), world=1, precision="fp32", compile=False,
                             batch_size=4).enabled is False


def test_cuda_graphs_refuse_compile_ddp_and_fp16(recording):
    def graphs_for(**values):
        setup = dict(world=1, precision="fp32", compile=False, batch_size=4) | values
        return graphs.StepGraphs(True, torch.device("cpu"), **setup)

    for values, message in (({"compile": True}, "exclusive"), ({"world": 2}, "one process"), ({"precision": "fp16"},
                                                                                              "GradScaler")):
        with pytest.raises(ValueError, match=message):
            graphs_for(**values)
    assert graphs_for().enabled


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_device_lr_is_lambda_lr(schedule, warmup):
    total = 10
    p = torch.nn.Parameter(torch.zeros(2))
    reference_opt = torch.optim.Adam([p], lr=0.01)
    reference = torch.optim.lr_scheduler.LambdaLR(
        reference_opt, lambda s: lr_factor(s, warmup=warmup, total=total, schedule=schedule))
    optimizer = torch.optim.Adam([p], lr=torch.tensor(0.01), fused=True)
    device_lr = DeviceLR(optimizer, 0.01, warmup=warmup, total=total, schedule=schedule, device=torch.device("cpu"))
    for _ in range(total + 2):
        want = torch.tensor(reference.get_last_lr()[0], dtype=torch.float32)
        assert torch.equal(optimizer.param_groups[0]["lr"], want)
        assert optimizer.param_groups[0]["lr"] is device_lr.lr
        reference_opt.step()
        reference.step()
        device_lr.step()
    resumed = DeviceLR(torch.optim.Adam([p], lr=torch.tensor(0.01), fused=True), 0.01, warmup=warmup, total=total,
                       schedule=schedule, device=torch.device("cpu"))
    resumed.load_state_dict(reference.state_dict())  # a LambdaLR checkpoint resumes on the device schedule
    assert resumed.state_dict()["last_epoch"] == total + 2
    assert math.isclose(resumed.get_last_lr()[0], reference.get_last_lr()[0], rel_tol=1e-7, abs_tol=1e-12)


def test_a_constant_rate_costs_one_device_op_a_step():
    """The default schedule (constant, no warm-up) only counts the step; the others write the next rate."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.01), fused=True)
    ops = {}
    for schedule in ("constant", "cosine"):
        device_lr = DeviceLR(optimizer, 0.01, warmup=0, total=10, schedule=schedule, device=torch.device("cpu"))
        counter = SyncCounter()
        with counter, counter.scope("step"):
            device_lr.step()
        ops[schedule] = sum(counter.ops["step"].values())
    assert ops["constant"] == 1 and ops["cosine"] > 1, ops
