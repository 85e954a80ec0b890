"""Pictures of patterns: adjacency matrices, degree histograms and K-hop receptive fields.

All drawings are query-major (row = query, column = key) and take a matplotlib ``Axes``, so
notebooks and the ``pattern`` command share them. Large patterns are drawn as block densities
(the fraction of present edges in each block of tokens) so that a picture stays readable.
"""

from __future__ import annotations

from typing import Optional

import dgl
import numpy as np

from .reach import khop_receptive_field


def adjacency_density(g: dgl.DGLGraph, max_pixels: int = 512) -> tuple[np.ndarray, int]:
    """``(density, block)``: query-major ``(ceil(n/block), ceil(n/block))`` fraction of edges."""
    n = g.num_nodes()
    block = max(1, int(np.ceil(n / max_pixels)))
    cells = int(np.ceil(n / block))
    src, dst = (t.numpy() for t in g.edges())
    counts = np.bincount((dst // block) * cells + src // block, minlength=cells * cells)
    sizes = np.minimum(block, n - np.arange(cells) * block)
    return counts.reshape(cells, cells) / np.outer(sizes, sizes), block


def draw_adjacency(ax, g: dgl.DGLGraph, title: Optional[str] = None, max_pixels: int = 512):
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


def draw_degree_histogram(ax, g: dgl.DGLGraph, title: Optional[str] = None) -> None:
    """Histogram of keys per query (in-degree)."""
    degree = g.in_degrees().numpy()
    ax.hist(degree, bins=min(50, max(5, len(np.unique(degree)))), color="tab:blue")
    ax.set_yscale("log")  # a few global tokens sit far from thousands of ordinary ones
    ax.set_xlabel("keys per query (in-degree)")
    ax.set_ylabel("number of queries (log)")
    ax.set_title(title or f"keys per query: mean {degree.mean():.1f}, max {degree.max()}",
                 fontsize=9)


def draw_receptive_field(ax, g: dgl.DGLGraph, query: int, hops: int,
                         image_size: Optional[tuple[int, int]] = None) -> None:
    """Hops needed for each key to reach ``query`` (up to ``hops``); grey: out of reach.

    1-D sequences are drawn as a strip of tokens, 2-D grids (``image_size``) as an image.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm

    distance = khop_receptive_field(g, query, hops).astype(float)
    distance[distance > hops] = np.nan
    shape = image_size if image_size is not None else (1, g.num_nodes())
    cmap = plt.get_cmap("viridis", hops + 1).with_extremes(bad="lightgrey")
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


def draw_image_examples(fig, images: list[np.ndarray], titles: list[str],
                        columns: int = 8) -> None:
    """Grey-level ``(H, W)`` images in a grid of ``columns``, each titled (e.g. its label)."""
    rows = int(np.ceil(len(images) / columns))
    for index, (image, title) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(image, cmap="gray", vmin=0, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
