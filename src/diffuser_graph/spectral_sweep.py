"""``diffuser-graph spectral``: spectral expansion of pattern variants across sequence lengths.

For every length and pattern variant it measures :func:`spectral_stats` and :func:`reach_stats`,
adds a random d-regular graph of the same mean degree as a chosen variant and the complete graph
(closed form) as references, and writes ``results.json``, ``results.csv``, ``results.md`` and PNG
plots into the output folder. A second part shows the low-pass effect of diffusion on one random
attention layer.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import networkx as nx
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

from .config import atomic_write_text, dump_config
from .graph import build_graph
from .patterns import PatternSpec
from .reach import reach_stats
from .reference import dense_attention_matrix, dense_mask
from .spectral import (complete_graph_stats, diffused_spectrum, diffusion_eigenvalue_map,
                       eigenvalues, spectral_stats, symmetrised)

DEFAULT_VARIANTS = {
    "window": PatternSpec(window=32),
    "window+random": PatternSpec(window=32, num_random=16),
    "window+global": PatternSpec(window=32, num_global=16),
    "window+global+random": PatternSpec(window=32, num_global=16, num_random=16),
    "official": PatternSpec(kind="official"),
}


class DiffusionProbe(BaseModel):
    """One random attention layer on which the diffused spectrum is shown."""

    model_config = ConfigDict(extra="forbid")
    seq_len: int = Field(default=256, ge=2, le=2048)
    pattern: PatternSpec = PatternSpec(window=4)
    head_dim: int = Field(default=16, ge=1)
    alpha: float = Field(default=0.1, gt=0, le=1)
    hops: int = Field(default=5, ge=1)
    t: float = Field(default=1.0, gt=0)


class SpectralConfig(BaseModel):
    """Config of ``diffuser-graph spectral`` (``configs/spectral.yaml``)."""

    model_config = ConfigDict(extra="forbid")
    seq_lens: List[int] = Field(default=[512, 1024, 2048, 4096, 8192, 16384], min_length=1)
    variants: Dict[str, PatternSpec] = Field(default_factory=lambda: dict(DEFAULT_VARIANTS),
                                             min_length=1)
    regular_like: Optional[str] = "window+global+random"  # None: no random regular reference
    complete: bool = True
    coverage_hops: int = Field(default=8, ge=1)
    samples: int = Field(default=64, ge=1)
    histogram_len: int = Field(default=1024, ge=16, le=4096)
    diffusion: DiffusionProbe = DiffusionProbe()
    out_dir: str = "runs/spectral"
    seed: int = Field(default=0, ge=0)

    @field_validator("seq_lens")
    @classmethod
    def _positive_lengths(cls, value: List[int]) -> List[int]:
        if min(value) < 16:
            raise ValueError(f"every sequence length must be >= 16, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _known_regular_variant(self) -> "SpectralConfig":
        if self.regular_like is not None and self.regular_like not in self.variants:
            raise ValueError(f"regular_like must name a variant ({sorted(self.variants)}) or be "
                             f"null, got {self.regular_like!r}")
        return self

    def seeded_variants(self) -> Dict[str, PatternSpec]:
        """Variants with the run's one ``seed`` applied to their random keys."""
        return {name: spec.model_copy(update={"seed": self.seed})
                for name, spec in self.variants.items()}


def _fits(spec: PatternSpec, n: int) -> bool:
    return spec.kind != "official" or n <= spec.max_len


def random_regular(n: int, mean_degree: float, seed: int):
    """A random d-regular graph (networkx) with d the nearest valid degree to ``mean_degree``."""
    d = min(max(int(round(mean_degree)), 1), n - 1)
    if (n * d) % 2:
        d += 1 if d + 1 < n else -1
    return nx.to_scipy_sparse_array(nx.random_regular_graph(d, n, seed=seed), format="csr",
                                    dtype=np.float64)


def _row(variant: str, graph, config: SpectralConfig) -> dict:
    start = time.perf_counter()
    spectral = spectral_stats(graph, seed=config.seed).as_dict()
    reach = reach_stats(graph, max_hops=config.coverage_hops, samples=config.samples,
                        seed=config.seed)
    coverage = {f"coverage_{k}": value for k, value in reach.coverage.items()}
    return {"variant": variant, **spectral, "diameter_lower": reach.diameter_lower,
            "diameter_upper": reach.diameter_upper, **coverage,
            "seconds": time.perf_counter() - start}


def _complete_row(n: int, config: SpectralConfig) -> dict:
    stats = complete_graph_stats(n).as_dict()
    coverage = {f"coverage_{k}": 1.0 for k in range(1, config.coverage_hops + 1)}
    return {"variant": "complete", **stats, "diameter_lower": 1.0, "diameter_upper": 1.0,
            **coverage, "seconds": 0.0}


def sweep(config: SpectralConfig, progress: bool = True) -> pd.DataFrame:
    """One row per (variant, length): spectral and reach statistics."""
    variants = config.seeded_variants()
    tasks = [(name, n) for n in config.seq_lens for name in variants if _fits(variants[name], n)]
    rows = []
    with tqdm(total=len(tasks), desc="spectral sweep", disable=not progress) as bar:
        for n in config.seq_lens:
            for name, spec in variants.items():
                if not _fits(spec, n):
                    continue
                bar.set_postfix_str(f"{name} n={n}")
                rows.append(_row(name, build_graph(n, spec), config))
                if name == config.regular_like:
                    regular = random_regular(n, rows[-1]["mean_degree"], config.seed)
                    rows.append(_row("random regular", regular, config))
                bar.update()
            if config.complete:
                rows.append(_complete_row(n, config))
    return pd.DataFrame(rows)


def diffusion_probe(probe: DiffusionProbe, seed: int) -> dict:
    """Eigenvalues of one random attention layer ``A`` and of its diffused operators."""
    g = build_graph(probe.seq_len, probe.pattern.model_copy(update={"seed": seed}))
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(probe.seq_len, 1, probe.head_dim, generator=gen, dtype=torch.float64)
            for _ in range(2))
    attn = dense_attention_matrix(dense_mask(g), q, k)[0].numpy()
    return diffused_spectrum(attn, alpha=probe.alpha, hops=probe.hops, t=probe.t)


def _second_modulus(values: np.ndarray) -> float:
    return float(np.sort(np.abs(values))[-2])


# --- outputs -----------------------------------------------------------------------------------

TABLE_COLUMNS = ["variant", "n", "mean_degree", "lambda_2", "lambda_min", "one_sided_gap",
                 "two_sided_gap", "ramanujan_bound", "sweep_conductance", "diameter_upper",
                 "coverage_2", "coverage_5", "seconds"]


def markdown_table(frame: pd.DataFrame) -> str:
    shown = frame[[c for c in TABLE_COLUMNS if c in frame.columns]]
    return shown.to_markdown(index=False, floatfmt=".4g")


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


def plot_eigenvalue_histograms(spectra: Dict[str, np.ndarray], n: int,
                               mean_degrees: Optional[Dict[str, float]] = None) -> Figure:
    """Histogram of the eigenvalues of ``P`` per variant (descending arrays), marking ``l2``
    and, where ``mean_degrees`` gives d, the Ramanujan band ``±2 sqrt(d-1)/d``."""
    names = list(spectra)
    mean_degrees = mean_degrees or {}
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.ravel(), names):
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


def plot_diffusion_spectrum(spectra: Dict[str, np.ndarray], probe: DiffusionProbe) -> Figure:
    """Eigenvalues of one attention layer before/after diffusion, and the low-pass maps."""
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.subplots(1, 2)
    for name, marker in (("A", "o"), ("ppr", "x"), ("ppr_inf", "+"), ("heat", ".")):
        values = spectra[name]
        left.scatter(values.real, values.imag, s=10, marker=marker,
                     label=f"{name} (|μ2| = {_second_modulus(values):.3f})")
    theta = np.linspace(0, 2 * np.pi, 200)
    left.plot(np.cos(theta), np.sin(theta), linestyle=":", color="grey")
    left.set_aspect("equal")
    left.set_xlabel("Re μ")
    left.set_ylabel("Im μ")
    left.set_title(f"Eigenvalues of one random attention layer (n = {probe.seq_len})")
    left.legend(fontsize=7, loc="lower left")
    mu = np.linspace(-1, 1, 400)
    a = probe.alpha
    right.plot(mu, mu, color="grey", linestyle=":", label="identity (no diffusion)")
    right.plot(mu, diffusion_eigenvalue_map(mu, alpha=a, hops=None),
               label=f"PPR, K = inf: α/(1-(1-α)μ), α = {a}")
    right.plot(mu, diffusion_eigenvalue_map(mu, alpha=a, hops=probe.hops),
               label=f"PPR, K = {probe.hops} (truncated series)")
    right.plot(mu, diffusion_eigenvalue_map(mu, hops=probe.hops, kernel="heat", t=probe.t),
               label=f"heat, t = {probe.t}, K = {probe.hops}")
    right.set_xlabel("eigenvalue μ of A")
    right.set_ylabel("eigenvalue of the diffused operator")
    right.set_title("Low-pass map of diffusion on eigenvalues")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_spectral(config: SpectralConfig, out_dir: Optional[Path] = None,
                 progress: bool = True) -> Path:
    """Run the sweep and write every output; returns the output folder."""
    out = Path(out_dir or config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = sweep(config, progress=progress)
    variants = config.seeded_variants()
    hist_n = config.histogram_len
    graphs = {name: build_graph(hist_n, spec) for name, spec in variants.items()
              if _fits(spec, hist_n)}
    histograms = {name: eigenvalues(g) for name, g in graphs.items()}
    mean_degrees = {name: symmetrised(g).sum() / hist_n for name, g in graphs.items()}
    spectra = diffusion_probe(config.diffusion, config.seed)
    diffusion_summary = {name: {"second_modulus": _second_modulus(values),
                                "spectral_gap": 1.0 - _second_modulus(values)}
                         for name, values in spectra.items()}

    atomic_write_text(out / "config.yaml", dump_config(config))
    atomic_write_text(out / "results.csv", frame.to_csv(index=False))
    atomic_write_text(out / "results.json", json.dumps({
        "config": config.model_dump(mode="json"),
        "rows": json.loads(frame.to_json(orient="records")),
        "eigenvalue_histograms": {"n": hist_n, **{k: v.tolist() for k, v in histograms.items()}},
        "diffusion": diffusion_summary,
    }, indent=1))
    gap_lines = "\n".join(f"| {name} | {s['second_modulus']:.4f} | {s['spectral_gap']:.4f} |"
                          for name, s in diffusion_summary.items())
    atomic_write_text(out / "results.md", (
        "# Spectral expansion of attention patterns\n\n"
        "Symmetrised, unweighted pattern without self-loops; P = D^-1/2 S D^-1/2.\n\n"
        f"{markdown_table(frame)}\n\n"
        f"## Diffusion on one random attention layer (n = {config.diffusion.seq_len})\n\n"
        "| operator | second largest abs eigenvalue | spectral gap |\n|---|---|---|\n"
        f"{gap_lines}\n"))
    figures = {
        "gap_vs_length.png": plot_gap_vs_length(frame),
        "coverage.png": plot_coverage(frame, config.coverage_hops),
        "eigenvalue_histograms.png": plot_eigenvalue_histograms(histograms, hist_n, mean_degrees),
        "diffusion_spectrum.png": plot_diffusion_spectrum(spectra, config.diffusion),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
    return out
