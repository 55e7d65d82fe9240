"""``fastvae demo``: run every fused op once on random inputs and print what it computed."""
from __future__ import annotations

import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the fused ops once and print their results")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.set_defaults(func=run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _describe(t) -> str:
    return f"{tuple(t.shape)} mean {t.double().mean().item():+.4f}" if t.numel() else "(not computed)"


def run(args) -> int:
    import torch

    from fastvae import backend, ops
    from fastvae.train.devices import resolve_device

    torch.manual_seed(0)
    device = resolve_device(args.device)
    probe = torch.empty(1, device=device)
    print(f"backend: {'triton' if backend.use_triton(probe) else 'torch (engine)'} on {device}")
    start = time.perf_counter()
    for op in ops.ALL.values():  # every declared op, with the first of its example arguments
        inputs = op.examples(args.batch, args.latent, device)[0]
        outputs = op(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        differentiable = [o for o in outputs if o.requires_grad and o.numel()]
        if differentiable:
            torch.autograd.backward([o.sum() for o in differentiable])
        grads = [t.grad.norm().item() for t in inputs if isinstance(t, torch.Tensor) and t.grad is not None]
        print(f"{op.name}: " + ", ".join(f"{name} {_describe(o)}" for name, o in zip(op.outputs, outputs))
              + (f"; gradient norm {sum(g * g for g in grads) ** 0.5:.4f}" if grads else ""))
    print(f"done in {(time.perf_counter() - start) * 1000:.1f} ms")
    return 0
