"""The gather engine: edge attention in pure torch, for any pattern on any device.

Per edge ``u -> v`` the score is ``q_v . k_u / sqrt(D)`` (a gather of both rows); the softmax
over each query's keys subtracts the per-query maximum (``scatter_reduce``) and divides by the
per-query sum (``index_add``); one hop gathers ``z_u`` and adds ``A_uv z_u`` into row v. It holds
``(E, H, D)`` temporaries, so it is the engine for devices DGL cannot use, not for speed on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dgl
import torch

from .packed import PackedLayout
from .products import product


@dataclass(frozen=True)
class GatherPlan(PackedLayout):
    """The batch graph's edges as index tensors on the device."""

    src: torch.Tensor  # (E,) key of each edge
    dst: torch.Tensor  # (E,) query of each edge
    num_nodes: int
    name: str = "gather"
    edge_order: bool = True

    @classmethod
    def for_graph(cls, graph: dgl.DGLGraph, device: torch.device) -> GatherPlan:
        src, dst = graph.edges()
        return cls(src.to(device), dst.to(device), graph.num_nodes())

    def attention(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores = (q[self.dst] * k[self.src]).sum(-1) / math.sqrt(q.shape[-1])  # (E, H)
        index = self.dst[:, None].expand_as(scores)
        # Softmax is shift invariant: the per-query maximum only keeps exp() in range, so it
        # carries no gradient.
        top = scores.new_full((self.num_nodes, scores.shape[1]), -math.inf).scatter_reduce(
            0, index, scores.detach(), "amax")
        weights = torch.exp(scores - top[self.dst])
        total = scores.new_zeros(self.num_nodes, scores.shape[1]).index_add(0, self.dst, weights)
        return (weights / total[self.dst],)

    def propagate(self, attention: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor:
        # a product that keeps A and z for backward, not its (E, H, Dv) messages
        return product(_HOP, self, attention[0], z)

    def edge_attention(self, attention: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return attention[0]


def _hop(plan: GatherPlan, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``A z``: ``a: (E, H)``, ``z: (N, H, Dv)``."""
    messages = a.unsqueeze(-1) * z[plan.src]  # (E, H, Dv)
    return z.new_zeros(plan.num_nodes, *z.shape[1:]).index_add(0, plan.dst, messages)


def _hop_grad_a(plan: GatherPlan, grad: torch.Tensor, a: torch.Tensor,
                z: torch.Tensor) -> torch.Tensor:
    return (grad[plan.dst] * z[plan.src]).sum(-1)


def _hop_grad_z(plan: GatherPlan, grad: torch.Tensor, a: torch.Tensor,
                z: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(z).index_add(0, plan.src, a.unsqueeze(-1) * grad[plan.dst])


_HOP = (_hop, _hop_grad_a, _hop_grad_z)
