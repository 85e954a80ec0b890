"""Engines: interchangeable ways to compute one-hop edge attention and to propagate along it.

Each engine turns a batch (lengths, pattern, DGL graph, device) into a *plan*, once per batch,
and the plan offers the same operations, so diffusion is written once
(:func:`diffuser_graph.attention.diffusion_attention`):

- ``attention(q, k)``: the row-stochastic one-hop attention ``A`` from ``q, k: (N, H, D)``, as a
  tuple of tensors in the engine's own layout;
- ``enter(v)`` and ``leave(z, heads)``: packed ``(N, H, Dv)`` tokens into the layout the engine
  propagates in, and back (the identity for ``dgl`` and ``gather``), so the hops of a series
  that keeps every power (the learned kernel's) stay there;
- ``propagate(attention, z)``: ``A z`` for ``z`` in that layout;
- ``diffuse(attention, v, diffusion, hop_dropout, after_mix)``: the K-hop series
  (:meth:`diffuser_graph.diffusion.Diffusion.apply`) of packed ``v: (N, H, Dv)``, packed, with
  dropout on every ``A z`` (or after every mix with ``theta_k v``: the authors' placement);
  ``dgl`` and ``gather`` leave its gradient to autograd, ``block`` enters its layout slice by
  slice and computes the gradient with the adjoint series;
- ``edge_attention(attention)``: ``A`` as ``(E, H)`` in the batch graph's edge order (only
  where ``plan.edge_order`` is true).

Engines:

- ``dgl``: message passing on the DGL graph (``u_dot_v``, ``edge_softmax``, ``u_mul_e_sum``):
  any pattern; CPU only, since the DGL wheel on PyPI has no CUDA kernels. The reference engine.
- ``block``: blocked dense matmuls around the diagonal, globals as dense products, the rest
  gathered: every pattern kind (window, causal, dilated, grid, official).
- ``gather``: pure torch (gathers and ``index_add``): any pattern, any device.
- ``auto``: chosen per batch by :func:`choose_engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from ..diffusion import Diffusion
from ..patterns import PatternSpec
from . import block

if TYPE_CHECKING:
    from ..batch import PackedBatch

EngineName = Literal["auto", "dgl", "block", "gather"]
ENGINES: tuple[str, ...] = ("auto", "dgl", "block", "gather")


class Plan(Protocol):
    """What an engine prepares for one batch (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def edge_order(self) -> bool: ...

    def attention(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def enter(self, x: torch.Tensor) -> torch.Tensor: ...

    def leave(self, x: torch.Tensor, heads: int) -> torch.Tensor: ...

    def propagate(self, attention: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor: ...

    def diffuse(self, attention: tuple[torch.Tensor, ...], v: torch.Tensor, diffusion: Diffusion,
                hop_dropout: float, after_mix: bool = False) -> torch.Tensor: ...

    def edge_attention(self, attention: tuple[torch.Tensor, ...]) -> torch.Tensor: ...


def check_engine(engine: str, spec: PatternSpec | None) -> None:
    """Refuse an unknown engine, or ``block`` for a pattern it cannot compute."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "block" and (spec is None or not block.supports(spec)):
        got = "a bare graph" if spec is None else f"kind={spec.kind!r}"
        raise ValueError(f"engine='block' needs a pattern (PatternSpec) to lay its band out "
                         f"from; got {got}")


def choose_engine(engine: str, spec: PatternSpec | None, lengths: Sequence[int],
                  device: torch.device) -> str:
    """The engine a batch runs on: ``engine`` itself, or for ``auto`` the fastest that applies.

    ``auto`` takes ``block`` where the pattern allows it and it measured faster than DGL on the
    CPU (:func:`diffuser_graph.engines.block.prefer_block`), and on every other device (DGL has
    no kernels there); otherwise ``dgl`` on the CPU and ``gather`` elsewhere.
    """
    check_engine(engine, spec)
    if engine != "auto":
        return engine
    on_cpu = device.type == "cpu"
    if spec is not None and block.supports(spec) and (
            not on_cpu or block.prefer_block(spec, lengths)):
        return "block"
    return "dgl" if on_cpu else "gather"


def make_plan(engine: str, batch: PackedBatch) -> Plan:
    """The plan of a concrete engine (not ``auto``) for ``batch``, on ``batch.device``."""
    if engine == "dgl":
        from .dgl import DGLPlan

        return DGLPlan.for_graph(batch.graph, batch.device)
    if engine == "gather":
        from .gather import GatherPlan

        return GatherPlan.for_graph(batch.graph, batch.device)
    if engine == "block":
        assert batch.spec is not None  # check_engine refused block without a pattern
        return block.BlockPlan(batch.lengths, batch.spec, batch.device)
    raise ValueError(f"no plan for engine {engine!r}; choose it first with choose_engine")
