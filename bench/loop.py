"""End-to-end: epochs of ``fastvae``'s training loop against its peers, on Fashion-MNIST, interleaved in one run.

Loops (``LOOPS``), each training its own copy of the same model (same seed, same initial weights), batch
size 128 and Adam with lr 1e-3:

- ``fastvae``: ``fastvae.train.fit(model, images, TrainConfig(...), test_data=test_images)`` as ``fastvae train``
  runs it (data on the device, one permutation per epoch, fused ops, fused Adam, and at each epoch end the
  evaluation of the test split, the sample and reconstruction grids and the checkpoint). Its epoch is the wall
  time from one epoch end to the next: the training steps, that end-of-epoch work and the checkpoint.
  Its precision is the default, ``auto`` (the faster of fp32 and bf16, timed on this machine: ``calibrate.py``).
  ``fastvae-fp32`` and ``fastvae-compile`` are ``--precision fp32`` and ``--compile`` (full runs only).
- ``plain``: the pytorch/examples VAE loop (``examples/vae/main.py``): a ``DataLoader`` over torchvision's
  ``FashionMNIST(transform=ToTensor())`` with ``batch_size=128, shuffle=True`` (and ``num_workers=1,
  pin_memory=True`` on CUDA), ``optimizer.zero_grad()``, forward, ``loss.backward()``,
  ``train_loss += loss.item()``, ``optimizer.step()``. torchvision cannot be installed beside this CPU
  build of torch, so ``TorchvisionFashionMNIST`` reproduces its dataset exactly: ``__getitem__`` builds a
  PIL image from the uint8 array and applies ``to_tensor`` (torchvision's ``ToTensor`` for PIL images).
  The model's modules are the same; the reparameterization, KL and balanced loss are written in plain
  PyTorch (``bench.cases.reparameterize_kl.eager`` and ``bench.cases.balanced_mse.eager``): the same objective as
  fastvae's.
- ``tensors``: a careful hand-written loop over in-memory tensors (``TensorLoop``): the images as one tensor,
  one ``randperm`` per epoch, ``index_select`` batches, fused Adam, the loss read once per epoch, and the same
  plain-PyTorch objective as ``plain``; ``tensors-bf16`` the same under bf16 autocast. fastvae's loop must beat
  the faster of the two to show that its ops pay, not only its data path. ``tensors-ftz`` is the fp32 one with
  subnormals flushed to zero as ``fit`` flushes them (``fastvae.train.denormals``): what the careful loop gains
  from that setting alone, shown beside the others and not among the two the target names.
- ``bare``: the same careful loop around fastvae's own step (its model's fused forward, the balanced loss module,
  fastvae's precision as ``auto`` chose it for the ``fastvae`` loop, subnormals flushed as fit flushes them): the
  bare step of fastvae's ops. fastvae's ``steps s`` against ``bare``'s is what its loop adds around the ops
  (window, schedule, objective wrapper, metrics).
- ``pythae`` (when ``pythae`` imports): pythae 0.1.2's ``BaseTrainer.train_step`` (one epoch: its
  ``DataLoader`` over ``BaseDataset`` in memory, its callbacks) on a ``pythae.models.VAE`` whose encoder and
  decoder are the same modules; pythae's own VAE loss (``0.5 * sum of squared errors + KL``, batch mean).
  Only the training pass is timed (``train`` would also deep-copy the model every epoch and save it).

Like for like: every other loop ends each epoch with the same work as ``fit`` (``end_of_epoch``: the test
split evaluated in batches of 1000 in eval mode, a grid of 64 samples and one of 32 test images over their
reconstructions written as PNGs, a checkpoint of the model and the optimizer). ``train_s`` is the
training steps alone (``fit``'s own ``epoch_time_s``). One epoch of each loop in turn (fastvae's epoch, then
the others from its epoch-end callback; a ``fastvae-*`` variant runs its own ``fit`` with a ``tensors`` epoch
after each of its epochs), for ``epochs`` rounds; times are the median and the 20th/80th percentiles over
epochs, ``cpu_s`` the median CPU seconds of the process per epoch (robust to other processes at 1 thread).

Toward the limit: ``step_flops`` counts a training step's FLOPs (its matmuls and convolutions), ``gemm_rate``
measures this machine's GEMM rate in fp32 and bf16; each row's ``step_gflops`` is the FLOPs of its steps over
their seconds and ``of_gemm`` that over the GEMM rate of its precision.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fastvae.train.denormals import flushed_denormals

from .cases.balanced_mse import eager as eager_balanced_mse
from .cases.reparameterize_kl import eager as eager_reparameterize_kl
from .examples_vae import TorchvisionFashionMNIST

LOOPS = ("fastvae", "fastvae-fp32", "fastvae-compile", "bare", "tensors", "tensors-bf16", "tensors-ftz", "plain",
         "pythae")
#: the careful hand-written loops: fastvae's default must be faster than the faster of them
CAREFUL = ("tensors", "tensors-bf16")
#: the loops besides fit's that flush subnormals to zero as fit does by default (the others keep IEEE subnormals,
#: also when they run from fit's epoch-end callback)
FLUSHING = ("bare", "tensors-ftz")
VARIANTS = {"fastvae": {}, "fastvae-fp32": {"precision": "fp32"}, "fastvae-compile": {"compile": True}}
MODELS = ("dense", "conv")
BATCH = 128
LR = 1e-3


@dataclass
class LoopRow:
    """One loop on one model: epoch times in seconds over ``epochs`` epochs of ``images`` images."""

    device: str
    model: str
    loop: str
    epochs: int
    images: int
    epoch_s: float | None = None
    p20_s: float | None = None
    p80_s: float | None = None
    first_epoch_s: float | None = None
    images_per_s: float | None = None
    vs_plain: float | None = None
    train_s: float | None = None
    cpu_s: float | None = None
    #: the precision the loop trained in (fastvae's: what ``auto`` chose)
    precision: str = ""
    #: FLOPs of the training steps per second (``step_flops`` x steps / ``train_s``), in GFLOP/s
    step_gflops: float | None = None
    #: ``step_gflops`` over the machine's measured GEMM rate in the loop's precision (``gemm_rate``)
    of_gemm: float | None = None
    note: str = ""

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def load_fashion_mnist(limit: int = 0, split: str = "train") -> tuple[Tensor, Tensor]:
    """A Fashion-MNIST split through ``fastvae.data.load_dataset``: float images ``(N, 1, 28, 28)`` and labels,
    cut to the first ``limit`` images when ``limit``."""
    from fastvae.data import load_dataset

    images, labels = load_dataset("fashion-mnist", split=split, download=False)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def as_uint8(images: Tensor) -> Tensor:
    """``(N, 1, H, W)`` float images that were ``uint8 / 255`` back to ``uint8 (N, H, W)``, exactly."""
    return (images[:, 0] * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# The loops
# --------------------------------------------------------------------------------------------------
def build(model_name: str) -> nn.Module:
    """The benchmark's models with seeded initial weights: ``dense`` 784-256-64-32-16, ``conv`` fastvae's ConvVAE."""
    from fastvae.models import ConvVAE, DenseVAE

    torch.manual_seed(0)
    if model_name == "dense":
        return DenseVAE((1, 28, 28), latent_dim=16, hidden=(256, 64, 32))
    if model_name == "conv":
        return ConvVAE((1, 28, 28), latent_dim=16)
    raise ValueError(f"model must be one of {MODELS}, got {model_name!r}")


def eager_objective(model: nn.Module, data: Tensor, running_mse: Tensor) -> Tensor:
    """The balanced VAE loss of ``data`` in plain PyTorch (the objective of the ``plain`` and ``tensors``
    loops): encode, reparameterize, decode, balanced reconstruction loss (updating ``running_mse``) + KL."""
    mu, logvar = model.encode(data)
    z, kl = eager_reparameterize_kl(mu, logvar)
    return eager_balanced_mse(model.decode(z), data, running_mse)[0] + kl


def eager_evaluate(model: nn.Module, images: Tensor, running_mse: Tensor, batch_size: int = 1000) -> float:
    """The eager objective of ``images`` in eval mode, without gradient and without the update (as ``fit``'s
    ``evaluate``): the mean loss per sample."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size]
            total += eager_objective(model, x, running_mse.clone()).double() * x.shape[0]
    model.train()
    return float(total) / images.shape[0]


def end_of_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, running_mse: Tensor, test_images: Tensor,
                 out_dir: str, epoch: int) -> float:
    """What ``fit`` does at each epoch end, for the loops that it does not run: evaluate ``test_images``, write a
    grid of 64 samples and one of 32 test images over their reconstructions, save a checkpoint of the model and
    the optimizer. Returns the test loss."""
    from pathlib import Path

    from fastvae.train.grid import image_grid

    loss = eager_evaluate(model, test_images, running_mse)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        samples = model.sample(64, generator=torch.Generator().manual_seed(0))
        x = test_images[:32]
        recon = model.decode(model.encode(x)[0])
    model.train()
    image_grid(samples.float(), out / f"samples-epoch{epoch:03d}.png")
    image_grid(torch.cat([x[:16], recon[:16].float(), x[16:32], recon[16:32].float()]),
               out / f"recon-epoch{epoch:03d}.png", nrow=16)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "running_mse": running_mse,
                "epoch": epoch}, out / "checkpoint.pt")
    return loss


class PlainLoop:
    """pytorch/examples' VAE training loop over the torchvision-style dataset (see the module docstring)."""

    def __init__(self, model: nn.Module, images: Tensor, labels: Tensor, device: torch.device):
        self.model, self.device = model.to(device), device
        kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
        dataset = TorchvisionFashionMNIST(as_uint8(images), labels)
        self.loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, **kwargs)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.running_mse = torch.ones((), device=device)

    def epoch(self) -> float:
        model, optimizer = self.model, self.optimizer
        model.train()
        train_loss = 0.0
        for batch_idx, (data, _) in enumerate(self.loader):
            data = data.to(self.device)
            optimizer.zero_grad()
            loss = eager_objective(model, data, self.running_mse)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        return train_loss / len(self.loader)


class TensorLoop:
    """A careful hand-written loop over in-memory tensors: the images as one tensor on the device, one
    ``randperm`` per epoch, batches by ``index_select``, fused Adam, the loss summed on the device and read
    once per epoch; the same eager objective as ``PlainLoop``. What fastvae's loop must beat without its ops.
    ``precision="bf16"`` runs the objective under bf16 autocast; ``ops="fastvae"`` makes it fastvae's own step
    (the model's fused forward and the balanced loss module): the ``bare`` loop."""

    def __init__(self, model: nn.Module, images: Tensor, device: torch.device, *, precision: str = "fp32",
                 ops: str = "eager"):
        from fastvae.losses import build_loss

        self.model, self.device, self.precision = model.to(device), device, precision
        self.images = images.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR, fused=True)
        self.running_mse = torch.ones((), device=device)
        self.generator = torch.Generator().manual_seed(0)
        self.policy = build_loss("balanced").to(device) if ops == "fastvae" else None

    def objective(self, data: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if self.policy is None:
                return eager_objective(self.model, data, self.running_mse)
            x_hat, kl = self.model(data)
            return self.policy(x_hat, data) + kl

    def epoch(self) -> float:
        model, optimizer, images = self.model, self.optimizer, self.images
        model.train()
        order = torch.randperm(len(images), generator=self.generator).to(self.device)
        total = torch.zeros((), device=self.device)
        batches = 0
        for start in range(0, len(images), BATCH):
            data = images.index_select(0, order[start:start + BATCH])
            loss = self.objective(data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            batches += 1
        return total.item() / batches


class PythaeLoop:
    """pythae's ``BaseTrainer`` on a ``pythae.models.VAE`` made of the model's encoder and decoder."""

    def __init__(self, model: nn.Module, images: Tensor, labels: Tensor, device: torch.device, out_dir: str):
        from pythae.data.datasets import BaseDataset
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.trainers import BaseTrainer, BaseTrainerConfig

        class Encoder(BaseEncoder):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                mu, logvar = self.net(x).chunk(2, dim=-1)
                return ModelOutput(embedding=mu, log_covariance=logvar)

        class Decoder(BaseDecoder):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, z):
                return ModelOutput(reconstruction=self.net(z))

        for name in ("pythae", "pythae.trainers", "pythae.trainers.base_trainer.base_trainer", "pythae.models"):
            logging.getLogger(name).setLevel(logging.ERROR)
        config = VAEConfig(input_dim=tuple(images.shape[1:]), latent_dim=model.latent_dim, reconstruction_loss="mse")
        vae = VAE(config, encoder=Encoder(model.encoder), decoder=Decoder(model.decoder))
        training = BaseTrainerConfig(output_dir=out_dir, per_device_train_batch_size=BATCH, num_epochs=1_000_000,
                                     learning_rate=LR, optimizer_cls="Adam", no_cuda=device.type != "cuda")
        with _silenced():
            self.trainer = BaseTrainer(vae, train_dataset=BaseDataset(images.cpu(), labels.cpu()),
                                       training_config=training)
            self.trainer.prepare_training()
        self.n_epoch = 0
        # for end_of_epoch: the same modules, pythae's optimizer; pythae's loss has no running MSE
        self.model, self.optimizer = model, self.trainer.optimizer
        self.running_mse = torch.ones((), device=device)

    def epoch(self) -> float:
        self.n_epoch += 1
        with _silenced():
            return self.trainer.train_step(self.n_epoch)


@contextlib.contextmanager
def _silenced():
    """pythae's progress bars and console printer write to stdout/stderr at every step; keep them out of the log."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def pythae_available() -> str | None:
    """None when pythae imports, else why not."""
    try:
        importlib.import_module("pythae")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run_model(model_name: str, device: torch.device, images: Tensor, labels: Tensor, epochs: int,
              loops: Sequence[str], log: Callable[[str], None] = print,
              test_images: Tensor | None = None) -> dict[str, dict]:
    """Interleaved epochs of ``loops`` on ``model_name``, each ending with the same end-of-epoch work:
    ``{loop: {"times": [...], "train": [...], "cpu": [...], "note": str}}`` (seconds per epoch)."""
    from fastvae.train import TrainConfig, fit

    test_images = test_images if test_images is not None else images[:2048]
    results = {name: {"times": [], "train": [], "cpu": [], "note": "", "precision": "fp32"} for name in loops}
    others: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="fastvae-bench-loop-") as tmp:
        if "bare" in loops:
            others["bare"] = None  # built at fastvae's first epoch end, in the precision its auto chose
        for name in (*CAREFUL, "tensors-ftz"):
            if name in loops:
                precision = "bf16" if name == "tensors-bf16" else "fp32"
                others[name] = TensorLoop(build(model_name), images, device, precision=precision)
                results[name]["precision"] = precision
        if "plain" in loops:
            others["plain"] = PlainLoop(build(model_name), images, labels, device)
        if "pythae" in loops:
            others["pythae"] = PythaeLoop(build(model_name), images, labels, device, f"{tmp}/pythae")

        def run_one(name: str, k: int) -> None:
            loop = others[name]
            with flushed_denormals(name in FLUSHING):
                wall, cpu = time.perf_counter(), time.process_time()
                train = _timed(loop.epoch, device)
                end_of_epoch(loop.model, loop.optimizer, loop.running_mse, test_images, f"{tmp}/{name}-run", k + 1)
                _sync(device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            results[name]["times"].append(wall)
            results[name]["train"].append(train)
            results[name]["cpu"].append(cpu)
            log(f"  {model_name:6s} epoch {k + 1}/{epochs} {name:15s} {wall:8.2f} s "
                f"(steps {train:.2f} s, cpu {cpu:.2f} s)")

        def run_others(k: int) -> None:
            names = list(others)
            for name in names[k % len(names):] + names[:k % len(names)] if names else []:
                run_one(name, k)

        fits = [name for name in loops if name in VARIANTS]
        if others.get("bare", False) is None and not fits:
            others["bare"] = TensorLoop(build(model_name), images, device, ops="fastvae")
        if not fits:
            for k in range(epochs):
                run_others(k)
            return results

        for index, fit_name in enumerate(fits):
            marks = {"wall": time.perf_counter(), "cpu": time.process_time()}

            def at_epoch_end(*, epoch, metrics, epoch_end, config, fit_name=fit_name, index=index, **_):
                if not epoch_end:
                    return
                _sync(device)
                results[fit_name]["precision"] = config.precision
                if index == 0 and "bare" in others and others["bare"] is None:
                    others["bare"] = TensorLoop(build(model_name), images, device, precision=config.precision,
                                                ops="fastvae")
                    results["bare"]["precision"] = config.precision
                wall, cpu = time.perf_counter() - marks["wall"], time.process_time() - marks["cpu"]
                results[fit_name]["times"].append(wall)
                results[fit_name]["train"].append(float(metrics["epoch_time_s"]))
                results[fit_name]["cpu"].append(cpu)
                log(f"  {model_name:6s} epoch {epoch}/{epochs} {fit_name:15s} {wall:8.2f} s "
                    f"(steps {metrics['epoch_time_s']:.2f} s, cpu {cpu:.2f} s)")
                if index == 0:
                    run_others(epoch - 1)
                elif "tensors" in others:
                    run_one("tensors", epoch - 1)
                marks["wall"], marks["cpu"] = time.perf_counter(), time.process_time()

            config = TrainConfig(dataset="fashion-mnist", model=model_name, epochs=epochs, batch_size=BATCH, lr=LR,
                                 device=str(device), out=f"{tmp}/{fit_name}", progress=False, **VARIANTS[fit_name])
            fit(build(model_name), images, config, test_data=test_images, callbacks=[at_epoch_end])
    return results


def step_flops(model_name: str, device: torch.device, batch: int = BATCH) -> float:
    """FLOPs of one training step (forward and backward of the eager objective) of ``model_name`` at ``batch``,
    as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls and convolutions: the GEMM work)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(model_name).to(device)
    data = torch.rand(batch, 1, 28, 28, device=device)
    with FlopCounterMode(display=False) as counter:
        eager_objective(model, data, torch.ones((), device=device)).backward()
    return float(counter.get_total_flops())


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """This machine's GEMM rate in FLOP/s: the fastest of ``repeats`` ``(n, n) @ (n, n)`` products in ``dtype``
    (after a warm-up), ``2 n^3`` FLOPs each. The ceiling a step's GFLOP/s is read against."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        best = min(best, _timed(lambda: a @ b, device))
    return 2 * n ** 3 / best


def run_loops(device: torch.device, *, quick: bool = False, epochs: int | None = None,
              models: Sequence[str] | None = None, variants: Sequence[str] | None = None,
              log: Callable[[str], None] = print) -> tuple[list[LoopRow], str]:
    """Every loop on every model; returns the rows and a note on what ran (printed with the ratios).
    ``variants``: the ``fastvae-*`` settings beside ``fastvae`` (default: fp32 and compile, none when quick)."""
    from .measure import device_name

    models = tuple(models or MODELS)
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"loop models must be among {MODELS}, got {bad}")
    variants = tuple(variants if variants is not None else (() if quick else ("fp32", "compile")))
    if not {f"fastvae-{v}" for v in variants} <= set(VARIANTS):
        raise ValueError(f"loop variants must be among fp32, compile; got {list(variants)}")
    epochs = epochs or (1 if quick else 3)
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    limit = 512 if quick else 0
    images, labels = load_fashion_mnist(limit)
    test_images = load_fashion_mnist(256 if quick else 0, split="test")[0]
    missing = pythae_available()
    loops = [name for name in LOOPS if (name != "pythae" or missing is None)
             and (name not in VARIANTS or name == "fastvae" or name[len("fastvae-"):] in variants)]
    note = (f"Fashion-MNIST train split, {images.shape[0]} images, batch {BATCH}, Adam lr {LR}, {epochs} epoch(s) "
            "of each loop, interleaved. Every loop ends each epoch with the same work as `fastvae train`: the "
            f"evaluation of the {test_images.shape[0]} test images, a sample grid and a reconstruction grid, a "
            "checkpoint; epoch s is the wall time of the whole epoch, the note gives the training steps alone and "
            "the process's CPU seconds. `plain`: pytorch/examples' VAE loop with a DataLoader over a torchvision-"
            "equivalent FashionMNIST dataset (PIL image + ToTensor per sample; torchvision itself is not installable "
            "beside this torch build), the same model and balanced objective in plain PyTorch. `tensors`: a careful "
            "hand-written loop over the images held as one tensor (randperm, index_select, fused Adam, one loss "
            "read per epoch), the same objective as `plain`; `tensors-bf16` the same under bf16 autocast; "
            "`tensors-ftz` the fp32 one with subnormals flushed to zero, as fit flushes them by default "
            "(`--no-flush-denormal` keeps them; every other loop but `bare` keeps them). `bare`: "
            "that loop around fastvae's own step (the model's fused forward, the balanced loss module) in the "
            "precision fastvae's auto chose, subnormals flushed: what fastvae's loop adds around its ops is its "
            "steps s over bare's. "
            "`pythae`: pythae "
            "0.1.2's BaseTrainer.train_step on the same encoder/decoder, its own VAE loss. `fastvae`: "
            "fastvae.train.fit with test_data, as `fastvae train` runs it, precision auto (the faster of fp32 and bf16 "
            "as timed on this machine; `-fp32`: --precision fp32, `-compile`: --compile). `time / plain` is epoch "
            "time over the plain loop's: below 1 is faster.")
    if missing is not None:
        note += f" pythae not run: {missing}."
    rows: list[LoopRow] = []
    dev = device_name(device)
    gemm = {precision: gemm_rate(device, dtype, n=256 if quick else 1024)
            for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    log("GEMM rate: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in gemm.items()))
    steps = math.ceil(images.shape[0] / BATCH)
    for model_name in models:
        log(f"loop: {model_name} on {dev}, {images.shape[0]} images, {epochs} epoch(s) per loop")
        flops = step_flops(model_name, device)
        results = run_model(model_name, device, images, labels, epochs, loops, log, test_images)
        plain = results.get("plain", {}).get("times")
        plain_median = float(np.median(plain)) if plain else None
        for name in loops:
            times = results[name]["times"]
            row = LoopRow(dev, model_name, name, len(times), images.shape[0])
            if times:
                p20, p50, p80 = np.percentile(np.asarray(times), [20, 50, 80])
                row.epoch_s, row.p20_s, row.p80_s = float(p50), float(p20), float(p80)
                row.first_epoch_s = float(times[0])
                row.images_per_s = images.shape[0] / row.epoch_s
                row.vs_plain = row.epoch_s / plain_median if plain_median else None
                row.train_s = float(np.median(results[name]["train"]))
                row.cpu_s = float(np.median(results[name]["cpu"]))
                row.precision = results[name]["precision"]
                row.step_gflops = flops * steps / row.train_s / 1e9 if name != "pythae" else None
                row.of_gemm = row.step_gflops * 1e9 / gemm[row.precision] if row.step_gflops else None
                row.note = f"steps {row.train_s:.2f} s, cpu {row.cpu_s:.2f} s per epoch"
            rows.append(row)
    print_ratios(rows, log)
    note += (f" GEMM rate (the fastest of 10 {1024 if not quick else 256}-cubed matmuls): fp32 "
             f"{gemm['fp32'] / 1e9:.0f} GFLOP/s, bf16 {gemm['bf16'] / 1e9:.0f} GFLOP/s; step GFLOP/s: the "
             "FLOPs of a training step (torch's FlopCounterMode: its matmuls and convolutions) times the steps, over "
             "the steps' seconds; `of GEMM`: that over the GEMM rate in the loop's precision.")
    return rows, note


def print_ratios(rows: Sequence[LoopRow], log: Callable[[str], None] = print) -> None:
    """The epoch-time ratios between loops, per model."""
    for model_name in dict.fromkeys(r.model for r in rows):
        times = {r.loop: r.epoch_s for r in rows if r.model == model_name and r.epoch_s}
        pairs = (("fastvae", "plain"), ("tensors", "plain"), ("pythae", "plain"), ("fastvae", "tensors"),
                 ("fastvae", "tensors-bf16"), ("fastvae", "tensors-ftz"), ("tensors-ftz", "tensors"),
                 ("fastvae-fp32", "tensors"), ("fastvae-compile", "tensors"),
                 ("fastvae", "bare"), ("fastvae", "pythae"))
        parts = [f"{a}/{b} {times[a] / times[b]:.2f}" for a, b in pairs
                 if a in times and b in times]
        speed = ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
        log(f"loop {model_name}: epoch {speed}; time ratios {', '.join(parts) or '–'}")
