"""diffuser-graph: Diffuser (multi-hop attention diffusion) as a graph neural network on DGL.

Pipeline: a :class:`PatternSpec` describes which keys each query sees; :func:`build_graph` makes
it a DGL graph and :class:`PackedBatch` packs a batch of sequences once (padding map, graph and
engine plan); :func:`diffusion_attention` computes edge attention and diffuses values along it
with a :class:`Diffusion` (PPR, heat, or a registered kernel) on any engine.
"""

import os as _os

# DGL picks its backend at import time; say "pytorch" so it neither guesses nor warns.
_os.environ.setdefault("DGLBACKEND", "pytorch")

from .attention import DiffuserAttention, diffusion_attention, edge_attention, full_attention  # noqa: E402,I001
from .batch import PackedBatch, Padding  # noqa: E402
from .diffusion import Diffusion, kernels, register_kernel  # noqa: E402
from .engines import ENGINES, choose_engine  # noqa: E402
from .graph import as_csr, batch_graphs, build_graph, to_networkx, to_scipy  # noqa: E402
from .model import (  # noqa: E402
    DiffuserConfig,
    DiffuserEncoder,
    DiffuserForCausalLM,
    DiffuserForMatching,
    DiffuserForSequenceClassification,
)
from .patterns import PatternSpec, official_pattern, pattern_edges  # noqa: E402
from .reach import Condition, ReachStats, khop_receptive_field, reach_stats, ua_conditions  # noqa: E402
from .reference import (  # noqa: E402
    dense_attention_matrix,
    dense_diffusion_attention,
    dense_mask,
    diffusion_operator,
)
from .spectral import (  # noqa: E402
    SpectralStats,
    complete_graph_stats,
    diffused_spectrum,
    diffusion_eigenvalue_map,
    eigenvalues,
    spectral_stats,
)

__version__ = "0.3.0"

__all__ = [
    "PatternSpec", "pattern_edges", "official_pattern",
    "build_graph", "batch_graphs", "to_scipy", "to_networkx", "as_csr",
    "PackedBatch", "Padding", "ENGINES", "choose_engine",
    "Diffusion", "register_kernel", "kernels",
    "diffusion_attention", "edge_attention", "full_attention", "DiffuserAttention",
    "DiffuserConfig", "DiffuserEncoder", "DiffuserForSequenceClassification",
    "DiffuserForMatching", "DiffuserForCausalLM",
    "dense_mask", "dense_attention_matrix", "diffusion_operator", "dense_diffusion_attention",
    "SpectralStats", "spectral_stats", "complete_graph_stats", "eigenvalues",
    "diffusion_eigenvalue_map", "diffused_spectrum",
    "ReachStats", "reach_stats", "Condition", "ua_conditions", "khop_receptive_field",
]
