"""The figures of ``fastvae.experiments``, drawn as ``fastvae.plots`` draws (matplotlib, Agg backend; PNG files)."""
from __future__ import annotations

from .plots import _images_for_display, plt


def noise_injection(rows, path, *, variable=None):
    """The seed's noise-injection figure: per epoch the variable's reconstruction gain (nats) and KL, and
    ``Var(mu)`` and ``E[sigma^2]`` below, with the injected noise std on a second axis; recovery shaded."""
    epochs = [r.epoch for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
    top.plot(epochs, [r.gain_nats for r in rows], "o-", label="reconstruction gain (nats)")
    top.plot(epochs, [r.kl for r in rows], "s-", label="KL (nats)")
    top.set_ylabel("nats per sample")
    top.legend(fontsize=8, loc="upper left")
    noise_axis = top.twinx()
    noise_axis.plot(epochs, [r.noise_std for r in rows], ":", color="grey", label="noise std")
    noise_axis.set_ylabel("injected noise std", color="grey")
    bottom.plot(epochs, [r.var_mu for r in rows], "o-", label="Var(mu)")
    bottom.plot(epochs, [r.mean_sigma2 for r in rows], "s-", label="E[sigma^2]")
    bottom.axhline(1.0, color="grey", lw=0.5)
    bottom.set_ylabel("variance")
    bottom.set_xlabel("epoch")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.legend(fontsize=8, loc="center left")
    recovery = [r.epoch for r in rows if r.phase == "recovery"]
    if recovery:
        for ax in (top, bottom):
            ax.axvspan(recovery[0] - 0.5, recovery[-1] + 0.5, color="green", alpha=0.08, lw=0)
        top.text(recovery[0] - 0.4, top.get_ylim()[1], "noise removed", va="top", fontsize=8, color="green")
    fig.suptitle("noise injection" + (f" into variable {variable}" if variable is not None else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_3d(mu, labels, path, *, max_points=5000):
    """The means ``mu`` ``(N, 3)`` of up to ``max_points`` images in 3-D, coloured by class ``labels``."""
    import numpy as np

    mu = np.asarray(mu[:max_points], dtype=np.float32)
    labels = np.asarray(labels[:max_points])
    fig = plt.figure(figsize=(6, 5.4))
    ax = fig.add_subplot(projection="3d")
    points = ax.scatter(mu[:, 0], mu[:, 1], mu[:, 2], c=labels, cmap="tab10", s=2, alpha=0.7)
    ax.set_xlabel("z0")
    ax.set_ylabel("z1")
    ax.set_zlabel("z2")
    fig.colorbar(points, ax=ax, shrink=0.6, pad=0.12, label="class")
    ax.set_title(f"latent means of {mu.shape[0]} test images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_slices(images, levels, path, *, side=5, image_shape=None, height_dim=2):
    """One panel per horizontal slice: ``images`` ``(S, side * side, ...)`` decoded from ``slice_latents``,
    each panel a ``side x side`` grid titled by its level ``z[height_dim] = h``."""
    import numpy as np

    fig, axes = plt.subplots(1, len(levels), figsize=(2.2 * len(levels), 2.5), squeeze=False)
    for ax, block, level in zip(axes[0], images, levels):
        tiles = _images_for_display(block, image_shape)
        h, w = tiles.shape[1:3]
        grid = np.ones((side * (h + 1) - 1, side * (w + 1) - 1) + tiles.shape[3:], dtype=np.float32)
        for k in range(side * side):
            r, c = divmod(k, side)
            grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = tiles[k]
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(f"z{height_dim} = {level:g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stationary_deviation(tracks, path):
    """``max_j`` and ``mean_j |Var(mu_j) + E[sigma_j^2] - 1|`` per epoch for each run of ``tracks`` (label ->
    ``[(epoch, max, mean), ...]``, ``fastvae.science_table.stationary_over_training``), log scale."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k, (label, track) in enumerate(tracks.items()):
        epochs = [p[0] for p in track]
        color = f"C{k}"
        ax.plot(epochs, [p[1] for p in track], "-", color=color, label=f"{label}: max_j")
        ax.plot(epochs, [p[2] for p in track], "--", color=color, label=f"{label}: mean_j")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("|Var(mu_j) + E[sigma_j^2] - 1|")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("distance from the stationary condition", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def noise_injection_seeds(histories, path):
    """The noise-injection figure for several runs (label -> the rows of ``noise_injection`` as dicts): per
    epoch the gain (nats, solid) and KL (dashed) above, ``Var(mu)`` (solid) and ``E[sigma^2]`` (dashed) below."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
    for k, (label, rows) in enumerate(histories.items()):
        epochs = [r["epoch"] for r in rows]
        color = f"C{k}"
        top.plot(epochs, [r["gain_nats"] for r in rows], "o-", color=color, ms=3, label=f"{label}: gain")
        top.plot(epochs, [r["kl"] for r in rows], "s--", color=color, ms=3, label=f"{label}: KL")
        bottom.plot(epochs, [r["var_mu"] for r in rows], "o-", color=color, ms=3, label=f"{label}: Var(mu)")
        bottom.plot(epochs, [r["mean_sigma2"] for r in rows], "s--", color=color, ms=3, label=f"{label}: E[sigma^2]")
        recovery = [r["epoch"] for r in rows if r["phase"] == "recovery"]
        if recovery:
            top.axvline(recovery[0] - 0.5, color=color, lw=0.8, ls=":")
            bottom.axvline(recovery[0] - 0.5, color=color, lw=0.8, ls=":")
    top.set_yscale("symlog", linthresh=1.0)
    top.set_ylabel("nats per sample")
    top.legend(fontsize=6, ncol=2)
    bottom.axhline(1.0, color="grey", lw=0.5)
    bottom.set_ylabel("variance")
    bottom.set_xlabel("epoch (dotted: noise removed)")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.legend(fontsize=6, ncol=2)
    fig.suptitle("noise injection into the smallest-gain active variable, every seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
