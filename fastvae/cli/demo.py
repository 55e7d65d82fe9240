"""``fastvae demo``: run every fused op once on random latents and print what it computed."""
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


def run(args) -> int:
    import torch

    import fastvae
    from fastvae import backend

    from fastvae.train.devices import resolve_device

    torch.manual_seed(0)
    device = resolve_device(args.device)
    h = torch.randn(args.batch, 2 * args.latent, device=device, requires_grad=True)
    mu, logvar = h.chunk(2, dim=-1)
    start = time.perf_counter()
    z, kl = fastvae.reparameterize_kl(mu, logvar, seed=0)
    x_hat, x = torch.tanh(z), torch.zeros_like(z)
    running_mse = torch.ones((), device=device)
    rec = fastvae.balanced_mse(x_hat, x, running_mse)
    (rec + kl).backward()
    mean, var = fastvae.moments(z.detach())
    z_renorm = fastvae.renormalize(z.detach(), *fastvae.variance_law(mu.detach(), logvar.detach()))
    elapsed = time.perf_counter() - start
    print(f"backend: {'triton' if backend.use_triton(mu) else 'torch (reference)'} on {device}")
    print(f"reparameterize_kl: z {tuple(z.shape)}, KL per sample {kl.item():.4f}")
    print(f"balanced_mse: loss {rec.item():.4f}, running_mse 1.0 -> {running_mse.item():.4f}")
    print(f"gradient norm through both: {h.grad.norm().item():.4f}")
    print(f"moments of z: mean {mean.mean().item():+.4f}, var {var.mean().item():.4f} "
          f"(averaged over {args.latent} dims)")
    print(f"renormalized to the variance law: var {fastvae.moments(z_renorm)[1].mean().item():.4f}")
    print(f"done in {elapsed * 1000:.1f} ms")
    return 0
