"""The DGL engine: attention as message passing on the batch's graph (the reference engine).

Scores live on edges, ``s(u -> v) = q_v . k_u / sqrt(D)`` (``u_dot_v``); ``edge_softmax``
normalises them over each query's incoming edges, so ``A`` is row-stochastic in query-major form;
one hop is ``u_mul_e_sum``. Any pattern works. DGL's PyPI wheel has CPU kernels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dgl
import torch

from .packed import PackedLayout


def edge_attention(g: dgl.DGLGraph, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Row-stochastic edge attention ``A: (E, H)`` from ``q, k: (N, H, D)`` on graph ``g``."""
    scores = dgl.ops.u_dot_v(g, k, q) / math.sqrt(q.shape[-1])  # (E, H, 1)
    return dgl.ops.edge_softmax(g, scores).squeeze(-1)


@dataclass(frozen=True)
class DGLPlan(PackedLayout):
    """The batch's DGL graph on the device it runs on."""

    graph: dgl.DGLGraph
    name: str = "dgl"
    edge_order: bool = True

    @classmethod
    def for_graph(cls, graph: dgl.DGLGraph, device: torch.device) -> DGLPlan:
        if device.type != "cpu":
            raise ValueError(f"engine 'dgl' runs on the CPU only (the DGL wheel on PyPI has no "
                             f"{device.type} kernels); on {device} use engine 'auto', 'block' "
                             f"or 'gather'")
        return cls(graph.to(device))

    def attention(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (edge_attention(self.graph, q, k),)

    def propagate(self, attention: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor:
        return dgl.ops.u_mul_e_sum(self.graph, z, attention[0].unsqueeze(-1))

    def edge_attention(self, attention: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return attention[0]
