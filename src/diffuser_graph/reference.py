"""Dense reference implementation: what every engine must equal, written the obvious way.

Everything here is query-major: ``mask[v, u]`` is true when query v attends to key u, and the
attention matrix ``A[h, v, u]`` is a masked dense softmax over keys. The diffusion operator is the
explicit matrix series, built from matrix powers with its own formulas for the PPR and heat
weights (not the package's kernel registry), or from weights the caller gives. Meant for small N
(tests, notebooks), not for speed; nothing else in the package imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dgl
import numpy as np
import torch
from scipy.stats import poisson

from .diffusion import Diffusion


def dense_mask(g: dgl.DGLGraph) -> torch.Tensor:
    """Query-major boolean mask ``(N, N)``: ``mask[v, u]`` for every edge ``u -> v`` of ``g``."""
    src, dst = g.edges()
    n = g.num_nodes()
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[dst, src] = True
    return mask


def dense_attention_matrix(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Row-stochastic ``A: (H, N, N)`` from ``q, k: (N, H, D)``, softmax over allowed keys."""
    scores = torch.einsum("vhd,uhd->hvu", q, k) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def diffusion_operator(
    attn: torch.Tensor, *, alpha: float = 0.1, hops: int = 5, kernel: str = "ppr", t: float = 1.0,
    coefficients: Sequence[float] | None = None,
) -> torch.Tensor:
    """The diffused operator ``(..., N, N)`` for attention matrices ``attn: (..., N, N)``.

    PPR: ``(1-alpha)^K A^K + alpha * sum_{i<K} (1-alpha)^i A^i``.
    Heat: ``sum_{k=0..K} w_k A^k`` with the renormalised heat weights (scipy's Poisson pmf).
    ``coefficients``: explicit ``theta_0..theta_K`` instead (for any other kernel).
    """
    if coefficients is None:
        Diffusion(kernel=kernel, alpha=alpha, hops=hops, t=t)  # the same argument checks
        if kernel == "ppr":
            coefficients = [alpha * (1 - alpha) ** i for i in range(hops)] + [(1 - alpha) ** hops]
        elif kernel == "heat":
            pmf = poisson.pmf(np.arange(hops + 1), t)
            coefficients = (pmf / pmf.sum()).tolist()
        else:
            raise ValueError(f"the reference knows ppr and heat; give coefficients for {kernel!r}")
    n = attn.shape[-1]
    power = torch.eye(n, dtype=attn.dtype, device=attn.device).expand_as(attn)
    total = coefficients[0] * power
    for c in coefficients[1:]:
        power = power @ attn
        total = total + c * power
    return total


def dense_diffusion_attention(
    mask: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float = 0.1,
    hops: int = 5,
    kernel: str = "ppr",
    t: float = 1.0,
    coefficients: Sequence[float] | None = None,
) -> torch.Tensor:
    """Dense equivalent of :func:`diffusion_attention`: ``(N, H, Dv)`` from ``mask (N, N)``."""
    operator = diffusion_operator(dense_attention_matrix(mask, q, k), alpha=alpha, hops=hops,
                                  kernel=kernel, t=t, coefficients=coefficients)
    return torch.einsum("hvu,uhd->vhd", operator, v)
