"""Hostile and absurd inputs (issue 18): one line naming the file or flag, no huge allocation, nothing executed
from a file, moved data re-pointed by its recorded digest."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from helpers import cli_error_line as _error_line

import fastvae
from fastvae.cli import main
from fastvae.run import load_checkpoint

TINY = ["--dataset", "digits", "--batch-size", "100", "--hidden", "16", "--latent", "4", "--no-progress",
        "--no-tensorboard", "--n-samples", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--max-steps", "2", "--out", str(folder)]) == 0
    return folder


# ---------------------------------------------------------------------------------------------- absurd sizes
@pytest.mark.parametrize("args,words", [
    (["--log-every", "10000000000"], "TrainConfig.log_every must be at most 1000000"),
    (["--hidden", "100000000"], "TrainConfig.hidden: each entry must be at most 65536"),
    (["--latent", "100000000"], "TrainConfig.latent must be at most 65536"),
    (["--seed", str(2**64)], "TrainConfig.seed must be at most 9223372036854775807"),
    (["--device", "meta"], "device 'meta': a meta tensor holds shapes but no data"),
])
def test_absurd_training_flags_are_one_line_before_anything_is_allocated(tmp_path, capsys, args, words):
    err = _error_line(capsys, ["train", *TINY, *args, "--out", tmp_path / "run"])
    assert words in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_absurd_flags_of_the_reading_commands_are_one_line(run, tmp_path, capsys):
    err = _error_line(capsys, ["sample", run, "--seed", 2**64, "--out", tmp_path / "s.png"])
    assert "--seed" in err and "out of range" in err
    err = _error_line(capsys, ["sample", run, "--device", "meta", "--out", tmp_path / "s.png"])
    assert "device 'meta'" in err


def test_an_out_path_through_a_symlink_loop_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    err = _error_line(capsys, ["train", *TINY, "--max-steps", "1", "--out", tmp_path / "a" / "run"])
    assert str(tmp_path / "a") in err and "symbolic links" in err


def test_a_npy_header_claiming_730_gib_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10**6, 1000, 196)})
        handle.write(b"\0" * 64)
    err = _error_line(capsys, ["train", *TINY[2:], "--dataset", path, "--out", tmp_path / "run"])
    assert f"{path}: not a readable array file: its header claims shape (1000000, 1000, 196)" in err
    assert "730 GiB" in err


@pytest.mark.parametrize("error", [MemoryError("cannot allocate 1.6 TiB"),
                                   RuntimeError("DefaultCPUAllocator: not enough memory\nmore lines"),
                                   OSError(5, "Input/output error", "/some/file")])
def test_oserror_memoryerror_runtimeerror_from_the_library_are_one_line(run, capsys, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(fastvae, "load", fail)
    err = _error_line(capsys, ["sample", run, "--out", "/tmp/unused.png"])
    expected = {MemoryError: "out of memory (cannot allocate 1.6 TiB)",
                RuntimeError: "DefaultCPUAllocator: not enough memory",
                OSError: "/some/file: input/output error"}[type(error)]
    assert err.startswith(f"fastvae sample: error: {expected}"), err
    monkeypatch.setenv("FASTVAE_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["sample", str(run), "--out", "/tmp/unused.png"])


# ---------------------------------------------------------------------------------------------- .npy files
def test_a_big_endian_float32_npy_trains(tmp_path):
    x = fastvae.data.load_dataset("digits")[0][:200]
    np.save(tmp_path / "big.npy", x.numpy().astype(">f4"))
    images, _ = fastvae.data.load_dataset(str(tmp_path / "big.npy"))
    assert torch.equal(images, x)
    assert main(["train", *TINY[2:], "--dataset", str(tmp_path / "big.npy"), "--max-steps", "1",
                 "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("kind,words", [("object", "it holds Python objects"), ("truncated", "truncated"),
                                        ("text", "not a .npy file"), ("npz-garbage", "not a readable array file")])
def test_unreadable_npy_files_are_named(tmp_path, capsys, kind, words):
    path = tmp_path / ("data.npz" if kind.startswith("npz") else "data.npy")
    if kind == "object":
        np.save(path, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    elif kind == "truncated":
        np.save(path, np.zeros((100, 8, 8), np.uint8))
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_text("hello, not numpy\n")
    with pytest.raises(ValueError, match=words) as info:
        fastvae.data.load_dataset(str(path))
    assert str(path) in str(info.value)
    err = _error_line(capsys, ["train", *TINY[2:], "--dataset", path, "--out", tmp_path / "run"])
    assert str(path) in err and words in err


# ---------------------------------------------------------------------------------------------- untrusted files
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_folder(root, batch):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return folder


def test_a_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    folder = _cifar_folder(tmp_path / "data", {"data": _Exploit(marker), "labels": [0]})
    with pytest.raises(ValueError, match=r"data_batch_1: not a CIFAR-10 python batch \(it names posix.system"):
        fastvae.data.load_dataset("cifar10", tmp_path / "data", download=False)
    assert not marker.exists()
    assert folder.is_dir()


def test_a_real_cifar_batch_still_loads(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    _cifar_folder(tmp_path / "data", {"data": data, "labels": [3, 7], "batch_label": b"training batch 1 of 5"})
    images, labels = fastvae.data.load_dataset("cifar10", tmp_path / "data", download=False)
    assert images.shape == (10, 3, 32, 32) and labels[:2].tolist() == [3, 7]
    assert torch.equal(images[0].flatten(), torch.from_numpy(data[0]).float() / 255)


def test_the_fid_classifier_cache_is_verified(tmp_path):
    from fastvae import fid
    from fastvae.train import CheckpointError

    x, y = fastvae.data.load_dataset("digits")
    net, info = fid.train_feature_classifier(x[:200], y[:200], epochs=1)
    path = tmp_path / "classifier.pt"
    fid.save_classifier(net, info, path)
    assert "fastvae classifier features" in fid.load_classifier_extractor(path).name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged.*fastvae fid-features"):
        fid.load_classifier_extractor(path)
    path.write_bytes(b"garbage")
    (tmp_path / "classifier.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="no sha256 recorded"):
        fid.load_classifier_extractor(path)
    torch.save({"state_dict": {}, "info": {}}, path)  # foreign, with a digest that matches it
    import hashlib

    (tmp_path / "classifier.pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  classifier.pt\n")
    with pytest.raises(CheckpointError, match="not a fastvae fid classifier"):
        fid.load_classifier_extractor(path)


# ---------------------------------------------------------------------------------------------- moved data
def test_a_moved_npy_dataset_is_re_pointed_by_its_recorded_digest(tmp_path, capsys):
    x = fastvae.data.load_dataset("digits")[0][:300]
    old = tmp_path / "old" / "images.npy"
    old.parent.mkdir()
    np.save(old, x.numpy())
    out = tmp_path / "run"
    assert main(["train", *TINY[2:], "--dataset", str(old), "--epochs", "2", "--max-steps", "2",
                 "--out", str(out)]) == 0
    new = tmp_path / "new" / "images.npy"
    new.parent.mkdir()
    shutil.move(old, new)
    other = tmp_path / "other.npy"
    np.save(other, x.numpy()[::-1].copy())
    err = _error_line(capsys, ["train", "--resume", out, "--dataset", other, "--max-steps", "3"])
    assert f"{other} is not the data the run trained on" in err
    assert main(["train", "--resume", str(out), "--dataset", str(new), "--max-steps", "3"]) == 0
    assert load_checkpoint(out)["step"] == 3 and load_checkpoint(out)["config"]["dataset"] == str(new)
    (tmp_path / "third").mkdir()
    shutil.move(new, tmp_path / "third" / "images.npy")  # moved again: --data-root names its new folder
    assert main(["train", "--resume", str(out), "--data-root", str(tmp_path / "third"), "--max-steps", "4"]) == 0
    assert load_checkpoint(out)["step"] == 4


def test_renormalize_refuses_a_negative_target_variance():
    z = torch.randn(10, 3)
    with pytest.raises(ValueError, match="target_var must be >= 0"):
        fastvae.renormalize(z, 0.0, torch.tensor([1.0, -2.0, 1.0]))
