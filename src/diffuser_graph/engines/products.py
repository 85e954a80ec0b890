"""Differentiable products that save only their two inputs.

The engines' sparse products (banded and gathered) are bilinear, ``f(context, x, y)``, and each
gradient is another product of the same context: ``dx = g_x(context, grad, x, y)``,
``dy = g_y(context, grad, x, y)``. :func:`product` runs one with autograd while keeping only
``x`` and ``y`` for backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Rule = Callable[..., torch.Tensor]
Rules = tuple[Rule, Rule, Rule]  # the product, the gradient of x, the gradient of y


class _Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rules: Rules, context: Any, x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        ctx.rules, ctx.context = rules, context
        return rules[0](context, x, y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, y = ctx.saved_tensors
        grad = grad.contiguous()
        _, grad_x, grad_y = ctx.rules
        return (None, None,
                grad_x(ctx.context, grad, x, y) if ctx.needs_input_grad[2] else None,
                grad_y(ctx.context, grad, x, y) if ctx.needs_input_grad[3] else None)


def product(rules: Rules, context: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``rules[0](context, x, y)`` with the gradients ``rules[1]`` and ``rules[2]``."""
    return _Product.apply(rules, context, x, y)
