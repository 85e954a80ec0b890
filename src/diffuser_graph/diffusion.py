"""The diffusion series shared by every engine: weights, argument checks and the K-hop loop.

PPR: ``Z0 = V``, ``Z(k+1) = (1 - alpha) A Z(k) + alpha V``; heat: ``sum_k w_k A^k V`` with
``w_k`` proportional to ``e^{-t} t^k / k!``. An engine only supplies ``propagate`` (one
application of ``A``); :func:`diffusion_series` does the rest.
"""

from __future__ import annotations

import math

import torch

KERNELS = ("ppr", "heat")


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


def diffusion_series(
    propagate,
    v: torch.Tensor,
    *,
    alpha: float = 0.1,
    hops: int = 5,
    kernel: str = "ppr",
    t: float = 1.0,
) -> torch.Tensor:
    """The PPR or heat series of ``propagate`` (one application of ``A``) on values ``v``.

    Any engine supplies ``propagate``; the series is the same for all of them.
    """
    check_diffusion_args(alpha, hops, kernel, t)
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


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_nodes: int,
              where: str = "the pattern has") -> None:
    """``q, k: (N, H, D)``, ``v: (N, H, Dv)``, one float dtype and device, ``N = num_nodes``."""
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
    if q.shape[0] != num_nodes:
        raise ValueError(f"q, k, v have N={q.shape[0]} rows but {where} {num_nodes} nodes")


def check_dropout(name: str, p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
