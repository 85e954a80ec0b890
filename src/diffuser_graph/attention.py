"""Sparse attention with multi-hop attention diffusion, on any engine.

One-hop attention ``A`` lives on the pattern's edges: ``s(u -> v) = q_v . k_u / sqrt(D)``, and
``A`` is the softmax of the scores over each query's keys, so it is row-stochastic in
query-major form. Diffusion then applies ``sum_k theta_k A^k`` to the values (a
:class:`~diffuser_graph.diffusion.Diffusion`: PPR ``Z(k+1) = (1 - alpha) A Z(k) + alpha V``, a heat
kernel, or any registered kernel). How ``A`` is computed and applied is the engine's business
(:mod:`diffuser_graph.engines`); the series is written once, here.

NaN or infinite values in ``q``, ``k`` or ``v`` are not checked (that would cost a pass over the
tensors on every call): they propagate to every token that can reach them within ``hops``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batch import PackedBatch, Padding, as_batch
from .checks import as_int, check_flag, check_probability, check_qkv
from .diffusion import LEARNED, Diffusion, resolve_diffusion
from .engines import Plan
from .engines.dgl import edge_attention
from .patterns import PatternSpec
from .recompute import recomputed_attention

ATTENTION_KINDS = ("diffuser", "sparse", "full")
LOW_PRECISION = (torch.float16, torch.bfloat16)

__all__ = ["diffusion_attention", "full_attention", "edge_attention", "DiffuserAttention"]


HOP_DROPOUT_PLACES = ("before_mix", "after_mix")


def check_hop_dropout_at(place: str, learned: bool) -> bool:
    """Whether hop dropout falls after the mix; refuses unknown places and ``after_mix`` with
    learned hop weights (their series is a sum of powers ``A^j v``, with no mix to follow)."""
    if place not in HOP_DROPOUT_PLACES:
        raise ValueError(f"hop_dropout_at must be one of {HOP_DROPOUT_PLACES}, got {place!r}")
    if learned and place == "after_mix":
        raise ValueError("hop_dropout_at='after_mix' needs a fixed kernel: learned hop weights "
                         "sum the powers A^j v, and hop dropout falls on each of them")
    return place == "after_mix"


def check_recompute(recompute_heads: int, recompute_hops: Any) -> bool:
    """``recompute_hops`` as a bool; it needs chunks of heads to recompute."""
    recompute_hops = check_flag("recompute_hops", recompute_hops)
    if recompute_hops and not recompute_heads:
        raise ValueError("recompute_hops=True needs recompute_heads > 0 (the heads computed, "
                         "and recomputed, at a time)")
    return recompute_hops


def _attend(plan: Plan, q: torch.Tensor, k: torch.Tensor, attn_dropout: float,
            training: bool) -> tuple[torch.Tensor, ...]:
    """The plan's one-hop attention ``A`` from ``q, k``, with attention dropout."""
    return tuple(F.dropout(part, attn_dropout, training) for part in plan.attention(q, k))


def _series(plan: Plan, attention: tuple[torch.Tensor, ...], v: torch.Tensor,
            hop_weights: torch.Tensor | None, diffusion: Diffusion, hop_dropout: float,
            after_mix: bool) -> torch.Tensor:
    """The diffusion series of ``A`` (the plan's :meth:`attention`) on ``v: (N, H, Dv)``;
    returns ``(N, H, Dv)``."""
    if hop_weights is None:
        return plan.diffuse(attention, v, diffusion, hop_dropout, after_mix)
    # per-head weights: keep every power A^j v and mix them head by head
    heads = v.shape[1]
    power = z = plan.enter(v)
    out = hop_weights[:, 0, None] * plan.leave(z, heads)
    for j in range(1, diffusion.hops + 1):
        power = F.dropout(plan.propagate(attention, power), hop_dropout, hop_dropout > 0)
        out = out + hop_weights[:, j, None] * plan.leave(power, heads)
    return out


def _by_heads(plan: Plan, attend: Callable[..., tuple[torch.Tensor, ...]],
              series: Callable[..., torch.Tensor], return_attention: bool, q: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, hop_weights: torch.Tensor | None,
              recompute_heads: int, recompute_hops: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``series(attend(q, k), v, hop_weights)`` (and the plan's edge
    attention with ``return_attention``) on all heads at once, or with ``recompute_heads``,
    that many heads at a time, each chunk's attention (and with ``recompute_hops`` its series)
    recomputed in backward (:func:`.recompute.recomputed_attention`)."""
    def whole(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              hop_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention = attend(q, k)
        return (series(attention, v, hop_weights),
                plan.edge_attention(attention) if return_attention else None)

    if not recompute_heads:
        return whole(q, k, v, hop_weights)
    if not return_attention and torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, hop_weights)):
        return recomputed_attention(attend, series, recompute_heads, not recompute_hops,
                                    q, k, v, hop_weights), None
    # nothing to recompute (no gradient wanted, or the returned attention needs its graph):
    # the chunks only bound the memory in use at a time
    chunks = [x.split(recompute_heads, dim=1) for x in (q, k, v)]
    weights = ([None] * len(chunks[0]) if hop_weights is None
               else hop_weights.split(recompute_heads))
    results = [whole(*inputs) for inputs in zip(*chunks, weights, strict=True)]
    outs, attention = zip(*results, strict=True)
    return (torch.cat(outs, dim=1),
            torch.cat(attention, dim=1) if return_attention else None)


def diffusion_attention(
    batch: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    diffusion: Diffusion | None = None,
    *,
    alpha: float | None = None,
    hops: int | None = None,
    kernel: str | None = None,
    t: float | None = None,
    attn_dropout: float = 0.0,
    hop_dropout: float = 0.0,
    training: bool = False,
    return_attention: bool = False,
    engine: str | None = None,
    hop_weights: torch.Tensor | None = None,
    hop_dropout_at: str = "before_mix",
    recompute_heads: int = 0,
    recompute_hops: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-hop diffused attention on a :class:`PackedBatch` or any (batched) DGL graph.

    Args:
        batch: a :class:`PackedBatch` (it carries its engine plan) or a DGL graph with N nodes
            (edge ``u -> v`` lets query v attend to key u).
        q, k: ``(N, H, D)``; v: ``(N, H, Dv)``; one dtype and device. float16/bfloat16 inputs
            are computed in float32 and the output cast back.
        diffusion: a :class:`Diffusion`, or leave it out and give ``alpha`` (PPR teleport
            probability in [0, 1]), ``hops`` (K >= 1), ``kernel`` (``"ppr"``, ``"heat"`` or a
            registered one) and ``t`` (heat time > 0); unset ones take the defaults
            (PPR, alpha 0.1, K = 5).
        attn_dropout: dropout on the one-hop attention; hop_dropout: on ``A z`` at every hop
            (both only when ``training``).
        hop_dropout_at: ``"before_mix"`` (on ``A z``, before ``theta_k v`` is added) or
            ``"after_mix"`` (on the mixed iterate, as the authors' code does; fixed kernels).
        return_attention: also return the one-hop attention ``(E, H)`` (before dropout) in the
            graph's edge order.
        engine: run on this engine instead of the batch's (``"auto"``, ``"dgl"``, ``"block"``,
            ``"gather"``); a bare graph defaults to ``auto`` (DGL on the CPU).
        hop_weights: ``(H, K + 1)`` weights ``theta_k`` per head instead of the kernel's (the
            ``"learned"`` kernel's; differentiable): ``sum_k theta[h, k] A^k v`` per head.
        recompute_heads: 0 keeps the attention and every hop's input for backward; ``h > 0``
            computes ``h`` heads at a time, keeps their hops' inputs and recomputes their
            attention (scores and softmax, not the hops) in backward: the same values and
            gradients, without the attention's ``E x H`` values between forward and backward
            and with one chunk's intermediates alive at a time, for one more score product.
            Dropout masks are drawn chunk by chunk (other draws than with 0, the same
            distribution) and replayed exactly in backward. With ``return_attention`` the
            chunks keep their attention (the returned one needs it). The gradients are not
            differentiable again (``create_graph=True`` raises when they are differentiated).
        recompute_hops: with ``recompute_heads``, keep only ``q``, ``k`` and ``v`` and run
            each chunk's hops again in backward too (full activation checkpointing): the
            least memory (no K copies of the values), for K more hops.

    NaN or infinite inputs are not checked: they reach every token within ``hops`` of them.

    Returns:
        ``(N, H, Dv)``, or ``((N, H, Dv), (E, H))`` with ``return_attention``.
    """
    batch = as_batch(batch, engine)
    diffusion = resolve_diffusion(diffusion, kernel=kernel, alpha=alpha, hops=hops, t=t)
    check_qkv(q, k, v, batch.num_tokens, batch.device)
    attn_dropout = check_probability("attn_dropout", attn_dropout)
    hop_dropout = check_probability("hop_dropout", hop_dropout)
    plan = batch.edge_plan if return_attention else batch.plan
    after_mix = check_hop_dropout_at(hop_dropout_at, hop_weights is not None)
    recompute_heads = as_int("recompute_heads", recompute_heads, 0)
    recompute_hops = check_recompute(recompute_heads, recompute_hops)
    if hop_weights is not None:
        expected = (v.shape[1], diffusion.hops + 1)
        if (not isinstance(hop_weights, torch.Tensor) or tuple(hop_weights.shape) != expected
                or not hop_weights.is_floating_point() or hop_weights.device != v.device):
            raise ValueError(f"hop_weights must be a float tensor of shape (H, K + 1) = "
                             f"{expected} on {v.device}, got "
                             f"{getattr(hop_weights, 'shape', type(hop_weights).__name__)}")

    def attend(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _attend(plan, q, k, attn_dropout, training)

    def series(attention: tuple[torch.Tensor, ...], v: torch.Tensor,
               hop_weights: torch.Tensor | None) -> torch.Tensor:
        return _series(plan, attention, v, hop_weights, diffusion,
                       hop_dropout if training else 0.0, after_mix)

    if q.dtype in LOW_PRECISION:  # softmax and K hops of sums need float32's range and accuracy
        with torch.autocast(q.device.type, enabled=False):
            out, attn = _by_heads(plan, attend, series, return_attention, q.float(), k.float(),
                                  v.float(), None if hop_weights is None else hop_weights.float(),
                                  recompute_heads, recompute_hops)
        out = out.to(q.dtype)
    else:
        out, attn = _by_heads(plan, attend, series, return_attention, q, k, v, hop_weights,
                              recompute_heads, recompute_hops)
    if return_attention:
        assert attn is not None
        return out, attn
    return out


def full_attention(
    padding: Padding | PackedBatch | Sequence[int], q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, *, attn_dropout: float = 0.0, training: bool = False, causal: bool = False,
) -> torch.Tensor:
    """Dense softmax attention within each sequence (the Transformer baseline).

    ``q, k, v: (N, H, D)`` are the packed tokens of the sequences of ``padding`` (a
    :class:`Padding`, a :class:`PackedBatch` or a list of lengths). Each sequence is padded and
    attended with ``scaled_dot_product_attention`` on ``(B, H, L, D)`` tensors under a
    key-padding mask (and, with ``causal``, only to keys at or before the query), then packed
    back to ``(N, H, D)``. Sequences of one length need no mask, so SDPA runs its fused kernel
    (flash attention) on them.
    """
    if isinstance(padding, PackedBatch):
        padding = padding.padding
    elif not isinstance(padding, Padding):
        padding = Padding.from_lengths(padding, q.device)
    if q.shape[0] != padding.num_tokens:
        raise ValueError(f"q, k, v have N={q.shape[0]} rows but lengths sum to "
                         f"{padding.num_tokens}")
    attn_dropout = check_probability("attn_dropout", attn_dropout)
    key_mask: torch.Tensor | None = None
    if min(padding.lengths) < padding.padded_shape[1]:  # a mask takes SDPA's unfused math path
        key_mask = padding.mask.to(q.device)[:, None, None, :]  # (B, 1, 1, L)
        if causal:
            width = key_mask.shape[-1]
            key_mask = key_mask & torch.ones(width, width, dtype=torch.bool,
                                             device=q.device).tril()
    query, key, value = (padding.unpack(x).transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask,
                                         dropout_p=attn_dropout if training else 0.0,
                                         is_causal=causal and key_mask is None)
    return padding.pack(out.transpose(1, 2))


class DiffuserAttention(nn.Module):
    """Multi-head attention on a token graph: q/k/v projections, attention, output projection.

    ``attention`` picks the function with the same parameters: ``"diffuser"`` (multi-hop
    diffusion with ``diffusion``, :func:`diffusion_attention`), ``"sparse"`` (one hop on the same
    pattern) or ``"full"`` (dense softmax over each whole sequence, :func:`full_attention`; the
    pattern's edges are not used, and it is causal when the pattern is).

    ``pattern``: the pattern this layer belongs to; a :class:`PackedBatch` of another pattern is
    refused. The engine is the batch's (chosen once per batch by whoever builds it).
    ``recompute_heads``, ``recompute_hops``: see :func:`diffusion_attention` (graph attention
    only: full attention's fused kernel keeps no weights already).

    ``forward(batch, x)`` takes a :class:`PackedBatch` (or a DGL graph) and the packed tokens
    ``x: (N, hidden)`` -> ``(N, hidden)``, or the padded ``x: (B, L, hidden)`` ->
    ``(B, L, hidden)`` with zeros at padding.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        diffusion: Diffusion | None = None,
        alpha: float | None = None,
        hops: int | None = None,
        kernel: str | None = None,
        t: float | None = None,
        attn_dropout: float = 0.0,
        hop_dropout: float = 0.0,
        hop_dropout_at: str = "before_mix",
        bias: bool = True,
        attention: str = "diffuser",
        pattern: PatternSpec | None = None,
        recompute_heads: int = 0,
        recompute_hops: bool = False,
    ) -> None:
        super().__init__()
        hidden_size, num_heads = as_int("hidden_size", hidden_size, 1), as_int("num_heads",
                                                                               num_heads, 1)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if pattern is not None and not isinstance(pattern, PatternSpec):
            raise ValueError(f"pattern must be a PatternSpec, got {type(pattern).__name__}")
        diffusion = resolve_diffusion(diffusion, kernel=kernel, alpha=alpha, hops=hops, t=t)
        self.diffusion = Diffusion.one_hop() if attention == "sparse" else diffusion
        self.attention, self.pattern = attention, pattern
        self.attn_dropout = check_probability("attn_dropout", attn_dropout)
        self.hop_dropout = check_probability("hop_dropout", hop_dropout)
        check_hop_dropout_at(hop_dropout_at, self.diffusion.kernel == LEARNED)
        self.hop_dropout_at = hop_dropout_at
        self.recompute_heads = as_int("recompute_heads", recompute_heads, 0)
        self.recompute_hops = check_recompute(self.recompute_heads, recompute_hops)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.hop_logits = None
        if attention == "diffuser" and self.diffusion.kernel == LEARNED:
            # Weights softmax(logits + log start): zero logits give the starting (PPR) weights
            # exactly, whatever dtype the layer is later cast to.
            start = torch.tensor(self.diffusion.coefficients, dtype=torch.float64)
            self.register_buffer("hop_prior", start.clamp(min=1e-30).log(), persistent=False)
            self.hop_logits = nn.Parameter(torch.zeros(num_heads, self.diffusion.hops + 1))
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.output = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, batch: Any, x: torch.Tensor, return_attention: bool = False) -> Any:
        batch = as_batch(batch)
        if self.pattern is not None and batch.spec is not None and batch.spec != self.pattern:
            raise ValueError(f"the batch was built for pattern {batch.spec!r} but this layer's "
                             f"pattern is {self.pattern!r}")
        padded = isinstance(x, torch.Tensor) and x.dim() == 3
        if padded:
            x = batch.pack(x)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be (N, {self.hidden_size}) or (B, L, {self.hidden_size}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        heads = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(heads) for proj in (self.query, self.key, self.value))
        attn = None
        if self.attention == "full":
            if return_attention:
                raise ValueError("return_attention is only available for graph attention "
                                 "(attention='diffuser' or 'sparse')")
            if x.shape[0] != batch.num_tokens:
                raise ValueError(f"x has N={x.shape[0]} rows but the batch has "
                                 f"{batch.num_tokens} tokens")
            spec = self.pattern or batch.spec
            out = full_attention(batch, q, k, v, attn_dropout=self.attn_dropout,
                                 training=self.training, causal=spec is not None and spec.causal)
        else:
            result = diffusion_attention(
                batch, q, k, v, self.diffusion, attn_dropout=self.attn_dropout,
                hop_dropout=self.hop_dropout, training=self.training,
                return_attention=return_attention, hop_weights=self.hop_weights(),
                hop_dropout_at=self.hop_dropout_at, recompute_heads=self.recompute_heads,
                recompute_hops=self.recompute_hops)
            out, attn = result if isinstance(result, tuple) else (result, None)
        out = self.output(out.reshape(x.shape[0], self.hidden_size))
        if padded:
            out = batch.unpack(out)
        return (out, attn) if return_attention else out

    def hop_weights(self) -> torch.Tensor | None:
        """The learned kernel's ``(H, K + 1)`` hop weights (rows sum to 1); None for the others."""
        if self.hop_logits is None:
            return None
        return torch.softmax(self.hop_logits + self.hop_prior, dim=-1).to(self.hop_logits.dtype)

    def extra_repr(self) -> str:
        d = self.diffusion
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"attention={self.attention!r}, kernel={d.kernel!r}, alpha={d.alpha}, "
                f"hops={d.hops}, t={d.t}")
