"""The packed batch: one step's sequences laid out once for every layer.

Models hold padded ``(B, L, ...)`` tensors; attention works on the packed ``(N, ...)`` real
tokens of the batched graph. :class:`Padding` maps between the two. :class:`PackedBatch` adds the
pattern, the DGL graph (built on first use) and the engine *plan* (chosen once, with its layouts
already on the batch's device), so an encoder builds it once per forward and hands it to every
layer, as Hugging Face models build their masks once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import dgl
import torch

from .engines import Plan, check_engine, choose_engine, make_plan
from .graph import batch_graphs, check_lengths
from .patterns import PatternSpec


@dataclass(frozen=True)
class Padding:
    """Maps a padded batch ``(B, L, ...)`` to packed tokens ``(N, ...)`` and back.

    Packed token ``i`` is padded position ``flat_index[i]`` of the flattened ``(B * L)`` layout;
    sequence b holds ``lengths[b]`` real tokens, in order.
    """

    lengths: tuple[int, ...]
    flat_index: torch.Tensor  # (N,) int64, on the batch's device
    padded_shape: tuple[int, int]  # (B, L)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Padding:
        """``attention_mask: (B, L)``, bool or 0/1; tokens where it is true form each sequence."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a (B, L) tensor, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        mask = attention_mask
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(
                    ((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must be bool or integer 0/1")
            mask = mask.bool()
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            empty = torch.nonzero(lengths == 0).flatten().tolist()
            raise ValueError(f"attention_mask rows {empty} have no real token")
        return cls(check_lengths(lengths.cpu()), torch.nonzero(mask.reshape(-1)).flatten(),
                   (int(mask.shape[0]), int(mask.shape[1])))

    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | torch.Tensor,
                     device: torch.device | str | None = None) -> Padding:
        """Right-padded layout for sequences of ``lengths`` (``L = max(lengths)``)."""
        checked = check_lengths(lengths)
        width = max(checked)
        mask = torch.arange(width)[None, :] < torch.tensor(checked)[:, None]
        index = torch.nonzero(mask.reshape(-1)).flatten()
        return cls(checked, index if device is None else index.to(device), (len(checked), width))

    @property
    def num_tokens(self) -> int:
        return self.flat_index.numel()

    @property
    def mask(self) -> torch.Tensor:
        """``(B, L)`` bool: true at real tokens."""
        mask = torch.zeros(self.padded_shape[0] * self.padded_shape[1], dtype=torch.bool,
                           device=self.flat_index.device)
        mask[self.flat_index] = True
        return mask.reshape(self.padded_shape)

    def to(self, device: torch.device | str) -> Padding:
        return replace(self, flat_index=self.flat_index.to(device))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``padded: (B, L, ...)`` -> node tensor ``(N, ...)`` of the real tokens."""
        if tuple(padded.shape[:2]) != self.padded_shape:
            raise ValueError(f"padded tensor must start with shape {self.padded_shape}, "
                             f"got {tuple(padded.shape)}")
        return padded.reshape(-1, *padded.shape[2:])[self.flat_index.to(padded.device)]

    def unpack(self, packed: torch.Tensor, fill_value: float = 0.0) -> torch.Tensor:
        """Node tensor ``(N, ...)`` -> ``(B, L, ...)`` with ``fill_value`` at padding."""
        if packed.shape[0] != self.num_tokens:
            raise ValueError(f"packed tensor must have {self.num_tokens} rows, "
                             f"got {packed.shape[0]}")
        batch, length = self.padded_shape
        out = packed.new_full((batch * length, *packed.shape[1:]), fill_value)
        out = out.index_copy(0, self.flat_index.to(packed.device), packed)
        return out.reshape(batch, length, *packed.shape[1:])


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """One batch of sequences: padding map, pattern, DGL graph and engine plan, built once.

    Make it with :meth:`from_mask` (padded inputs), :meth:`from_lengths` or :meth:`from_graph`
    (any DGL graph, e.g. from :func:`batch_graphs`). ``engine`` is ``"auto"`` (see
    :func:`diffuser_graph.engines.choose_engine`), ``"dgl"``, ``"block"`` or ``"gather"``; the
    choice is made once, on first use of :attr:`plan`, for this batch's lengths and device.
    """

    padding: Padding
    spec: PatternSpec | None
    engine: str = "auto"
    given_graph: dgl.DGLGraph | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.spec is not None and not isinstance(self.spec, PatternSpec):
            raise ValueError(f"spec must be a PatternSpec, got {type(self.spec).__name__}")
        if self.spec is None and self.given_graph is None:
            raise ValueError("a PackedBatch needs a pattern (spec) or a graph")
        check_engine(self.engine, self.spec)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, spec: PatternSpec, *, engine: str = "auto",
                  device: torch.device | str | None = None) -> PackedBatch:
        """``attention_mask: (B, L)``, bool or 0/1 integers; every row needs a real token.
        ``device``: where the plan and padding map live (default: the mask's device)."""
        padding = Padding.from_mask(attention_mask)
        return cls(padding.to(device) if device is not None else padding, spec, engine)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | torch.Tensor, spec: PatternSpec, *,
                     engine: str = "auto",
                     device: torch.device | str | None = None) -> PackedBatch:
        """Sequences of ``lengths`` tokens, right-padded when unpacked."""
        return cls(Padding.from_lengths(lengths, device), spec, engine)

    @classmethod
    def from_graph(cls, graph: dgl.DGLGraph, *, engine: str = "auto") -> PackedBatch:
        """A batched (or single) DGL graph as it is: its edges are the pattern."""
        if not isinstance(graph, dgl.DGLGraph):
            raise ValueError(f"expected a DGL graph, got {type(graph).__name__}")
        padding = Padding.from_lengths(graph.batch_num_nodes().cpu(), graph.device)
        return cls(padding, None, engine, graph)

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.padding.lengths

    @property
    def num_tokens(self) -> int:
        return self.padding.num_tokens

    @property
    def device(self) -> torch.device:
        return self.padding.flat_index.device

    @property
    def mask(self) -> torch.Tensor:
        return self.padding.mask

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return self.padding.pack(padded)

    def unpack(self, packed: torch.Tensor, fill_value: float = 0.0) -> torch.Tensor:
        return self.padding.unpack(packed, fill_value)

    @cached_property
    def graph(self) -> dgl.DGLGraph:
        """The batched DGL graph of the sequences (on the CPU, where DGL runs)."""
        if self.given_graph is not None:
            return self.given_graph
        assert self.spec is not None  # __post_init__ requires a spec or a graph
        return batch_graphs(self.lengths, self.spec)

    @cached_property
    def engine_name(self) -> str:
        """The engine this batch runs on (``auto`` resolved for its lengths and device)."""
        return choose_engine(self.engine, self.spec, self.lengths, self.device)

    @cached_property
    def plan(self) -> Plan:
        """The chosen engine's plan, on :attr:`device`."""
        return make_plan(self.engine_name, self)

    @cached_property
    def edge_plan(self) -> Plan:
        """A plan that gives attention per edge of :attr:`graph` (for ``return_attention``)."""
        if self.plan.edge_order:
            return self.plan
        return make_plan("dgl" if self.device.type == "cpu" else "gather", self)

    def with_engine(self, engine: str) -> PackedBatch:
        """The same batch planned for another engine (the graph is shared)."""
        if engine == self.engine:
            return self
        built = self.__dict__.get("graph", self.given_graph)  # reuse a graph already built
        return PackedBatch(self.padding, self.spec, engine, built)


def as_batch(batch_or_graph: Any, engine: str | None = None) -> PackedBatch:
    """A :class:`PackedBatch` from a batch or a bare DGL graph; ``engine`` re-plans it.

    A bare graph runs on ``engine`` (default ``auto``: DGL on the CPU, ``gather`` elsewhere).
    """
    if isinstance(batch_or_graph, PackedBatch):
        return batch_or_graph if engine is None else batch_or_graph.with_engine(engine)
    if isinstance(batch_or_graph, dgl.DGLGraph):
        return PackedBatch.from_graph(batch_or_graph, engine=engine or "auto")
    raise ValueError(f"expected a PackedBatch or a DGL graph, got {type(batch_or_graph).__name__}")
