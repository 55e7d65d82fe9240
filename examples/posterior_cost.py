"""What swapping diffusers' posterior for ``fastvae.DiagonalGaussian`` changes in one training step's posterior work.

For ``z = posterior.sample(generator); kl = posterior.kl().mean()`` (and ``sample_kl()``) with the backward of
``z.sum() + kl``, it counts the tensor ops run forward and backward (each one kernel launch on a GPU; views
are not counted) with a ``TorchDispatchMode``, and the bytes autograd saves beyond the encoder output itself
(``saved_tensors_hooks``). It runs on the CPU with the torch backend: the counts are the same on a GPU; the bytes
are the GPU's plus the float32 noise, which the CPU engine keeps for its backward (the GPU kernels recompute it).

    python examples/posterior_cost.py                       # SD-like (4, 8, 64, 64) and (1, 32, 128, 128)
    python examples/posterior_cost.py --shape 2 8 32 32
"""
from __future__ import annotations

import argparse

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae

NOT_LAUNCHES = {"split", "split_with_sizes", "chunk", "view", "_unsafe_view", "expand", "t", "detach", "alias",
                "unsqueeze", "squeeze", "slice", "select", "as_strided", "permute", "lift_fresh"}


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NOT_LAUNCHES:
            self.ops.append(f"{func.namespace}::{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def posterior_cost(make, shape, fused: bool = False) -> dict:
    """Ops forward and backward and the bytes saved for backward that are not the encoder output's own."""
    h = torch.randn(shape, requires_grad=True)
    saved: list[torch.Tensor] = []
    counter = CountOps()
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            posterior = make(h)
            generator = torch.Generator().manual_seed(0)
            if fused:
                z, kl = posterior.sample_kl(generator)
            else:
                z, kl = posterior.sample(generator), posterior.kl()
            kl = kl.mean()
        forward_ops = len(counter.ops)
        (z.sum() + kl).backward()
    seen, nbytes = set(), 0
    for t in saved:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen or t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr():
            continue
        seen.add(key)
        nbytes += t.numel() * t.element_size()
    return {"forward_ops": forward_ops, "backward_ops": len(counter.ops) - forward_ops, "saved_bytes": nbytes,
            "ops": counter.ops}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", action="append", help="(B, 2C, H, W) of the encoder output")
    parser.add_argument("--ops", action="store_true", help="list the ops too")
    args = parser.parse_args(argv)
    shapes = [tuple(s) for s in args.shape] if args.shape else [(4, 8, 64, 64), (1, 32, 128, 128)]
    rows = []
    with fastvae.use_backend("torch"):
        for shape in shapes:
            for name, make, fused in (("diffusers", DiagonalGaussianDistribution, False),
                                      ("fastvae sample()+kl()", fastvae.DiagonalGaussian, False),
                                      ("fastvae sample_kl()", fastvae.DiagonalGaussian, True)):
                cost = posterior_cost(make, shape, fused)
                rows.append({"shape": shape, "posterior": name, **cost})
                print(f"{str(shape):18s} {name:22s} ops forward {cost['forward_ops']:3d}  "
                      f"backward {cost['backward_ops']:3d}  "
                      f"saved for backward {cost['saved_bytes'] / 2**20:7.3f} MiB "
                      f"(encoder output {torch.Size(shape).numel() * 4 / 2**20:.3f} MiB)")
                if args.ops:
                    print("   ", " ".join(cost["ops"]))
    return rows


if __name__ == "__main__":
    main()
