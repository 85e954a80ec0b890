"""One softmax over several score tensors of the same rows, without concatenating them.

The block engine scores each query's keys in parts (the band, the global keys, the random keys),
each ``(..., W_i)``, and normalises them together. ``torch.softmax`` of their concatenation
would write the scores once more, keep the joint probabilities for backward and hand back
strided slices that the band products must copy to make contiguous. :func:`joint_softmax`
writes each part's probabilities into a tensor of its own, keeps only those for backward, and
adds each part's mask (an additive bias, ``-inf`` off the pattern) on the way.

:func:`packed_joint_softmax` takes the random keys' scores packed, one value per key
(:class:`~.gathered.GatherIndex`); on the CPU it runs in place in a compiled loop, row by row
(:func:`.native.joint_softmax_`), elsewhere it spreads them into a rectangle for
:func:`joint_softmax`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import native
from .gathered import GatherIndex


class _JointSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, biases: Sequence[torch.Tensor | None],
                *scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shifted = [s if bias is None else s + bias for s, bias in zip(scores, biases, strict=True)]
        top = torch.stack([s.amax(dim=-1) for s in shifted if s.shape[-1]]).amax(dim=0)[..., None]
        # the shift keeps exp() in range; it cancels in the ratio, so it carries no gradient
        probs = [(s.sub(top) if s is scores[i] else s.sub_(top)).exp_()
                 for i, s in enumerate(shifted)]
        total = sum(p.sum(dim=-1, keepdim=True) for p in probs)
        assert isinstance(total, torch.Tensor)
        inverse = total.reciprocal_()
        for p in probs:
            p.mul_(inverse)
        ctx.save_for_backward(*probs)
        return tuple(probs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        probs = ctx.saved_tensors
        # d softmax: p * g - p * (sum over the whole row of g * p), the row spanning every part
        weighted = [g * p for g, p in zip(grads, probs, strict=True)]
        dot = sum(w.sum(dim=-1, keepdim=True) for w in weighted)
        return (None, *(w.addcmul_(p, dot, value=-1) for w, p in zip(weighted, probs,
                                                                      strict=True)))


def joint_softmax(scores: Sequence[torch.Tensor],
                  biases: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, ...]:
    """The softmax over the last dimension of the concatenation of ``scores + biases``, cut back
    into one contiguous tensor per part.

    Args:
        scores: tensors ``(..., W_i)`` with the same leading dimensions (a part may be empty,
            ``W_i = 0``: a pattern without global tokens).
        biases: per part an additive bias broadcastable to it (``-inf`` masks a score out) or
            ``None``; not differentiated. Every row needs at least one finite score.

    Returns:
        ``(..., W_i)`` per part; together each row sums to 1.
    """
    if not scores:
        raise ValueError("joint_softmax needs at least one score tensor")
    leading = {tuple(s.shape[:-1]) for s in scores}
    if len(leading) != 1:
        raise ValueError(f"joint_softmax: the parts must share their leading dimensions, got "
                         f"{[tuple(s.shape) for s in scores]}")
    biases = [None] * len(scores) if biases is None else list(biases)
    if not any(s.shape[-1] for s in scores):
        raise ValueError("joint_softmax: every part is empty (a row needs a score)")
    if len(biases) != len(scores):
        raise ValueError(f"joint_softmax: {len(biases)} biases for {len(scores)} parts")
    return _JointSoftmax.apply(biases, *scores)


class _PackedJointSoftmax(torch.autograd.Function):
    """The compiled joint softmax, in place on its score tensors; keeps its outputs."""

    @staticmethod
    def forward(ctx: Any, biases: tuple[torch.Tensor | None, torch.Tensor | None],
                bounds: torch.Tensor, band: torch.Tensor, globals_: torch.Tensor,
                random: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ran = native.joint_softmax_(band, biases[0], globals_, biases[1], random, bounds)
        assert ran, "packed_joint_softmax checked that the compiled loop applies"
        ctx.mark_dirty(band, globals_, random)
        ctx.save_for_backward(band, globals_, random)
        ctx.bounds = bounds
        return band, globals_, random

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        result = native.joint_softmax_backward(ctx.saved_tensors, grads, ctx.bounds)
        assert result is not None
        return (None, None, *result)


def packed_joint_softmax(band: torch.Tensor, globals_: torch.Tensor, random: torch.Tensor,
                         biases: Sequence[torch.Tensor | None],
                         gather: GatherIndex) -> tuple[torch.Tensor, ...]:
    """:func:`joint_softmax` of the band ``(..., Wb)``, the global keys ``(..., G)`` (rows
    alike: ``batch * n`` of ``gather``) and the random keys packed ``(E,)`` by ``gather``.

    ``biases``: the band's and the global keys' additive biases, ``(n, Wb)`` and ``(n, G)``
    (shared by the ``batch`` stacked tables) or ``None``. On the CPU (float32 or float64, with
    the compiled loops) the scores are overwritten with the probabilities; keep a copy if you
    need them. Returns the probabilities in the three layouts.
    """
    band_bias, global_bias = (None if b is None else b.to(band.dtype) for b in biases)
    if native.available(band) and all(x.is_contiguous() for x in (band, globals_, random)) and (
            all(b is None or b.is_contiguous() for b in (band_bias, global_bias))):
        return _PackedJointSoftmax.apply((band_bias, global_bias), gather.bounds, band,
                                         globals_, random)
    batch, n = gather.shape[:2]
    band_attn, global_attn, random_attn = joint_softmax(
        (band.view(batch, n, band.shape[-1]), globals_.view(batch, n, globals_.shape[-1]),
         gather.unpack(random, -math.inf).view(batch, n, -1)),
        (None if band_bias is None else band_bias.view(n, band.shape[-1]), global_bias, None))
    return (band_attn.view(band.shape), global_attn.view(globals_.shape),
            gather.pack(random_attn.view(batch * n, -1)))
