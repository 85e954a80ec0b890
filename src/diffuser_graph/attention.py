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
from typing import Optional, Tuple, Union

import dgl
import torch
import torch.nn.functional as F
from torch import nn

from . import block_engine
from .diffusion import check_diffusion_args, check_dropout, check_qkv, diffusion_series
from .graph import PackedBatch, Padding
from .patterns import PatternSpec

ATTENTION_KINDS = ("diffuser", "sparse", "full")
ENGINES = ("dgl", "block", "auto")


def _check_qkv(g: dgl.DGLGraph, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_qkv(q, k, v, g.num_nodes(), "the graph has")
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
    edge_weight = attn.unsqueeze(-1)  # (E, H, 1) broadcasts over D

    def propagate(z: torch.Tensor) -> torch.Tensor:
        return F.dropout(dgl.ops.u_mul_e_sum(g, z, edge_weight), hop_dropout, training)

    return diffusion_series(propagate, v, alpha=alpha, hops=hops, kernel=kernel, t=t)


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
    check_dropout("attn_dropout", attn_dropout)
    check_dropout("hop_dropout", hop_dropout)
    attn = edge_attention(g, q, k)
    out = diffuse(g, F.dropout(attn, attn_dropout, training), v, alpha=alpha, hops=hops,
                  kernel=kernel, t=t, hop_dropout=hop_dropout, training=training)
    return (out, attn) if return_attention else out


def full_attention(
    lengths, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_dropout: float = 0.0,
    training: bool = False, causal: bool = False,
) -> torch.Tensor:
    """Dense softmax attention within each sequence (the Transformer baseline).

    ``q, k, v: (N, H, D)`` are the packed tokens of sequences of ``lengths``; each sequence is
    padded, attended with ``scaled_dot_product_attention`` under a key-padding mask (and, with
    ``causal``, only to keys at or before the query), and packed back to ``(N, H, D)``.
    """
    padding = Padding.from_lengths(lengths)
    if q.shape[0] != padding.flat_index.numel():
        raise ValueError(f"q, k, v have N={q.shape[0]} rows but lengths sum to "
                         f"{padding.flat_index.numel()}")
    check_dropout("attn_dropout", attn_dropout)
    key_mask = padding.mask.to(q.device)[:, None, None, :]  # (B, 1, 1, L)
    if causal:
        width = key_mask.shape[-1]
        key_mask = key_mask & torch.ones(width, width, dtype=torch.bool, device=q.device).tril()
    heads = [padding.unpack(x).transpose(1, 2) for x in (q, k, v)]  # (B, H, L, D)
    out = F.scaled_dot_product_attention(*heads, attn_mask=key_mask,
                                         dropout_p=attn_dropout if training else 0.0)
    return padding.pack(out.transpose(1, 2))


class DiffuserAttention(nn.Module):
    """Multi-head attention on a token graph: q/k/v projections, attention, output projection.

    ``attention`` picks the function with the same parameters: ``"diffuser"`` (multi-hop
    diffusion, :func:`diffusion_attention`), ``"sparse"`` (one hop on the same pattern:
    ``hops=1, alpha=0``) or ``"full"`` (dense softmax over each whole sequence of the batched
    graph, :func:`full_attention`; the graph's edges are not used, and it is causal when
    ``pattern.causal`` is).

    ``engine`` picks how graph attention is computed: ``"dgl"`` (message passing on ``g``, any
    pattern), ``"block"`` (blocked dense matmuls, :mod:`diffuser_graph.block_engine`; needs
    ``pattern``, a 1-D window pattern, and ``g`` must be its batched graph) or ``"auto"`` (block
    when ``pattern`` allows it, else DGL). Both give the same function.

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
        engine: str = "dgl",
        pattern: Optional[PatternSpec] = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or hidden_size < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if attention == "sparse":
            alpha, hops = 0.0, 1
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if engine == "block" and (pattern is None or not block_engine.supports(pattern)):
            raise ValueError("engine='block' needs pattern=PatternSpec(kind='window', "
                             "dilation=1, causal=False)")
        self.block_capable = pattern is not None and block_engine.supports(pattern)
        self.attention, self.engine, self.pattern = attention, engine, pattern
        check_diffusion_args(alpha, hops, kernel, t)
        check_dropout("attn_dropout", attn_dropout)
        check_dropout("hop_dropout", hop_dropout)
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
                                       attn_dropout=self.attn_dropout, training=self.training,
                                       causal=self.pattern is not None and self.pattern.causal
                                       ), None
        elif not return_attention and self._use_block(lengths := g.batch_num_nodes().tolist()):
            _check_qkv(g, q, k, v)
            out, attn = block_engine.block_diffusion_attention(
                lengths, self.pattern, q, k, v, alpha=self.alpha,
                hops=self.hops, kernel=self.kernel, t=self.t, attn_dropout=self.attn_dropout,
                hop_dropout=self.hop_dropout, training=self.training), None
        else:
            result = diffusion_attention(
                g, q, k, v, alpha=self.alpha, hops=self.hops, kernel=self.kernel, t=self.t,
                attn_dropout=self.attn_dropout, hop_dropout=self.hop_dropout,
                training=self.training, return_attention=return_attention)
            out, attn = result if return_attention else (result, None)
        out = self.output(out.reshape(x.shape[0], self.hidden_size))
        return (out, attn) if return_attention else out

    def _use_block(self, lengths: list[int]) -> bool:
        if self.engine == "block":
            return True
        return (self.engine == "auto" and self.block_capable
                and block_engine.prefer_block(self.pattern, lengths))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"attention={self.attention!r}, engine={self.engine!r}, kernel={self.kernel!r}, "
                f"alpha={self.alpha}, "
                f"hops={self.hops}")
