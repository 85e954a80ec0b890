"""``diffuser-graph spectral``: spectral expansion of pattern variants across sequence lengths.

For every length and pattern variant it measures :func:`spectral_stats` and :func:`reach_stats`,
adds a random d-regular graph of the same mean degree as a chosen variant and the complete graph
(closed form) as references, and writes ``results.json``, ``results.csv``, ``results.md`` and PNG
plots into the output folder. A second part shows the low-pass effect of diffusion on one random
attention layer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

from .checks import Float, Int, UserPath
from .config import dump_config
from .diffusion import HeatTime, Hops
from .engines.dgl import edge_attention
from .graph import build_graph
from .io import atomic_save_figure, atomic_write_text
from .patterns import PatternSpec
from .reach import reach_stats
from .spectral import (
    complete_graph_stats,
    diffused_spectrum,
    eigenvalues,
    second_modulus,
    spectral_stats,
    symmetrised,
)
from .visualize import (
    plot_coverage,
    plot_diffusion_spectrum,
    plot_eigenvalue_histograms,
    plot_gap_vs_length,
)

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
    seq_len: Int = Field(default=256, ge=2, le=2048)
    pattern: PatternSpec = PatternSpec(window=4)
    head_dim: Int = Field(default=16, ge=1)
    alpha: Float = Field(default=0.1, gt=0, le=1)  # > 0: the probe also shows PPR's K = inf limit
    hops: Hops = 5
    t: HeatTime = 1.0


class SpectralConfig(BaseModel):
    """Config of ``diffuser-graph spectral`` (``configs/spectral.yaml``)."""

    model_config = ConfigDict(extra="forbid")
    seq_lens: list[Int] = Field(default=[512, 1024, 2048, 4096, 8192, 16384], min_length=1)
    variants: dict[str, PatternSpec] = Field(default_factory=lambda: dict(DEFAULT_VARIANTS),
                                             min_length=1)
    regular_like: str | None = "window+global+random"  # None: no random regular reference
    complete: bool = True
    coverage_hops: Int = Field(default=8, ge=1)
    samples: Int = Field(default=64, ge=1)
    histogram_len: Int = Field(default=1024, ge=16, le=4096)
    diffusion: DiffusionProbe = DiffusionProbe()
    out_dir: UserPath = "runs/spectral"
    seed: Int = Field(default=0, ge=0)

    @field_validator("seq_lens")
    @classmethod
    def _positive_lengths(cls, value: list[int]) -> list[int]:
        if min(value) < 16:
            raise ValueError(f"every sequence length must be >= 16, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _variants_fit(self) -> SpectralConfig:
        if self.regular_like is not None and self.regular_like not in self.variants:
            raise ValueError(f"regular_like must name a variant ({sorted(self.variants)}) or be "
                             f"null, got {self.regular_like!r}")
        for name, spec in self.variants.items():
            if not any(_fits(spec, n) for n in self.seq_lens):
                raise ValueError(f"variant {name!r} (kind {spec.kind}, max_len {spec.max_len}) "
                                 f"fits none of seq_lens {self.seq_lens}")
        if not any(_fits(spec, self.histogram_len) for spec in self.variants.values()):
            raise ValueError(f"no variant fits histogram_len ({self.histogram_len}); lower it")
        return self

    def seeded_variants(self) -> dict[str, PatternSpec]:
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
    src, dst = (x.numpy() for x in g.edges())
    attn = np.zeros((probe.seq_len, probe.seq_len))
    attn[dst, src] = edge_attention(g, q, k)[:, 0].numpy()  # row = query
    return diffused_spectrum(attn, alpha=probe.alpha, hops=probe.hops, t=probe.t)


# --- outputs -----------------------------------------------------------------------------------

TABLE_COLUMNS = ["variant", "n", "mean_degree", "lambda_2", "lambda_min", "one_sided_gap",
                 "two_sided_gap", "ramanujan_bound", "sweep_conductance", "diameter_upper",
                 "coverage_2", "coverage_5", "seconds"]


def markdown_table(frame: pd.DataFrame) -> str:
    shown = frame[[c for c in TABLE_COLUMNS if c in frame.columns]]
    return shown.to_markdown(index=False, floatfmt=".4g")


def run_spectral(config: SpectralConfig, out_dir: Path | None = None,
                 progress: bool = True) -> Path:
    """Run the sweep and write every output; returns the output folder."""
    out = Path(out_dir or config.out_dir)
    frame = sweep(config, progress=progress)  # all the work first: nothing is written on failure
    variants = config.seeded_variants()
    hist_n = config.histogram_len
    graphs = {name: build_graph(hist_n, spec) for name, spec in variants.items()
              if _fits(spec, hist_n)}
    histograms = {name: eigenvalues(g) for name, g in graphs.items()}
    mean_degrees = {name: symmetrised(g).sum() / hist_n for name, g in graphs.items()}
    spectra = diffusion_probe(config.diffusion, config.seed)
    diffusion_summary = {name: {"second_modulus": second_modulus(values),
                                "spectral_gap": 1.0 - second_modulus(values)}
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
        "diffusion_spectrum.png": plot_diffusion_spectrum(
            spectra, alpha=config.diffusion.alpha, hops=config.diffusion.hops,
            t=config.diffusion.t, seq_len=config.diffusion.seq_len),
    }
    for name, fig in figures.items():
        atomic_save_figure(out / name, fig)
    return out
