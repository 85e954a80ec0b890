"""The diffusion value: which operator ``sum_k theta_k A^k`` a layer applies, and its series.

A :class:`Diffusion` (``kernel``, ``alpha``, ``hops``, ``t``) is frozen and validated once, where
it is made; engines, the model and spectral analysis take it as it is. Its ``kernel`` names a
coefficient function in a registry, so a new kernel is one function and one
:func:`register_kernel` call:

* ``"ppr"`` (personalized PageRank): ``theta_k = alpha (1-alpha)^k`` for ``k < K`` and
  ``(1-alpha)^K`` for ``k = K``, the K-step truncation of ``Z(k+1) = (1-alpha) A Z(k) + alpha V``.
* ``"heat"``: ``theta_k`` proportional to ``e^{-t} t^k / k!`` for ``k = 0..K``, renormalised to
  sum to 1 (computed in log space, so any ``t`` and ``K`` work).
* ``"learned"`` (beyond the paper, after GPR-GNN): every attention head learns its own
  ``theta_0..theta_K`` (softmax of logits, :class:`~diffuser_graph.attention.DiffuserAttention`
  holds them); its coefficients here are the starting point, PPR's of ``alpha``, so an untrained
  layer computes PPR.

:meth:`Diffusion.apply` evaluates ``sum_k theta_k A^k V`` with K applications of ``A`` by Horner's
rule, ``Z = theta_K V``, ``Z <- A Z + theta_k V`` for ``k = K-1..0``. For PPR the Horner iterate
after j steps is ``(1-alpha)^(K-j)`` times the paper's ``Z(j)``, so a dropout applied to either
is the same dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Annotated, Any, Protocol, TypeVar, cast

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .checks import Float, Int

KernelCoefficients = Callable[["Diffusion"], Sequence[float]]
_KERNELS: dict[str, KernelCoefficients] = {}



class Vector(Protocol):
    """What the series needs of values: a sum and a scalar multiple (tensors, arrays)."""

    def __add__(self, other: Any, /) -> Any: ...

    def __rmul__(self, other: float, /) -> Any: ...


Z = TypeVar("Z", bound=Vector)


def kernels() -> tuple[str, ...]:
    """Names of the registered kernels."""
    return tuple(_KERNELS)


def register_kernel(name: str, coefficients: KernelCoefficients, *, replace: bool = False) -> None:
    """Make ``Diffusion(kernel=name)`` use ``coefficients(diffusion) -> theta_0..theta_K``.

    ``coefficients`` receives the whole :class:`Diffusion` (it may read ``alpha``, ``hops`` and
    ``t``) and must return ``hops + 1`` finite numbers. Registering a name twice needs
    ``replace=True``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a kernel name must be an identifier, got {name!r}")
    if not callable(coefficients):
        raise ValueError(f"coefficients must be a function of a Diffusion, got {coefficients!r}")
    if name in _KERNELS and not replace:
        raise ValueError(f"kernel {name!r} is already registered; pass replace=True to replace it")
    _KERNELS[name] = coefficients
    _coefficients.cache_clear()


def _registered(name: str) -> str:
    if name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; registered kernels: {', '.join(_KERNELS)}")
    return name


# Field types shared by every config that holds diffusion settings (the model, the spectral probe).
KernelName = Annotated[str, AfterValidator(_registered)]
Alpha = Annotated[Float, Field(ge=0, le=1, allow_inf_nan=False)]
Hops = Annotated[Int, Field(ge=1)]
HeatTime = Annotated[Float, Field(gt=0, allow_inf_nan=False)]


class Diffusion(BaseModel):
    """Settings of attention diffusion; frozen, hashable and validated on creation.

    - ``kernel``: a registered kernel name (``"ppr"``, ``"heat"``, or one of
      :func:`register_kernel`).
    - ``alpha``: teleport probability of PPR in [0, 1].
    - ``hops``: K >= 1, applications of the one-hop attention ``A``.
    - ``t``: heat-kernel time > 0.

    ``Diffusion(alpha=0, hops=1)`` (:meth:`one_hop`) is plain one-hop attention.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel: KernelName = "ppr"
    alpha: Alpha = 0.1
    hops: Hops = 5
    t: HeatTime = 1.0

    @classmethod
    def one_hop(cls) -> Diffusion:
        """One application of ``A`` and nothing else: sparse attention."""
        return cls(kernel="ppr", alpha=0.0, hops=1)

    @property
    def coefficients(self) -> tuple[float, ...]:
        """``theta_0..theta_K`` of the operator ``sum_k theta_k A^k``."""
        return _coefficients(self)

    def apply(self, propagate: Callable[[Z], Z], v: Z,
              after_mix: Callable[[Z], Z] | None = None, in_place: bool = False) -> Z:
        """``sum_k theta_k A^k v``, where ``propagate(z)`` applies ``A`` (K calls, Horner's rule).

        ``v`` is anything ``propagate`` takes that supports ``+`` and scalar ``*`` (a tensor of
        any layout, a numpy array). ``after_mix``, if given, is applied to every iterate after
        ``theta_k v`` is added (where the authors' code drops out). ``in_place``: ``propagate``
        returns a new tensor nothing else holds (no autograd), so ``theta_k v`` is added into it,
        and the first hop propagates ``v`` itself and scales its output, ``theta_K (A v)``: a
        ``propagate`` that keeps its inputs keeps ``v`` and the later iterates, no scaled copy.
        """
        theta = self.coefficients
        scale_first = in_place and theta[-1] != 1
        z = v if theta[-1] == 1 or in_place else theta[-1] * v
        for weight in reversed(theta[:-1]):
            z = propagate(z)
            if scale_first:
                z = cast(Z, z.mul_(theta[-1])) if isinstance(z, torch.Tensor) else theta[-1] * z
                scale_first = False
            if weight and isinstance(z, torch.Tensor):  # one pass, no temporary weight * v
                mix = z.add_ if in_place else z.add
                z = cast(Z, mix(cast(torch.Tensor, v), alpha=weight))
            elif weight:
                z = z + weight * v
            if after_mix is not None:
                z = after_mix(z)
        return z


@lru_cache(maxsize=256)
def _coefficients(diffusion: Diffusion) -> tuple[float, ...]:
    values = tuple(float(c) for c in _KERNELS[diffusion.kernel](diffusion))
    if len(values) != diffusion.hops + 1 or not all(math.isfinite(c) for c in values):
        raise ValueError(f"kernel {diffusion.kernel!r} must give hops + 1 = {diffusion.hops + 1} "
                         f"finite coefficients, got {values}")
    return values


def ppr_coefficients(diffusion: Diffusion) -> list[float]:
    """``alpha (1-alpha)^k`` for ``k < K``, then ``(1-alpha)^K``: they sum to 1."""
    alpha, hops = diffusion.alpha, diffusion.hops
    return [alpha * (1 - alpha) ** k for k in range(hops)] + [(1 - alpha) ** hops]


def heat_coefficients(diffusion: Diffusion) -> list[float]:
    """``e^{-t} t^k / k!`` for ``k = 0..K`` renormalised to sum to 1, computed in log space."""
    t, hops = diffusion.t, diffusion.hops
    logs = [k * math.log(t) - math.lgamma(k + 1) for k in range(hops + 1)]
    top = max(logs)
    weights = [math.exp(x - top) for x in logs]
    total = math.fsum(weights)
    return [w / total for w in weights]


register_kernel("ppr", ppr_coefficients)
register_kernel("heat", heat_coefficients)
register_kernel("learned", ppr_coefficients)
LEARNED = "learned"  # the kernel whose coefficients each attention head learns


def resolve_diffusion(diffusion: Diffusion | None = None, *, kernel: str | None = None,
                      alpha: float | None = None, hops: int | None = None,
                      t: float | None = None) -> Diffusion:
    """A :class:`Diffusion` from a given one or from loose settings (not both).

    Public functions take either ``diffusion=Diffusion(...)`` or ``alpha=, hops=, kernel=, t=``
    for convenience; unset settings keep :class:`Diffusion`'s defaults.
    """
    loose = {name: value for name, value in
             (("kernel", kernel), ("alpha", alpha), ("hops", hops), ("t", t)) if value is not None}
    if diffusion is None:
        return Diffusion(**loose)
    if not isinstance(diffusion, Diffusion):
        raise ValueError(f"diffusion must be a Diffusion, got {type(diffusion).__name__}")
    if loose:
        raise ValueError(f"pass either diffusion= or {', '.join(loose)}=, not both")
    return diffusion
