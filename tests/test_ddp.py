"""Data-parallel training: 2 processes, gloo on CPU, through torch.distributed and DDP."""
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, results: str) -> None:
    from fastvae.data import load_dataset
    from fastvae.models import DenseVAE
    from fastvae.train import TrainConfig, fit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    writes = []

    def audit(event, args):  # every file this rank opens for writing under the run folder
        under_run = event == "open" and isinstance(args[0], str) and args[0].startswith(out)
        if under_run and args[1] and set(args[1]) & set("wax+"):
            writes.append(args[0])

    sys.addaudithook(audit)
    x, _ = load_dataset("digits")
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = DenseVAE((1, 8, 8), 4, hidden=(16,))
    config = TrainConfig(out=out, epochs=2, batch_size=100, log_every=3, progress=False, tensorboard=False, n_samples=4)
    result = fit(model, x[:600], config, test_data=x[:50])
    torch.save({"model": model.state_dict(), "running_mse": result.policy.running_mse, "writes": writes,
                "step": result.step}, f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_hold_the_same_weights_and_gamma_and_only_rank0_writes(tmp_path):
    out, results = str(tmp_path / "run"), str(tmp_path)
    mp.spawn(_worker, args=(_free_port(), out, results), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(f"{results}/rank{r}.pt") for r in range(WORLD))
    assert r0["step"] == r1["step"] == 2 * 3  # 600 images, 300 per rank, batches of 100
    for name, a in r0["model"].items():
        assert torch.equal(a, r1["model"][name]), name
    assert torch.equal(r0["running_mse"], r1["running_mse"]) and r0["running_mse"] < 1.0
    assert r1["writes"] == [] and any(p.endswith("checkpoint.pt.tmp") for p in r0["writes"])
    saved = torch.load(f"{out}/checkpoint.pt")
    assert all(torch.equal(v, r0["model"][k]) for k, v in saved["model"].items())
    assert len(saved["rng"]) == WORLD
