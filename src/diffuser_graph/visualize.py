"""Every figure of the package: patterns, training curves, task examples and spectra.

``draw_*`` functions draw into a matplotlib ``Axes`` (notebooks compose them); ``plot_*``
functions return a whole :class:`~matplotlib.figure.Figure` (not tied to pyplot, so scripts and
tests need no display); save one with :func:`diffuser_graph.io.atomic_save_figure`. Pattern
drawings are query-major (row = query, column = key); large patterns are drawn as block densities
(the fraction of present edges in each block of tokens) so that a picture stays readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dgl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .diffusion import Diffusion
from .patterns import PatternSpec
from .reach import khop_receptive_field
from .spectral import diffusion_eigenvalue_map, second_modulus


def adjacency_density(g: dgl.DGLGraph, max_pixels: int = 512) -> tuple[np.ndarray, int]:
    """``(density, block)``: query-major ``(ceil(n/block), ceil(n/block))`` fraction of edges."""
    n = g.num_nodes()
    block = max(1, int(np.ceil(n / max_pixels)))
    cells = int(np.ceil(n / block))
    src, dst = (t.numpy() for t in g.edges())
    counts = np.bincount((dst // block) * cells + src // block, minlength=cells * cells)
    sizes = np.minimum(block, n - np.arange(cells) * block)
    return counts.reshape(cells, cells) / np.outer(sizes, sizes), block


def draw_adjacency(ax, g: dgl.DGLGraph, title: str | None = None, max_pixels: int = 512):
    """Adjacency (query rows, key columns) as an image; returns the matplotlib image."""
    density, block = adjacency_density(g, max_pixels)
    n = g.num_nodes()
    image = ax.imshow(density, cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                      extent=(0, n, n, 0))
    ax.set_xlabel("key token u")
    ax.set_ylabel("query token v")
    suffix = "" if block == 1 else f" ({block}x{block} blocks, shade = edge density)"
    ax.set_title((title or f"attention pattern, n = {n}") + suffix, fontsize=9)
    return image


def draw_degree_histogram(ax, g: dgl.DGLGraph, title: str | None = None) -> None:
    """Histogram of keys per query (in-degree)."""
    degree = g.in_degrees().numpy()
    ax.hist(degree, bins=min(50, max(5, len(np.unique(degree)))), color="tab:blue")
    ax.set_yscale("log")  # a few global tokens sit far from thousands of ordinary ones
    ax.set_xlabel("keys per query (in-degree)")
    ax.set_ylabel("number of queries (log)")
    ax.set_title(title or f"keys per query: mean {degree.mean():.1f}, max {degree.max()}",
                 fontsize=9)


def draw_receptive_field(ax, g: dgl.DGLGraph, query: int, hops: int,
                         image_size: tuple[int, int] | None = None) -> None:
    """Hops needed for each key to reach ``query`` (up to ``hops``); grey: out of reach.

    1-D sequences are drawn as a strip of tokens, 2-D grids (``image_size``) as an image.
    """
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm

    distance = khop_receptive_field(g, query, hops).astype(float)
    distance[distance > hops] = np.nan
    shape = image_size if image_size is not None else (1, g.num_nodes())
    cmap = colormaps["viridis"].resampled(hops + 1).with_extremes(bad="lightgrey")
    norm = BoundaryNorm(np.arange(-0.5, hops + 1.5), hops + 1)
    image = ax.imshow(distance.reshape(shape), cmap=cmap, norm=norm, aspect="auto",
                      interpolation="nearest")
    colorbar = ax.figure.colorbar(image, ax=ax, ticks=range(hops + 1))
    colorbar.set_label("hops to reach the query")
    if image_size is None:
        ax.set_yticks([])
        ax.set_xlabel("key token")
    reached = int(np.isfinite(distance).sum())
    ax.set_title(f"{hops}-hop receptive field of token {query}: {reached} of "
                 f"{g.num_nodes()} tokens", fontsize=9)


def plot_pattern(g: dgl.DGLGraph, spec: PatternSpec, query: int, hops: int) -> Figure:
    """Adjacency, keys per query and the ``hops``-hop receptive field of ``query`` (the
    ``pattern`` command's picture)."""
    fig = Figure(figsize=(13, 4.6))
    grid = fig.add_gridspec(1, 3, width_ratios=[1.1, 1, 1.3])
    draw_adjacency(fig.add_subplot(grid[0]), g)
    draw_degree_histogram(fig.add_subplot(grid[1]), g)
    draw_receptive_field(fig.add_subplot(grid[2]), g, query, hops,
                         spec.image_size if spec.kind == "grid" else None)
    fig.suptitle(f"{spec.kind} pattern {spec.model_dump(exclude_defaults=True)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_image_examples(images: list[np.ndarray], titles: list[str], title: str = "",
                        columns: int = 8) -> Figure:
    """Grey-level ``(H, W)`` images in a grid of up to ``columns``, each titled (e.g. its label)."""
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(1.6 * columns, 0.4 + 2.0 * rows))
    for index, (image, name) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(image, cmap="gray", vmin=0, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(records: list[dict]) -> Figure:
    """Training/validation loss and accuracy against step (the records of ``metrics.jsonl``)."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig = Figure(figsize=(11, 4))
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "accuracy"),
                              ("cross-entropy", "accuracy"), strict=True):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        ax.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label="val")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(key.capitalize())
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_hop_weights(weights: Sequence[np.ndarray], start: Sequence[float]) -> Figure:
    """The learned kernel's hop weights: one panel per layer, one line per head (``weights[l]:
    (H, K + 1)``), and the starting weights ``start`` (PPR) dashed."""
    fig = Figure(figsize=(3.6 * len(weights), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(weights), sharey=True))
    hops = np.arange(len(start))
    for layer, (ax, per_head) in enumerate(zip(axes, weights, strict=True)):
        for head, row in enumerate(per_head):
            ax.plot(hops, row, marker="o", label=f"head {head}")
        ax.plot(hops, start, "k--", label="start (PPR)")
        ax.set_xlabel("hop k")
        ax.set_title(f"layer {layer}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("weight θ_k")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Learned diffusion weights per head")
    fig.tight_layout()
    return fig


def _metric_axis(ax, table: pd.DataFrame) -> None:
    metric = table["metric"].iloc[0]
    ax.set_ylabel(f"test {metric.replace('_', ' ')}" + (" (lower is better)"
                                                        if metric.startswith("bits") else ""))
    ax.grid(True, alpha=0.3)


def plot_study_bars(table: pd.DataFrame, labels: Sequence[str], title: str) -> Figure:
    """One bar per grid point of a study (mean over seeds, error bar: sample std, dots: seeds)."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.2))
    ax = fig.add_subplot()
    positions = np.arange(len(labels))
    ax.bar(positions, table["mean"], yerr=table["std"].fillna(0), capsize=4, alpha=0.7)
    for x, values in zip(positions, table["values"], strict=True):
        ax.plot([x] * len(values), values, "k.", alpha=0.6)
    ax.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
    _metric_axis(ax, table)
    ax.set_title(f"{title}: mean ± std over seeds")
    fig.tight_layout()
    return fig


def plot_study_curve(table: pd.DataFrame, key: str, others: Sequence[str], title: str) -> Figure:
    """The metric against one numeric grid key, one line per combination of the other keys."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    groups = table.groupby(list(others), sort=False) if others else [((), table)]
    for name, part in groups:
        part = part.sort_values(key)
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in
                          zip(others, name if isinstance(name, tuple) else (name,), strict=True))
        ax.errorbar(part[key], part["mean"], yerr=part["std"].fillna(0), marker="o", capsize=4,
                    label=label or None)
    ax.set_xlabel(key)
    _metric_axis(ax, table)
    ax.set_title(f"{title}: mean ± std over seeds")
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- spectra (the spectral command and notebook 02) ---------------------------------------------

def plot_gap_vs_length(frame: pd.DataFrame) -> Figure:
    """Spectral gap ``1 - l2`` against length, one line per variant (log-log)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for variant, part in frame.groupby("variant", sort=False):
        ax.plot(part["n"], part["one_sided_gap"].clip(lower=1e-7), marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n (tokens)")
    ax.set_ylabel("spectral gap 1 - λ2 (log)")
    ax.set_title("Spectral gap of attention patterns vs sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_coverage(frame: pd.DataFrame, hops: int) -> Figure:
    """K-hop coverage curves of every variant at the longest length in ``frame``."""
    longest = frame[frame["n"] == frame["n"].max()]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ks = list(range(1, hops + 1))
    for _, row in longest.iterrows():
        ax.plot(ks, [row[f"coverage_{k}"] for k in ks], marker="o", label=row["variant"])
    ax.set_xlabel("diffusion hops K")
    ax.set_ylabel("fraction of (query, key) pairs within K hops")
    ax.set_title(f"K-hop coverage at n = {int(longest['n'].iloc[0])}")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_eigenvalue_histograms(spectra: dict[str, np.ndarray], n: int,
                               mean_degrees: dict[str, float] | None = None) -> Figure:
    """Histogram of the eigenvalues of ``P`` per variant (descending arrays), marking ``l2``
    and, where ``mean_degrees`` gives d, the Ramanujan band ``±2 sqrt(d-1)/d``."""
    names = list(spectra)
    mean_degrees = mean_degrees or {}
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):  # spare axes are blanked below
        values = spectra[name]
        ax.hist(values, bins=60, range=(-1, 1), color="tab:blue")
        ax.axvline(values[1], color="tab:red", linestyle="--", label=f"λ2 = {values[1]:.3f}")
        if name in mean_degrees:
            d = mean_degrees[name]
            bound = 2 * math.sqrt(d - 1) / d
            ax.axvspan(-bound, bound, color="tab:green", alpha=0.15,
                       label=f"Ramanujan ±{bound:.3f} (d = {d:.0f})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("eigenvalue of D^-1/2 S D^-1/2")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Eigenvalue histograms of the normalised pattern adjacency (n = {n})")
    fig.tight_layout()
    return fig


def plot_diffusion_spectrum(spectra: dict[str, np.ndarray], *, alpha: float, hops: int, t: float,
                            seq_len: int) -> Figure:
    """Eigenvalues of one attention layer before/after diffusion (``spectra`` as returned by
    :func:`~diffuser_graph.spectral.diffused_spectrum` with ``alpha``, ``hops``, ``t``), and the
    low-pass maps of PPR and heat diffusion on eigenvalues."""
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.subplots(1, 2)
    for name, marker in (("A", "o"), ("ppr", "x"), ("ppr_inf", "+"), ("heat", ".")):
        values = spectra[name]
        left.scatter(values.real, values.imag, s=10, marker=marker,
                     label=f"{name} (|μ2| = {second_modulus(values):.3f})")
    theta = np.linspace(0, 2 * np.pi, 200)
    left.plot(np.cos(theta), np.sin(theta), linestyle=":", color="grey")
    left.set_aspect("equal")
    left.set_xlabel("Re μ")
    left.set_ylabel("Im μ")
    left.set_title(f"Eigenvalues of one random attention layer (n = {seq_len})")
    left.legend(fontsize=7, loc="lower left")
    mu = np.linspace(-1, 1, 400)
    ppr = Diffusion(alpha=alpha, hops=hops)
    right.plot(mu, mu, color="grey", linestyle=":", label="identity (no diffusion)")
    right.plot(mu, diffusion_eigenvalue_map(mu, ppr, infinite=True),
               label=f"PPR, K = inf: α/(1-(1-α)μ), α = {alpha}")
    right.plot(mu, diffusion_eigenvalue_map(mu, ppr), label=f"PPR, K = {hops} (truncated series)")
    right.plot(mu, diffusion_eigenvalue_map(mu, Diffusion(kernel="heat", hops=hops, t=t)),
               label=f"heat, t = {t}, K = {hops}")
    right.set_xlabel("eigenvalue μ of A")
    right.set_ylabel("eigenvalue of the diffused operator")
    right.set_title("Low-pass map of diffusion on eigenvalues")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig
