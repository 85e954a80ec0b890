"""Backward that recomputes the one-hop attention ``A`` but keeps the diffusion's hop inputs.

Full activation checkpointing (``torch.utils.checkpoint``) would run the whole forward again in
backward: the scores, the softmax and the K hops. The hops are most of that work (five hops
against one score product for K = 5), and what they keep for backward, their inputs
``Z_0 .. Z_{K-1}``, is ``K`` copies of ``v``, while ``A`` holds as many values as there are
edges. :func:`recomputed_attention` keeps the hop inputs and drops ``A``: the series is built
on ``A`` entering through :class:`_GradientTap`\\ s (the graph then does not hold it), and
every tensor the series saves from ``A``'s storage is replaced by where it lies there
(:class:`_AttentionSlots`); backward recomputes ``A`` from ``q`` and ``k`` (replaying its
dropout) and reads those tensors from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable


class _GradientTap(torch.autograd.Function):
    """``x`` unchanged, its gradient appended to ``tap`` in backward: a point of a graph whose
    gradient is wanted without the graph keeping ``x``, as a leaf's ``AccumulateGrad`` would.
    ``anchor`` (a scalar that requires grad) connects it to the graph and gets zero."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, x: torch.Tensor,
                tap: list[torch.Tensor]) -> torch.Tensor:
        ctx.tap = tap
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        ctx.tap.append(grad)
        return grad.new_zeros(()), None, None


def _storage(x: torch.Tensor) -> tuple[torch.device, int]:
    return x.device, x.untyped_storage().data_ptr()


class _AttentionSlots:
    """Saved-tensor hooks: a tensor saved from the storage of a part of the attention is kept
    as its place in that storage, and :meth:`unpack` reads it from :attr:`values`, the
    recomputed parts (laid out as the originals: the same code made them). :attr:`kept`: the
    storages of the tensors saved as they are."""

    def __init__(self, attention: tuple[torch.Tensor, ...]) -> None:
        # empty parts (no global tokens) share no memory with anything and are not replaced
        self.storages = {_storage(part): (i, part.dtype)
                         for i, part in enumerate(attention) if part.numel()}
        self.values: tuple[torch.Tensor, ...] = ()
        self.kept: set[tuple[torch.device, int]] = set()

    def pack(self, x: torch.Tensor) -> Any:
        found = self.storages.get(_storage(x)) if x.numel() else None
        if found is None or found[1] != x.dtype:
            self.kept.add(_storage(x))
            return x
        return found[0], x.shape, x.stride(), x.storage_offset()

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        index, shape, stride, offset = packed
        return self.values[index].as_strided(shape, stride, offset)


class _TappedSeries:
    """``series(A, v, hop_weights)`` on a graph of its own, ``A`` and ``v`` entering through
    taps, so that :meth:`grads` hands back their gradients (and ``hop_weights``'s) while the
    graph holds neither; with ``slots`` it keeps no tensor of ``A``'s storage either, and the
    output's memory is freed once read (:meth:`release_output`)."""

    def __init__(self, series: Callable[..., torch.Tensor], attention: tuple[torch.Tensor, ...],
                 v: torch.Tensor, hop_weights: torch.Tensor | None,
                 slots: _AttentionSlots | None = None) -> None:
        self.anchor = v.new_zeros((), requires_grad=True)
        self.taps: list[list[torch.Tensor]] = [[] for _ in range(len(attention) + 1)]
        self.hop_weights = (None if hop_weights is None
                            else hop_weights.detach().requires_grad_(hop_weights.requires_grad))
        self.slots = slots
        if slots is not None:  # v is the caller's: never released with the output
            slots.kept.add(_storage(v))
        hooks = (contextlib.nullcontext() if slots is None
                 else torch.autograd.graph.saved_tensors_hooks(slots.pack, slots.unpack))
        with torch.enable_grad(), hooks:
            *tapped, v = (_GradientTap.apply(self.anchor, x.detach(), tap)
                          for x, tap in zip((*attention, v), self.taps, strict=True))
            self.out = series(tuple(tapped), v, self.hop_weights)

    def release_output(self) -> None:
        """Free the output's memory (its values were read), unless the graph saved it: only its
        shape matters to :meth:`grads`."""
        assert self.slots is not None
        if _storage(self.out) not in self.slots.kept:
            self.out.untyped_storage().resize_(0)

    def grads(self, grad: torch.Tensor, attention: tuple[torch.Tensor, ...]
              ) -> tuple[list[torch.Tensor | None], torch.Tensor | None, torch.Tensor | None]:
        """From the output's ``grad``: the gradient of each attention part, of ``v`` and of
        ``hop_weights`` (None where none flowed or none is wanted). ``attention``: the
        recomputed parts. Frees the graph."""
        if self.slots is not None:
            self.slots.values = tuple(part.detach() for part in attention)
        wanted = [x for x in (self.hop_weights,) if x is not None and x.requires_grad]
        found = torch.autograd.grad(self.out, [self.anchor, *wanted], grad, allow_unused=True)
        grads = [tap[0] if tap else None for tap in self.taps]
        return grads[:-1], grads[-1], found[1] if wanted else None


@dataclass
class _Chunk:
    """One chunk of heads: which, the random state its forward started from, and its series'
    graph (None once used, or when the hops were not kept)."""

    heads: slice
    rng: tuple[torch.Tensor, torch.Tensor | None]
    graph: _TappedSeries | None


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda"
                                   else None)


class _RecomputedAttention(torch.autograd.Function):
    """See :func:`recomputed_attention`. Saves ``q``, ``k`` and ``v`` (a chunk's series is
    built again on its heads of ``v``)."""

    @staticmethod
    def forward(ctx: Any, attend: Callable[..., tuple[torch.Tensor, ...]],
                series: Callable[..., torch.Tensor], heads: int, keep_hops: bool,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                hop_weights: torch.Tensor | None) -> torch.Tensor:
        out = v.new_empty(v.shape)
        ctx.chunks = []
        for first in range(0, v.shape[1], heads):
            chunk = _Chunk(slice(first, min(first + heads, v.shape[1])), _rng_state(q.device),
                           None)
            attention = attend(q[:, chunk.heads], k[:, chunk.heads])
            values, weights = v[:, chunk.heads], _rows(hop_weights, chunk.heads)
            if keep_hops:
                chunk.graph = _TappedSeries(series, attention, values, weights,
                                            _AttentionSlots(attention))
                out[:, chunk.heads] = chunk.graph.out
                chunk.graph.release_output()
            else:
                out[:, chunk.heads] = series(attention, values, weights)
            ctx.chunks.append(chunk)
        ctx.attend, ctx.series, ctx.keep_hops = attend, series, keep_hops
        ctx.save_for_backward(q, k, hop_weights, v)
        return out

    @staticmethod
    @once_differentiable  # its gradients are computed without a graph of their own
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, hop_weights, v = ctx.saved_tensors
        grads: list[list[torch.Tensor | None]] = [[], [], [], []]  # q, k, v, hop_weights
        for chunk in ctx.chunks:
            graph, chunk.graph = chunk.graph, None
            cpu_state, device_state = chunk.rng
            with torch.enable_grad(), torch.random.fork_rng(
                    devices=[q.device] if device_state is not None else []):
                torch.set_rng_state(cpu_state)
                if device_state is not None:
                    torch.cuda.set_rng_state(device_state, q.device)
                q_, k_ = (x[:, chunk.heads].detach().requires_grad_(x.requires_grad)
                          for x in (q, k))
                attention = ctx.attend(q_, k_)
                if graph is None:  # hops not kept, or a second backward: the same dropout
                    graph = _TappedSeries(ctx.series, attention, v[:, chunk.heads],
                                          _rows(hop_weights, chunk.heads))
            attention_grads, grad_v, grad_weights = graph.grads(grad[:, chunk.heads], attention)
            reached = [(part, g) for part, g in zip(attention, attention_grads, strict=True)
                       if g is not None]
            sources = [x for x in (q_, k_) if x.requires_grad]
            found = iter(torch.autograd.grad([part for part, _ in reached], sources,
                                             [g for _, g in reached], allow_unused=True)
                         if reached and sources else [None] * len(sources))
            for into, value in zip(grads, (
                    *(next(found) if x.requires_grad else None for x in (q_, k_)),
                    grad_v if ctx.needs_input_grad[6] else None,
                    grad_weights), strict=True):
                into.append(value)
            # this chunk's attention, graph and gradients are not kept while the next one runs
            del graph, attention, attention_grads, grad_v, reached, found, q_, k_
        spans = [chunk.heads for chunk in ctx.chunks]
        return (None, None, None, None,
                *(_joined(parts, like, spans, dim) for parts, like, dim in zip(
                    grads, (q, k, grad, hop_weights), (1, 1, 1, 0), strict=True)))


def _rows(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if x is None else x[rows]


def _joined(parts: list[torch.Tensor | None], like: torch.Tensor | None,
            spans: list[slice], dim: int) -> torch.Tensor | None:
    """The chunks' gradients of one input, side by side along ``dim`` (zeros for a chunk that
    none reached); None where none reached any."""
    if like is None or all(part is None for part in parts):
        return None
    return torch.cat([torch.zeros_like(like.narrow(dim, span.start, span.stop - span.start))
                      if part is None else part for part, span in zip(parts, spans, strict=True)],
                     dim=dim)


def recomputed_attention(attend: Callable[..., tuple[torch.Tensor, ...]],
                         series: Callable[..., torch.Tensor], heads: int, keep_hops: bool,
                         q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         hop_weights: torch.Tensor | None) -> torch.Tensor:
    """``series(attend(q, k), v, hop_weights)`` computed ``heads`` heads at a time,
    differentiable in ``q``, ``k``, ``v`` and ``hop_weights``, without keeping the attention
    for backward: backward runs ``attend`` again, chunk by chunk, with the random state of the
    forward (its dropout draws the same masks). With ``keep_hops`` it keeps what ``series``
    saves besides the attention (the hops' inputs); without, it keeps only ``q``, ``k`` and
    ``v`` and runs the series again too (the same dropout).

    ``q, k: (N, H, D)``, ``v: (N, H, Dv)``, ``hop_weights: (H, K + 1)`` or None.
    ``attend(q, k)`` returns the attention as a tuple of tensors (the plan's parts), made by
    the same code in the same layout on every call; ``series(attention, v, hop_weights)`` the
    output ``(N, h, Dv)`` of the ``h`` heads of ``v``. A second backward through the same graph
    (``retain_graph=True``) runs the series again; the gradients are not differentiable
    themselves (``create_graph`` raises when differentiated).
    """
    return _RecomputedAttention.apply(attend, series, heads, keep_hops, q, k, v, hop_weights)
