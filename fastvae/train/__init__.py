"""The lean training loop: ``fit(model, data, config)``, ``TrainConfig``, ``train(config)``.

API (stable): ``TrainConfig`` is a dataclass of every option (``save(path)`` / ``TrainConfig.load(path)``
round-trip through JSON). ``fit(model, data, config=None, *, test_data=None, callbacks=None, resume=False)
-> TrainResult`` trains ``model`` (``encode(x) -> (mu, logvar)``, ``decode(z) -> x_hat``,
``model(x, seed) -> (x_hat, kl)``, as in ``fastvae.models``) on ``data``, an images tensor ``(N, *input_shape)``
or an ``(images, labels)`` pair, and writes into ``config.out``: ``config.json``, ``checkpoint.pt`` (atomic, with
its sha256 in ``checkpoint.pt.sha256`` and the one before kept as ``checkpoint.prev.pt``; every
``checkpoint_every`` steps, at each epoch end and at a Ctrl-C), ``metrics.jsonl``, ``metrics.csv`` and
``images/{samples,recon}-epochNNN.png``. ``test_data`` (same forms) is evaluated at each epoch end.
The run folder is locked for the life of the run (``fastvae.train.runfolder``).

Each callback is called on rank 0 as ``callback(model=, step=, epoch=, out_dir=, metrics=, epoch_end=, config=)``
after every optimizer step (``epoch_end=False``, ``step`` counting from 1, ``epoch`` the 0-based index of the
running epoch, ``metrics`` the last logged training row) and once after each epoch's evaluation
(``epoch_end=True``, ``epoch`` the number of epochs completed, ``metrics`` the test metrics); extra keywords
may be added, so accept ``**kwargs``. Data already on the training device is used as is, never copied, so a
callback may rewrite it in place between epochs. ``resume=True`` continues from ``config.out/checkpoint.pt``
exactly: an interrupted and resumed run ends with the same weights as an uninterrupted one. ``train(config)``
loads ``config.dataset``, builds ``config.model`` and calls ``fit``; ``fastvae.load(run_dir) -> (model, config)``
reads a run back.

Modules: ``config`` (TrainConfig), ``loop`` (fit), ``objective`` (the loss of a step), ``checkpoint`` (atomic,
checksummed files), ``runfolder`` (locks, names, provenance), ``log`` (metrics), ``grid`` (image grids),
``devices``, ``from_config`` (train).
"""
from .checkpoint import CHECKPOINT, CheckpointError, save_atomic
from .config import TrainConfig
from .from_config import model_from_config, train
from .log import METRIC_FIELDS
from .loop import NonFiniteLossError, TrainingInterrupted, TrainResult, epoch_permutation, evaluate, fit
from .runfolder import RunFolderBusy

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError", "TrainingInterrupted", "CheckpointError",
           "RunFolderBusy", "fit", "train", "evaluate", "epoch_permutation", "model_from_config", "save_atomic",
           "CHECKPOINT", "METRIC_FIELDS"]
