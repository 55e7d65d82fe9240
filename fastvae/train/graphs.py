"""Whole-step CUDA graphs (``TrainConfig.cuda_graphs``): capture the training step once after a warm-up and
replay it.

A small model's step is launch-bound on a GPU (the dense 784-256-64-32-16 VAE at batch 128 runs ~64 launches
for a fraction of a GFLOP). Captured in one CUDA graph, the step costs one launch from the host: forward,
backward, the kernels' workspace memsets, the in-place running-MSE update, fused capturable Adam, the
device learning rate (``DeviceLR``) and the loss window row. The step's inputs (one per accumulated batch: the
device indices into the in-memory images, or a stream's batch) are the static inputs: they are copied into
buffers before each replay, and the body gathers the images from them. The
noise seed of each replay is a fresh draw from the CUDA generator (``torch.randint`` inside the graph, which
the generator advances per replay). The captured body is ``_Run.step_body``, the function an eager step runs.

``cuda_graphs``: ``True`` captures (CUDA only; one process, no fp16 GradScaler, no ``compile``: an error
otherwise), ``False`` never, ``None`` (auto) captures on CUDA where ``True`` would be allowed and keeps the
graph only when its replays measure faster than the warm-up's eager steps (CUDA events, read at the first log
row, which reads the device anyway). A step of other shapes (an epoch's last, without ``drop_last``) runs
eagerly.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["StepGraphs", "CUDAStepGraph", "WARMUP_STEPS", "TIMED_STEPS"]

WARMUP_STEPS = 3
"""Eager steps before the capture: optimizer state, cuDNN's algorithm search and the allocator settle first."""
TIMED_STEPS = 2
"""Eager steps and replays timed (each after the first of its kind) for the auto decision."""


class CUDAStepGraph:
    """One ``torch.cuda.CUDAGraph`` of a step body (its own memory pool)."""

    @staticmethod
    def supports(device: torch.device) -> bool:
        return device.type == "cuda"

    def __init__(self, device: torch.device):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, body: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph):
            body()

    def replay(self) -> None:
        self.graph.replay()


StepGraph = CUDAStepGraph
"""What ``StepGraphs`` captures with (tests put a recording fake here to run the capture path on the CPU)."""


def _refusal(device: torch.device, world: int, precision: str, compile: bool) -> Optional[str]:
    """Why a step on this set-up cannot be captured, or None."""
    if not StepGraph.supports(device):
        return f"needs CUDA, the run is on {device}"
    if world > 1:
        return "runs in one process (DDP's gradient all-reduce is not captured here)"
    if precision == "fp16":
        return "cannot capture fp16's GradScaler (its skip of a step is decided on the host); use bf16"
    if compile:
        return "and compile are exclusive (use one or the other)"
    return None


class StepGraphs:
    """Runs each step eagerly or as a replay: ``run(body, inputs)`` calls ``body(inputs)`` for the warm-up, then
    captures ``body(static_inputs)`` and replays it for every step whose inputs have the captured shapes."""

    def __init__(self, setting: Optional[bool], device: torch.device, *, world: int, precision: str, compile: bool,
                 batch_size: int):
        refusal = _refusal(device, world, precision, compile)
        if setting is True and refusal is not None:
            raise ValueError(f"TrainConfig.cuda_graphs {refusal}")
        self.enabled = setting is not False and refusal is None
        self.auto = setting is None
        self.device, self.batch_size = device, batch_size
        self.graph = None
        self.static_inputs: Optional[list[Tensor]] = None
        self.eager_steps = 0
        self.events: dict[str, list] = {"eager": [], "replay": []}
        self.replays = 0

    def run(self, body: Callable[[list[Tensor]], None], inputs: list[Tensor]) -> None:
        if self.graph is not None and [x.shape for x in inputs] == [x.shape for x in self.static_inputs]:
            for static, x in zip(self.static_inputs, inputs):
                static.copy_(x)
            with self._timed("replay", self.replays):
                self.graph.replay()
            self.replays += 1
        elif (self.enabled and self.graph is None and self.eager_steps >= WARMUP_STEPS
              and all(x.shape[0] == self.batch_size for x in inputs)):
            self._capture(body, inputs)
        else:
            with self._side_stream(), self._timed("eager", self.eager_steps):
                body(inputs)
            self.eager_steps += 1

    def _capture(self, body: Callable[[list[Tensor]], None], inputs: list[Tensor]) -> None:
        """Capture ``body`` on copies of ``inputs`` (capturing runs nothing), then replay it for this step."""
        self.static_inputs = [x.clone() for x in inputs]
        graph = StepGraph(self.device)
        graph.capture(lambda: body(self.static_inputs))
        self.graph = graph
        graph.replay()
        self.replays = 1

    @contextlib.contextmanager
    def _side_stream(self):
        """Before a capture, eager steps run on a side stream, as torch.cuda.graphs asks of a warm-up."""
        if not (self.enabled and self.device.type == "cuda" and self.graph is None):
            yield
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)

    @contextlib.contextmanager
    def _timed(self, kind: str, index: int):
        """CUDA events around eager steps and replays 1..TIMED_STEPS (the first of each kind is set-up)."""
        if not (self.auto and self.enabled and self.device.type == "cuda" and 1 <= index <= TIMED_STEPS):
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events[kind].append((start, end))

    def decide(self) -> None:
        """Auto: once both kinds are timed (called where the host waits for the device anyway), drop the graph
        when its replays were not faster than the eager steps."""
        eager, replay = self.events["eager"], self.events["replay"]
        if not (self.auto and self.graph is not None and len(eager) >= TIMED_STEPS and len(replay) >= TIMED_STEPS):
            return
        eager_ms = min(s.elapsed_time(e) for s, e in eager)
        replay_ms = min(s.elapsed_time(e) for s, e in replay)
        self.events = {"eager": [], "replay": []}
        self.auto = False
        if replay_ms >= eager_ms:
            self.graph, self.enabled = None, False
