"""Sparse attention with multi-hop attention diffusion, as DGL message passing.

Scores live on edges: ``s(u -> v) = q_v . k_u / sqrt(D)`` (``u_dot_v``), and ``A = edge_softmax(s)``
normalises over each query's keys, so ``A`` is row-stochastic in query-major form. Diffusion then
propagates values along the graph (``u_mul_e_sum``):

* ``kernel="ppr"``: ``Z0 = V``, ``Z(k+1) = (1 - alpha) A Z(k) + alpha V`` for ``hops`` steps, i.e.
  ``Z(K) = ((1-alpha)^K A^K + alpha sum_{i<K} (1-alpha)^i A^i) V`` (personalized PageRank).
* ``kernel="heat"``: ``Z = sum_{k=0..K} w_k A^k V`` with ``w_k`` proportional to
  ``e^{-t} t^k / k!``, renormalised to sum to 1.

Both operators have rows summing to 1. ``hops=1, alpha=0`` is plain one-hop sparse attention.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import dgl
import torch
import torch.nn.functional as F
from torch import nn

from .graph import PackedBatch, Padding

KERNELS = ("ppr", "heat")
ATTENTION_KINDS = ("diffuser", "sparse", "full")


def heat_weights(hops: int, t: float) -> list[float]:
    """Weights ``w_k ∝ e^{-t} t^k / k!`` for ``k = 0..hops``, renormalised to sum to 1."""
    raw = [math.exp(-t) * t**k / math.factorial(k) for k in range(hops + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def series_coefficients(alpha: float, hops: int, kernel: str, t: float) -> list[float]:
    """``theta_0..theta_K`` of the diffused operator ``sum_k theta_k A^k`` after ``hops`` = K steps.

    PPR: ``alpha (1-alpha)^k`` for ``k < K`` and ``(1-alpha)^K`` for ``k = K``; heat: the weights
    of :func:`heat_weights`. They sum to 1.
    """
    check_diffusion_args(alpha, hops, kernel, t)
    if kernel == "ppr":
        return [alpha * (1 - alpha) ** k for k in range(hops)] + [(1 - alpha) ** hops]
    return heat_weights(hops, t)


def check_diffusion_args(alpha: float, hops: int, kernel: str, t: float) -> None:
    """Raise ``ValueError`` naming the first diffusion argument outside its allowed range."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(hops, bool) or not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hops must be an int >= 1, got {hops!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not (isinstance(t, (int, float)) and t > 0.0 and math.isfinite(t)):
        raise ValueError(f"t (heat kernel time) must be a finite number > 0, got {t!r}")


def _check_dropout(name: str, p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")


def _check_qkv(g: dgl.DGLGraph, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a (N, H, D) tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (N, H, D), got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have the same N and H as q, got {tuple(v.shape)} vs "
                         f"{tuple(q.shape)}")
    if q.shape[0] != g.num_nodes():
        raise ValueError(f"q, k, v have N={q.shape[0]} rows but the graph has "
                         f"{g.num_nodes()} nodes")
    if g.device != q.device:
        raise ValueError(f"graph is on {g.device} but q, k, v are on {q.device}")


def edge_attention(g: dgl.DGLGraph, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Row-stochastic edge attention ``A: (E, H)`` from ``q, k: (N, H, D)`` on graph ``g``."""
    scores = dgl.ops.u_dot_v(g, k, q) / math.sqrt(q.shape[-1])  # (E, H, 1)
    return dgl.ops.edge_softmax(g, scores).squeeze(-1)


def diffuse(
    g: dgl.DGLGraph,
    attn: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float = 0.1,
    hops: int = 5,
    kernel: str = "ppr",
    t: float = 1.0,
    hop_dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Diffuse values ``v: (N, H, D)`` along edge attention ``attn: (E, H)`` for ``hops`` steps.

    Returns ``(N, H, D)``; see the module docstring for the PPR and heat series.
    """
    check_diffusion_args(alpha, hops, kernel, t)
    edge_weight = attn.unsqueeze(-1)  # (E, H, 1) broadcasts over D

    def propagate(z: torch.Tensor) -> torch.Tensor:
        return F.dropout(dgl.ops.u_mul_e_sum(g, z, edge_weight), hop_dropout, training)

    if kernel == "ppr":
        z = v
        for _ in range(hops):
            z = (1.0 - alpha) * propagate(z) + alpha * v
        return z
    weights = heat_weights(hops, t)
    z, out = v, weights[0] * v
    for weight in weights[1:]:
        z = propagate(z)
        out = out + weight * z
    return out


def diffusion_attention(
    g: dgl.DGLGraph,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float = 0.1,
    hops: int = 5,
    kernel: str = "ppr",
    t: float = 1.0,
    attn_dropout: float = 0.0,
    hop_dropout: float = 0.0,
    training: bool = False,
    return_attention: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Multi-hop diffused attention on any (batched) DGL graph.

    Args:
        g: graph with N nodes; edge ``u -> v`` lets query v attend to key u.
        q, k: ``(N, H, D)``; v: ``(N, H, Dv)``; one dtype and device.
        alpha: PPR teleport probability in [0, 1]. hops: K >= 1 propagation steps.
        kernel: ``"ppr"`` or ``"heat"`` (time ``t > 0``).
        attn_dropout: dropout on the edge attention; hop_dropout: on the values after each hop
            (both only when ``training``).
        return_attention: also return the edge attention ``(E, H)`` (before dropout).

    Returns:
        ``(N, H, Dv)``, or ``((N, H, Dv), (E, H))`` with ``return_attention``.
    """
    _check_qkv(g, q, k, v)
    check_diffusion_args(alpha, hops, kernel, t)
    _check_dropout("attn_dropout", attn_dropout)
    _check_dropout("hop_dropout", hop_dropout)
    attn = edge_attention(g, q, k)
    out = diffuse(g, F.dropout(attn, attn_dropout, training), v, alpha=alpha, hops=hops,
                  kernel=kernel, t=t, hop_dropout=hop_dropout, training=training)
    return (out, attn) if return_attention else out


def full_attention(
    lengths, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Dense softmax attention within each sequence (the Transformer baseline).

    ``q, k, v: (N, H, D)`` are the packed tokens of sequences of ``lengths``; each sequence is
    padded, attended with ``scaled_dot_product_attention`` under a key-padding mask, and packed
    back to ``(N, H, D)``.
    """
    padding = Padding.from_lengths(lengths)
    if q.shape[0] != padding.flat_index.numel():
        raise ValueError(f"q, k, v have N={q.shape[0]} rows but lengths sum to "
                         f"{padding.flat_index.numel()}")
    _check_dropout("attn_dropout", attn_dropout)
    key_mask = padding.mask.to(q.device)[:, None, None, :]  # (B, 1, 1, L)
    heads = [padding.unpack(x).transpose(1, 2) for x in (q, k, v)]  # (B, H, L, D)
    out = F.scaled_dot_product_attention(*heads, attn_mask=key_mask,
                                         dropout_p=attn_dropout if training else 0.0)
    return padding.pack(out.transpose(1, 2))


class DiffuserAttention(nn.Module):
    """Multi-head attention on a token graph: q/k/v projections, attention, output projection.

    ``attention`` picks the function with the same parameters: ``"diffuser"`` (multi-hop
    diffusion, :func:`diffusion_attention`), ``"sparse"`` (one hop on the same pattern:
    ``hops=1, alpha=0``) or ``"full"`` (dense softmax over each whole sequence of the batched
    graph, :func:`full_attention`; the graph's edges are not used).

    ``forward(g, x)`` takes node features ``x: (N, hidden)`` on graph ``g`` and returns
    ``(N, hidden)``; with a :class:`PackedBatch` instead of a graph it takes the padded
    ``x: (B, L, hidden)`` and returns ``(B, L, hidden)`` (zeros at padding).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        alpha: float = 0.1,
        hops: int = 5,
        kernel: str = "ppr",
        t: float = 1.0,
        attn_dropout: float = 0.0,
        hop_dropout: float = 0.0,
        bias: bool = True,
        attention: str = "diffuser",
    ) -> None:
        super().__init__()
        if num_heads < 1 or hidden_size < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if attention == "sparse":
            alpha, hops = 0.0, 1
        self.attention = attention
        check_diffusion_args(alpha, hops, kernel, t)
        _check_dropout("attn_dropout", attn_dropout)
        _check_dropout("hop_dropout", hop_dropout)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.alpha, self.hops, self.kernel, self.t = alpha, hops, kernel, t
        self.attn_dropout, self.hop_dropout = attn_dropout, hop_dropout
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.output = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, g: Union[dgl.DGLGraph, PackedBatch], x: torch.Tensor,
                return_attention: bool = False):
        if isinstance(g, PackedBatch):
            out = self.forward(g.graph, g.pack(x), return_attention)
            if return_attention:
                return g.unpack(out[0]), out[1]
            return g.unpack(out)
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be (N, {self.hidden_size}), got {tuple(x.shape)}")
        heads = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(heads) for proj in (self.query, self.key, self.value))
        if self.attention == "full":
            if return_attention:
                raise ValueError("return_attention is only available for graph attention "
                                 "(attention='diffuser' or 'sparse')")
            if x.shape[0] != g.num_nodes():
                raise ValueError(f"x has N={x.shape[0]} rows but the graph has "
                                 f"{g.num_nodes()} nodes")
            out, attn = full_attention(g.batch_num_nodes().tolist(), q, k, v,
                                       attn_dropout=self.attn_dropout,
                                       training=self.training), None
        else:
            result = diffusion_attention(
                g, q, k, v, alpha=self.alpha, hops=self.hops, kernel=self.kernel, t=self.t,
                attn_dropout=self.attn_dropout, hop_dropout=self.hop_dropout,
                training=self.training, return_attention=return_attention)
            out, attn = result if return_attention else (result, None)
        out = self.output(out.reshape(x.shape[0], self.hidden_size))
        return (out, attn) if return_attention else out

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"attention={self.attention!r}, kernel={self.kernel!r}, alpha={self.alpha}, "
                f"hops={self.hops}")
