"""The figures of the analysis and two-stage tools (matplotlib, Agg backend; PNG files). The training run's
image grids are ``fastvae.train.grid``'s, the experiments' figures ``fastvae.experiment_plots``'."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Latent analysis, two-stage generation (fastvae.analysis, fastvae.two_stage)
# --------------------------------------------------------------------------------------------------
def _images_for_display(x, image_shape=None):
    """``(N, H, W)`` or ``(N, H, W, 3)`` numpy images in [0, 1] from ``(N, C, H, W)``, ``(N, H, W)`` or flat
    square ``(N, H*W)``."""
    import numpy as np

    x = x.detach().float().cpu() if hasattr(x, "detach") else x
    x = np.asarray(x, dtype=np.float32)
    if image_shape is not None:
        x = x.reshape(x.shape[0], *image_shape)
    if x.ndim == 2:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"cannot show flat images of {x.shape[1]} values; pass image_shape")
        x = x.reshape(x.shape[0], side, side)
    if x.ndim == 4:
        x = x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)
    return np.clip(x, 0.0, 1.0)


def image_rows(rows, path, *, titles=None, image_shape=None, max_per_row=16, title=None):
    """One row of images per entry of ``rows`` (each ``(N, ...)``), labelled by ``titles``; saved to ``path``."""
    rows = [_images_for_display(r, image_shape)[:max_per_row] for r in rows]
    ncols = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(0.8 * ncols + 1.6, 0.9 * len(rows) + 0.4 * bool(title)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for k in range(ncols):
            ax = axes[i][k]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k < row.shape[0]:
                ax.imshow(row[k], cmap="gray" if row.ndim == 3 else None, vmin=0, vmax=1)
        if titles is not None:
            axes[i][0].set_ylabel(titles[i], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_bars(stats, path):
    """Per latent variable: ``Var(mu)`` and ``E[sigma^2]`` stacked (the stationary condition puts the top at 1),
    and the reconstruction gain below; inactive variables hatched. ``stats`` is a ``LatentStatistics``."""
    import numpy as np

    d = stats.latent_dim
    idx = np.arange(d)
    inactive = stats.inactive.numpy()
    has_gain = stats.gain is not None
    fig, axes = plt.subplots(2 if has_gain else 1, 1, figsize=(max(6, 0.45 * d + 2), 5.5 if has_gain else 3.2),
                             sharex=True, squeeze=False)
    ax = axes[0][0]
    var_mu, s2 = stats.var_mu.numpy(), stats.mean_sigma2.numpy()
    ax.bar(idx, var_mu, color="tab:blue", label="Var(mu)")
    ax.bar(idx, s2, bottom=var_mu, color="tab:orange", label="E[sigma^2]")
    for j in idx[inactive]:
        ax.bar(j, var_mu[j] + s2[j], fill=False, hatch="//", edgecolor="k", linewidth=0)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="stationary: sum = 1")
    ax.set_ylabel("variance")
    ax.set_title(f"{int(inactive.sum())} of {d} variables inactive (hatched); "
                 f"largest |sum - 1| = {float(stats.deviation.max()):.3f}", fontsize=9)
    ax.set_ylim(0, max(1.35, float((var_mu + s2).max()) * 1.15))
    ax.legend(fontsize=7, loc="upper right", ncol=3)
    if has_gain:
        ax = axes[1][0]
        ax.bar(idx, stats.gain.numpy(), color=["tab:gray" if f else "tab:green" for f in inactive])
        ax.set_ylabel("reconstruction gain\n(MSE increase)")
    axes[-1][0].set_xticks(idx)
    axes[-1][0].set_xlabel("latent variable")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_evolution(history, path):
    """The seed's Figure 1: ``Var(mu_j)`` and ``E[sigma_j^2]`` of every variable along training, from a
    ``LatentTracker.history`` (``step``, ``var_mu``, ``mean_sigma2``)."""
    import numpy as np

    steps = np.asarray(history["step"])
    var_mu = np.asarray(history["var_mu"])
    s2 = np.asarray(history["mean_sigma2"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    for ax, values, name in zip(axes, (var_mu, s2, var_mu + s2),
                                ("Var(mu_j)", "E[sigma_j^2]", "Var(mu_j) + E[sigma_j^2]")):
        for j in range(values.shape[1]):
            ax.plot(steps, values[:, j], linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    axes[2].axhline(1.0, color="k", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_circles(mu, logvar, labels, path, *, max_points=2000):
    """For a 2-D latent space: each data point as an ellipse at ``mu`` with semi-axes ``sigma`` (a circle of area
    ``pi sigma^2`` when both sigmas agree), coloured by class; the unit circle of the prior drawn for scale."""
    import numpy as np
    from matplotlib.collections import EllipseCollection

    mu = np.asarray(mu.detach().float().cpu())[:max_points]
    sigma = np.exp(0.5 * np.asarray(logvar.detach().float().cpu()))[:max_points]
    labels = np.asarray(labels.detach().cpu())[:max_points] if labels is not None else np.zeros(len(mu))
    if mu.ndim != 2 or mu.shape[1] != 2:
        raise ValueError(f"latent_circles needs a 2-D latent space, got mu of shape {mu.shape}")
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10")
    colors = cmap(labels.astype(int) % 10)
    ells = EllipseCollection(2 * sigma[:, 0], 2 * sigma[:, 1], np.zeros(len(mu)), units="xy", offsets=mu,
                             offset_transform=ax.transData, facecolors=colors, alpha=0.15, edgecolors=colors,
                             linewidths=0.3)
    ax.add_collection(ells)
    ax.scatter(mu[:, 0], mu[:, 1], s=2, c=colors)
    ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, linestyle="--", color="k"))
    lim = float(np.abs(mu).max() + sigma.max()) * 1.05
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("z_0")
    ax.set_ylabel("z_1")
    ax.set_title("posteriors N(mu, sigma^2) of data points, by class", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def variance_bars(latent_rows, path):
    """Per latent dimension, the variance of each generation setting's latents beside the aggregate posterior's:
    ``latent_rows`` maps a label to a ``(D,)`` array."""
    import numpy as np

    labels = list(latent_rows)
    d = len(next(iter(latent_rows.values())))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * d + 2), 3.4))
    for k, label in enumerate(labels):
        ax.bar(np.arange(d) + (k - (len(labels) - 1) / 2) * width, np.asarray(latent_rows[label]), width, label=label)
    ax.set_xticks(np.arange(d))
    ax.set_xlabel("latent variable")
    ax.set_ylabel("variance")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Training draws its grids without matplotlib: fastvae.train.grid.image_grid, re-exported here.
from .train.grid import image_grid  # noqa: E402,F401


# --------------------------------------------------------------------------------------------------
# Benchmarks (bench/)
# --------------------------------------------------------------------------------------------------
def benchmark_bars(rows, path, *, title, modes, providers):
    """One panel per mode: per case, a bar per provider at its median time (log scale) with the
    20th-80th percentile range as the error bar. ``rows`` are dicts with ``case``, ``mode``, ``provider``,
    ``median_ms``, ``p20_ms``, ``p80_ms``; ``modes`` is a list of ``(mode, title)``. Saved to ``path``."""
    import numpy as np

    cases = list(dict.fromkeys(r["case"] for r in rows))
    index = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6.0, 1.1 * len(cases) + 2) * len(modes) / 2, 3.6),
                             squeeze=False)
    width = 0.8 / len(providers)
    x = np.arange(len(cases))
    for ax, (mode, mode_title) in zip(axes[0], modes):
        for k, provider in enumerate(providers):
            found = [index.get((c, mode, provider), {}) for c in cases]
            med = np.array([r.get("median_ms") or np.nan for r in found], dtype=float)
            low = np.array([r.get("p20_ms") or np.nan for r in found], dtype=float)
            high = np.array([r.get("p80_ms") or np.nan for r in found], dtype=float)
            err = np.nan_to_num(np.vstack([med - low, high - med]).clip(min=0))
            ax.bar(x + (k - (len(providers) - 1) / 2) * width, med, width, yerr=err, capsize=2, label=provider)
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=7)
        ax.set_title(mode_title, fontsize=9)
        ax.set_ylabel("ms (median, p20-p80)", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
