"""One softmax over several score tensors of the same rows, without concatenating them.

The block engine scores each query's keys in parts (the band, the global keys, the random keys),
each ``(..., W_i)``, and normalises them together. ``torch.softmax`` of their concatenation
would write the scores once more, keep the joint probabilities for backward and hand back
strided slices that the band products must copy to make contiguous. :func:`joint_softmax`
writes each part's probabilities into a tensor of its own, keeps only those for backward, and
adds each part's mask (an additive bias, ``-inf`` off the pattern) on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


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
