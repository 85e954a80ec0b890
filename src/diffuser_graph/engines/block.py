"""The block engine: attention patterns as blocked dense matmuls, for every pattern kind.

DGL's generic SDDMM/SpMM kernels touch one edge at a time. Most edges of every shipped pattern
lie in a band around the diagonal: the sliding window (causal or not, dilated or not), the 2-D
neighbourhood of a grid image flattened row-major (``r * (W + 1)`` tokens to either side), and
the authors' overlapping blocks (a query chunk of ``w/2`` tokens sees the chunks before and
after it). This engine cuts the queries into blocks of ``b`` tokens and computes each block
against the ``left + b + right`` keys its band can reach with batched dense matmuls, masking the
pairs that are not edges. Global tokens (full rows and columns of the pattern, causally full for
a causal one) become dense ``(N, G)`` and ``(G, N)`` products, and the few remaining edges (the
random keys) gathered products that do not keep the gathered rows (:mod:`.gathered`). Where the
band would be mostly holes (a grid's 3 x 3 neighbourhood spans 51 keys of a 16-pixel-wide
image for 9 edges; a dilated or narrow window) there is no band and the local edges are
gathered with the random keys (:func:`band_geometry`), and so is a single global token
(:data:`GATHERED_GLOBALS`). The softmax runs jointly over all parts,
so the function is exactly the DGL engine's.

The pattern's DGL graph stays the single description: :func:`block_layout` reads every part from
the graph's edges (the spec only chooses the band's geometry) and checks that band, globals and
random keys hold exactly the graph's edges, each once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion import Diffusion
from ..graph import build_graph
from ..patterns import PatternSpec
from .band import (
    BandGeometry,
    band_apply,
    band_apply_transposed,
    band_scores,
    band_transpose,
    banded_apply,
)
from .gathered import GatherIndex, gather_sum
from .softmax import packed_joint_softmax


def supports(spec: PatternSpec) -> bool:
    """Whether the block engine computes this pattern: every pattern kind."""
    return spec.kind in ("window", "grid", "official")


def prefer_block(spec: PatternSpec, lengths: Sequence[int]) -> bool:
    """What ``engine="auto"`` picks on the CPU: the block engine where it measured faster than DGL.

    Measured on this project's CPU (forward+backward of a layer, K = 4-5, and training steps).
    Patterns whose local edges are gathered (no band, :func:`band_geometry`) win from 8 tokens
    per sequence: K = 5, 4 heads x 16, one thread, 2.0-3.5x faster than DGL for windows of 0-4
    tokens (causal or not, 8 to 4,096 tokens per sequence) and 3 x 3 grids on 4 x 4 to 6 x 6
    images, even with six lengths in a batch (mean 35 tokens); 2.3x slower on 2 x 2 images, where
    every pixel is a global token. The rule extends this to every band-less pattern (windows of
    up to 6 tokens to both sides or 13 causal, dilated windows) and does not count global
    tokens. With a band (windows of 7 or more tokens to both sides, 14 or more causal): windows
    from 128 tokens per sequence (causal window 16, 16 x 256 tokens: 0.114 s against DGL's
    0.147); the official pattern from 256 tokens (at 2,048: 0.69 s against 1.38); grids from 64
    tokens.
    """
    if not supports(spec) or not len(lengths):
        return False
    mean_length = sum(lengths) / len(lengths)
    if not band_geometry(spec).width:
        return mean_length >= 8
    if spec.kind == "window":
        return mean_length >= 128
    if spec.kind == "grid":
        return mean_length >= 64
    return spec.kind == "official" and mean_length >= 256


# A gathered edge costs about as much as this many band entries: a query's band is read whole,
# edges or not, at matmul speed, its gathered keys one row at a time. Measured on this project's
# CPU (3 x 3 grid neighbourhoods, 8 x 8 to 32 x 32 images, head size 16 and 64): 1.4-1.9.
GATHER_COST = 2
# Without a band, this many global tokens or fewer are gathered too (a row of n keys and a key
# of every query each) rather than computed as dense (N, G) and (G, N) products, whose batched
# matmuls with one row or column cost more than the gathers. Measured (K = 5 layer, 32 x 256
# tokens, 4 x 16 heads, one thread): one global, 3 x 3 grid 39.3 ms against 49.9 and window 4
# 44.5 against 50.2; two globals, window 4 55.7 against 50.1.
GATHERED_GLOBALS = 1
# ... on sequences up to this long: a gathered global row is n keys, and the layout's rectangular
# random-key table (and the torch softmax's rectangle off the CPU) is as wide as its longest row.
GATHERED_GLOBALS_MAX_LEN = 512


def band_geometry(spec: PatternSpec) -> BandGeometry:
    """Where a pattern's local edges are computed: the narrowest band that holds them, or no
    band (:meth:`BandGeometry.empty`: all gathered) where that band would be mostly holes, as
    for a grid's neighbourhood (a 3 x 3 one on a 16-pixel-wide image spans 51 keys for 9
    edges) or a dilated window."""
    if spec.kind == "official":
        stride = spec.window // 2
        return BandGeometry(stride, stride, stride)
    side = spec.window * (1 if spec.causal else 2) + 1  # keys per query along one axis
    if spec.kind == "grid":
        assert spec.image_size is not None
        reach = spec.window * spec.dilation * (spec.image_size[1] + 1)
        local = spec.window * (2 * spec.window + 1) + side if spec.causal else side * side
    else:
        reach, local = spec.window * spec.dilation, side
    band = BandGeometry(max(reach, 16), reach, 0 if spec.causal else reach)
    return band if local * GATHER_COST >= band.width else BandGeometry.empty()


@dataclass(frozen=True)
class BlockLayout:
    """Where each edge of one sequence's pattern lives in the blocked computation.

    The sequence is padded to ``padded = n_blocks * block`` rows. A padded query attends only to
    itself (a padded key, never attended by a real query), so its softmax stays finite.
    """

    n: int
    geometry: BandGeometry
    globals: torch.Tensor  # (G,) global token positions
    global_keys: torch.Tensor | None  # (padded, G) bool: query i attends global j; None: all do
    global_rows: torch.Tensor | None  # (G, padded) bool: global j attends key i; None: all keys
    band_mask: torch.Tensor  # (n_blocks, block, width) bool: key is a band edge
    random_keys: torch.Tensor  # (padded, R) key index per random edge (0 where padded)
    random_mask: torch.Tensor  # (padded, R) bool: a real random edge

    @property
    def num_blocks(self) -> int:
        return self.band_mask.shape[0]

    @cached_property
    def biases(self) -> tuple[torch.Tensor | None, ...]:
        """The masks as additive float32 biases (0 on an edge, -inf off it), in the order band,
        global keys, global rows: adding one costs a tenth of a broadcast ``masked_fill``, and
        its gradient is the identity."""
        def bias(mask: torch.Tensor | None) -> torch.Tensor | None:
            return None if mask is None else torch.zeros(mask.shape, device=mask.device
                                                         ).masked_fill_(~mask, -math.inf)

        return tuple(bias(mask) for mask in (self.band_mask, self.global_keys, self.global_rows))

    @cached_property
    def transposed_global_queries(self) -> torch.Tensor:
        """The entries of the transposed band (one sequence's ``(n_blocks, block, width')``,
        flattened) whose query is a global token: its row of ``A`` is the global row instead."""
        transposed = self.geometry.transposed
        b, chunks = transposed.block, np.arange(self.num_blocks)
        entries = [np.zeros(0, dtype=np.int64)]
        for token in self.globals.tolist():
            column = token - (chunks * b - transposed.left)
            keep = (column >= 0) & (column < transposed.width)
            entries.append(((chunks[keep, None] * b + np.arange(b)) * transposed.width
                            + column[keep, None]).ravel())
        return torch.from_numpy(np.concatenate(entries)).to(self.globals.device)

    @property
    def padded(self) -> int:
        return self.num_blocks * self.geometry.block

    def to(self, device: torch.device) -> BlockLayout:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return BlockLayout(self.n, self.geometry, self.globals.to(device),
                           move(self.global_keys), move(self.global_rows),
                           self.band_mask.to(device), self.random_keys.to(device),
                           self.random_mask.to(device))


def _global_tokens(src: np.ndarray, dst: np.ndarray, n: int, causal: bool) -> np.ndarray:
    """Tokens that attend to every key and are attended by every query they may be (for a
    causal pattern: every key before them, every query after them)."""
    keys_of = np.bincount(dst, minlength=n)  # in-degree: keys a query attends
    queries_of = np.bincount(src, minlength=n)  # out-degree: queries attending a key
    tokens = np.arange(n)
    full_row = keys_of == (tokens + 1 if causal else n)
    full_column = queries_of == (n - tokens if causal else n)
    return np.flatnonzero(full_row & full_column)


@lru_cache(maxsize=1024)
def block_layout(seq_len: int, spec: PatternSpec) -> BlockLayout:
    """The layout of ``spec`` on ``seq_len`` tokens, read from its DGL graph, on the band of
    :func:`band_geometry` (or none)."""
    if not supports(spec):
        raise ValueError(f"the block engine computes window, grid and official patterns, not "
                         f"kind={spec.kind!r}")
    n = seq_len
    geometry = band_geometry(spec)
    src, dst = (t.numpy() for t in build_graph(n, spec).edges())
    edges = dst * n + src  # sorted, unique: build_graph sorts by (dst, src)
    globals_ = _global_tokens(src, dst, n, spec.causal)
    if not geometry.width and len(globals_) <= GATHERED_GLOBALS and \
            n <= GATHERED_GLOBALS_MAX_LEN:
        globals_ = globals_[:0]  # their rows and columns are gathered with the local edges
    is_global = np.zeros(n, dtype=bool)
    is_global[globals_] = True

    b, left = geometry.block, geometry.left
    n_blocks = math.ceil(n / b)
    query = np.arange(n_blocks)[:, None, None] * b + np.arange(b)[None, :, None]
    key = query[:, :1] - left + np.arange(geometry.width)[None, None, :]
    inside = (key >= 0) & (key < n) & (query < n)
    codes = np.clip(query, 0, n - 1) * n + np.clip(key, 0, n - 1)
    band = inside & np.isin(codes, edges) & ~is_global[np.clip(query, 0, n - 1)]
    band &= ~is_global[np.clip(key, 0, n - 1)]

    block_start = (dst // b) * b
    in_window = (src >= block_start - left) & (src < block_start + b + geometry.right)
    rest = ~is_global[src] & ~is_global[dst] & ~in_window
    random_src, random_dst = src[rest], dst[rest]
    counts = np.bincount(random_dst, minlength=n)
    width = max(int(counts.max()) if counts.size else 0, 1)
    rank = np.arange(random_dst.size) - np.repeat(np.cumsum(counts) - counts, counts)
    random_keys = np.zeros((n, width), dtype=np.int64)
    random_mask = np.zeros((n, width), dtype=bool)
    random_keys[random_dst, rank] = random_src
    random_mask[random_dst, rank] = True

    global_keys = np.isin(np.arange(n)[:, None] * n + globals_[None, :], edges)  # (n, G)
    global_rows = np.isin(globals_[:, None] * n + np.arange(n)[None, :], edges)  # (G, n)
    covered = (int(band.sum()) + int(global_rows.sum()) + int(random_mask.sum())
               + int(global_keys[~is_global].sum()))
    if covered != edges.size:
        raise ValueError(f"the block layout holds {covered} edges but the graph has "
                         f"{edges.size}: band, globals and random keys must cover it exactly")
    pad = n_blocks * b - n
    band |= (query >= n) & (key == query)  # padded queries attend themselves
    keep_keys = global_keys.all() and not pad
    keep_rows = global_rows.all() and not pad
    rows = ((0, pad), (0, 0))
    return BlockLayout(
        n, geometry, torch.from_numpy(globals_),
        None if keep_keys else torch.from_numpy(np.pad(global_keys, rows)),
        None if keep_rows else torch.from_numpy(np.pad(global_rows, ((0, 0), (0, pad)))),
        torch.from_numpy(band), torch.from_numpy(np.pad(random_keys, rows)),
        torch.from_numpy(np.pad(random_mask, rows)))


@lru_cache(maxsize=1024)
def _layout_on(seq_len: int, spec: PatternSpec, device: torch.device) -> BlockLayout:
    return block_layout(seq_len, spec).to(device)


def _parts_per_thread(batch: int, tokens: int, device: torch.device) -> int:
    """How many parts a global token's product over ``tokens`` tokens is cut into: on the CPU,
    where the batch is smaller than the thread count (``bmm`` runs a batch entry on one thread;
    a slice of one long sequence has one head), as many as the threads per batch entry that
    divide the tokens evenly; else one."""
    parts = torch.get_num_threads() // batch if device.type == "cpu" else 1
    return math.gcd(max(parts, 1), tokens)  # parts of equal length


def _over_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a: (B, G, n)`` and contiguous ``b: (B, n, D)``: a sum over the tokens, in
    parts summed after (:func:`_parts_per_thread`)."""
    batch, rows, tokens = a.shape
    parts = _parts_per_thread(batch, tokens, a.device)
    if parts == 1 or not b.is_contiguous():
        return a @ b
    a = a.unflatten(2, (parts, tokens // parts)).transpose(1, 2).reshape(
        batch * parts, rows, tokens // parts)
    return (a @ b.view(batch * parts, tokens // parts, b.shape[-1])).view(batch, parts, rows,
                                                               b.shape[-1]).sum(1)


def _per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a: (B, G, D)`` and ``b: (B, D, n)``, the transpose of a contiguous
    ``(B, n, D)``: one output column per token, the tokens in parts (:func:`_parts_per_thread`)."""
    batch, rows, dim = a.shape
    tokens = b.shape[-1]
    parts = _parts_per_thread(batch, tokens, a.device)
    if parts == 1 or not b.transpose(1, 2).is_contiguous():
        return a @ b
    b = b.unflatten(2, (parts, tokens // parts)).transpose(1, 2).flatten(0, 1)
    a = a.unsqueeze(1).expand(batch, parts, rows, dim).flatten(0, 1)
    return (a @ b).view(batch, parts, rows, tokens // parts).transpose(1, 2).reshape(
        batch, rows, tokens)


class _Scores(torch.autograd.Function):
    """One group's scores ``q . k / sqrt(D)`` on every part, from ``q, k: (B, padded, D)``: the
    band ``(B * n_blocks, b, width)``, the global keys ``(B, padded, G)``, the random keys
    packed ``(E,)`` and the global rows ``(B, G, padded)``. Backward adds every part's
    gradient into one ``dq`` and one ``dk`` inside the products (separate autograd products
    would each make a q-sized gradient, a zero-filled one for the global tokens' rows, and add
    them up); it keeps the scaled q and k."""

    @staticmethod
    def forward(ctx: Any, layout: BlockLayout, gather: GatherIndex, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, padded, dim = q.shape
        q = q * (1.0 / math.sqrt(dim))  # scaled once here rather than every score
        chunks = (batch * layout.num_blocks, layout.geometry.block, dim)
        glob = layout.globals
        band = band_scores(layout.geometry, q.reshape(chunks), k.reshape(chunks))
        to_globals = q @ k.index_select(1, glob).transpose(1, 2)
        random = gather.gather_dot(q.reshape(-1, dim), k.reshape(-1, dim))
        rows = _per_token(q.index_select(1, glob), k.transpose(1, 2))
        ctx.layout, ctx.gather = layout, gather
        ctx.save_for_backward(q, k)
        return band, to_globals, random, rows

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        q, k = ctx.saved_tensors
        layout, gather = ctx.layout, ctx.gather
        band, to_globals, random, rows = (grad.contiguous() for grad in grads)
        batch, padded, dim = q.shape
        chunks = (batch * layout.num_blocks, layout.geometry.block, dim)
        glob = layout.globals
        dq = gather.gather_sum(random, k.reshape(-1, dim))
        band_apply(layout.geometry, band, k.reshape(chunks), add_to=dq.view(chunks))
        dq = dq.view(batch, padded, dim).baddbmm_(to_globals, k.index_select(1, glob))
        dq.index_add_(1, glob, _over_tokens(rows, k))
        dk = gather.scatter_sum(random, q.reshape(-1, dim))
        band_apply_transposed(layout.geometry, band, q.reshape(chunks), add_to=dk.view(chunks))
        dk = dk.view(batch, padded, dim).baddbmm_(rows.transpose(1, 2), q.index_select(1, glob))
        dk.index_add_(1, glob, _over_tokens(to_globals.transpose(1, 2), q))
        return None, None, dq.mul_(1.0 / math.sqrt(dim)), dk


def _attention_parts(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor,
                     gather: GatherIndex) -> tuple[torch.Tensor, ...]:
    """One group's ``A`` from ``q, k: (B, padded, D)`` (B = sequences x heads): the band
    ``(B * n_blocks, b, width)``, the global keys ``(B, padded, G)``, the random keys packed
    ``(E,)`` (one joint softmax over the three) and the global rows ``(B, G, padded)``.
    """
    band_bias, global_keys_bias, global_rows_bias = layout.biases
    band, to_globals, random, rows = _Scores.apply(layout, gather, q, k)
    band_attn, global_attn, random_attn = packed_joint_softmax(
        band, to_globals, random, (band_bias, global_keys_bias), gather)
    if global_rows_bias is not None:
        rows = rows + global_rows_bias
    return band_attn, global_attn, random_attn, torch.softmax(rows, dim=-1)


def _propagate_one(layout: BlockLayout, parts: Sequence[torch.Tensor], z: torch.Tensor,
                   gather: GatherIndex) -> torch.Tensor:
    """``A z`` for one group, ``z: (B, padded, Dv)``; differentiable when grad mode is on."""
    band_attn, global_attn, random_attn, rows = parts
    batch, padded, dim = z.shape
    glob = layout.globals
    chunks = z.reshape(batch * layout.num_blocks, layout.geometry.block, dim)
    if torch.is_grad_enabled():
        out = gather_sum(random_attn, z, gather)
        if layout.geometry.width:
            out = banded_apply(layout.geometry, band_attn, chunks).view(batch, padded, dim).add_(
                out)
    else:  # the band accumulates into the random keys' sums: no temporary of z's size
        out = gather.gather_sum(random_attn, z.reshape(batch * padded, dim))
        band_apply(layout.geometry, band_attn, chunks, add_to=out.view(chunks.shape))
        out = out.view(batch, padded, dim)
    out = out.baddbmm_(global_attn, z.index_select(1, glob))
    return out.index_copy_(1, glob, _over_tokens(rows, z))


def _transposed_parts(layout: BlockLayout, parts: Sequence[torch.Tensor],
                      gather: GatherIndex) -> tuple[torch.Tensor, ...]:
    """One group's parts as :func:`_propagate_transposed` applies them, made once for all the
    hops of a backward pass: the band transposed, with the entries of every global query zeroed
    (its row of ``A`` is the global row; it has no random keys), and the random keys in the order
    of the keys they gather. The global keys stay as they are: :func:`_propagate_transposed`
    takes the global queries' part back out, a ``(G, G)`` product instead of a copy."""
    band_attn, global_attn, random_attn, rows = parts
    band = band_transpose(layout.geometry, band_attn)
    sequences = global_attn.shape[0]
    band.view(sequences, band.numel() // sequences).index_fill_(
        1, layout.transposed_global_queries, 0)
    return band, global_attn, random_attn.index_select(0, gather.by_key), rows


def _propagate_transposed(layout: BlockLayout, parts: Sequence[torch.Tensor], g: torch.Tensor,
                          gather: GatherIndex) -> torch.Tensor:
    """``A^T g`` for one group from its :func:`_transposed_parts`, ``g: (B, padded, Dv)`` (no
    autograd)."""
    band, global_attn, random_attn, rows = parts
    batch, padded, dim = g.shape
    glob = layout.globals
    chunks = g.reshape(batch * layout.num_blocks, layout.geometry.block, dim)
    # the band accumulates into the random keys' sums: no temporary of g's size per hop
    out = gather.scatter_sum_by_key(random_attn, g.reshape(batch * padded, dim))
    band_apply(layout.geometry.transposed, band, chunks, add_to=out.view(chunks.shape))
    out = out.view(batch, padded, dim)
    g_globals = g.index_select(1, glob)
    to_globals = _over_tokens(global_attn.transpose(1, 2), g).baddbmm_(
        global_attn.index_select(1, glob).transpose(1, 2), g_globals, alpha=-1)  # less the
    # global queries' rows
    out.index_add_(1, glob, to_globals)
    return out.baddbmm_(rows.transpose(1, 2), g_globals)


def _attention_grads(layout: BlockLayout, g: torch.Tensor, z: torch.Tensor, gather: GatherIndex,
                     add_to: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The gradient of each attention part of one group from ``g``, the gradients of ``A z``, and
    ``z``, the inputs of ``A``: ``(B, padded, Dv)`` each; added to the parts of ``add_to`` (in
    place where the kernel allows) when given, so the hops of a backward pass accumulate."""
    batch, padded, features = g.shape
    glob = layout.globals
    band, to_globals, random, rows = add_to if add_to is not None else (None,) * PARTS
    chunks = (batch * layout.num_blocks, layout.geometry.block, features)
    band = band_scores(layout.geometry, g.reshape(chunks), z.reshape(chunks), band)
    random = gather.gather_dot(g.reshape(batch * padded, features),
                               z.reshape(batch * padded, features), random)
    global_keys = z.index_select(1, glob).transpose(1, 2)
    to_globals = g @ global_keys if to_globals is None else to_globals.baddbmm_(g, global_keys)
    z = z.transpose(1, 2)
    g_globals = g.index_select(1, glob)
    product = _per_token(g_globals, z)  # (B, G, padded)
    rows = product if rows is None else rows.add_(product)
    # the global rows replaced the global queries' parts
    for grad in (band.view(batch, padded, band.shape[-1]), to_globals):
        grad.index_fill_(1, glob, 0)
    return band, to_globals, random, rows


PARTS = 4  # tensors of one slice's attention: band, global keys, random keys, global rows


# The most rows (sequences x heads x tokens) one batched computation holds on the CPU. The hops
# read their iterate's rows in random order (the random keys) and stream the band over it: at
# 64 features a chunk of 2**16 rows is a 16 MiB table, which stays in this CPU's 32 MiB L3 cache,
# and every tensor of the chunk stays below glibc's 32 MiB mmap threshold, so its memory is
# reused step after step (:mod:`..allocator`) rather than mapped and page-faulted in again.
# Measured (K = 5 attention, 4 x 64 heads, 2 threads, 65,536 tokens): see the README.
CHUNK_ROWS = 2**16


@dataclass
class _Group:
    """Sequences of one length: their packed rows (sequence-major), their shared layout, and the
    random keys' gather index per number of stacked (sequence, head) pairs (a slice's size;
    made on first use)."""

    layout: BlockLayout
    rows: torch.Tensor  # (count * n,) positions in the packed tokens
    count: int
    first: int | None  # where the rows start when they are consecutive (no index needed)
    gathers: dict[int, GatherIndex] = field(default_factory=dict)

    def gather(self, batch: int) -> GatherIndex:
        if batch not in self.gathers:
            self.gathers[batch] = GatherIndex.build(self.layout.random_keys,
                                                    self.layout.random_mask, batch,
                                                    self.layout.padded)
        return self.gathers[batch]


@dataclass(frozen=True, eq=False)
class _Slice:
    """One batched computation: ``size`` consecutive (sequence, head) pairs of one group, from
    its pair ``first`` (pair ``c * H + h`` is head ``h`` of the group's sequence ``c``)."""

    group: _Group
    first: int
    size: int

    @property
    def layout(self) -> BlockLayout:
        return self.group.layout

    @property
    def gather(self) -> GatherIndex:
        return self.group.gather(self.size)

    def runs(self, heads: int) -> list[tuple[int, int, int, int]]:
        """The slice's pairs as rectangles ``(c0, c1, h0, h1)``: heads ``h0..h1`` of sequences
        ``c0..c1``, in the slice's order (a partial sequence is a rectangle of its own)."""
        runs, pair, end = [], self.first, self.first + self.size
        while pair < end:
            c, h = divmod(pair, heads)
            if h or end - pair < heads:  # part of one sequence's heads
                last = min(heads, h + end - pair)
                runs.append((c, c + 1, h, last))
                pair += last - h
            else:
                whole = (end - pair) // heads
                runs.append((c, c + whole, 0, heads))
                pair += whole * heads
        return runs

    def enter(self, tokens: torch.Tensor) -> torch.Tensor:
        """The slice's ``(size, padded, D)`` rows of its group's ``tokens: (count, n, H, D)``
        (padded with zeros)."""
        n, padded = self.layout.n, self.layout.padded
        slab = tokens.new_empty(self.size, padded, tokens.shape[-1])
        row = 0
        for c0, c1, h0, h1 in self.runs(tokens.shape[2]):
            rows = slab[row:row + (c1 - c0) * (h1 - h0), :n]
            rows.view(c1 - c0, h1 - h0, n, -1).copy_(tokens[c0:c1, :, h0:h1].transpose(1, 2))
            row += (c1 - c0) * (h1 - h0)
        if padded > n:
            slab[:, n:].zero_()
        return slab

    def leave(self, slab: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write the real rows of the slice's ``slab: (size, padded, D)`` into its group's
        ``tokens: (count, n, H, D)`` (:meth:`enter`'s adjoint, less the padding)."""
        n, row = self.layout.n, 0
        for c0, c1, h0, h1 in self.runs(tokens.shape[2]):
            rows = slab[row:row + (c1 - c0) * (h1 - h0), :n]
            tokens[c0:c1, :, h0:h1].copy_(rows.view(c1 - c0, h1 - h0, n, -1).transpose(1, 2))
            row += (c1 - c0) * (h1 - h0)


class BlockPlan:
    """Sequences grouped by length; each group is batched computations on its layout, with the
    sequences of the group next to the heads in the leading (batch) dimension, cut into slices
    of at most :data:`CHUNK_ROWS` rows on the CPU; the attention is :data:`PARTS` tensors per
    slice.

    The diffusion (:meth:`diffuse`) takes packed values and runs slice by slice: each slice's
    rows enter the head-major layout (:meth:`entered`), run every hop there and leave
    (:meth:`packed`) before the next slice's enter. :meth:`enter`, :meth:`leave` and
    :meth:`propagate` move and propagate the whole plan layout at once, every group's
    ``(count * H, padded, D)`` rows stacked into one ``(rows, D)`` tensor (the learned kernel's
    series keeps every power of ``A`` applied to ``v``).
    """

    name = "block"
    edge_order = False  # the band is held by blocks, not per edge

    def __init__(self, lengths: Sequence[int], spec: PatternSpec, device: torch.device) -> None:
        starts = np.cumsum([0, *lengths[:-1]])
        by_length: dict[int, list[int]] = {}
        for index, n in enumerate(lengths):
            by_length.setdefault(n, []).append(index)
        self.groups = []
        for n, members in by_length.items():
            rows = np.concatenate([np.arange(starts[i], starts[i] + n) for i in members])
            consecutive = bool((np.diff(rows) == 1).all())
            self.groups.append(_Group(_layout_on(n, spec, device),
                                      torch.from_numpy(rows).to(device), len(members),
                                      int(rows[0]) if consecutive else None))
        self.num_tokens = int(sum(lengths))
        self.rows_per_head = sum(group.count * group.layout.padded for group in self.groups)
        # on other devices one batched call per group: there the wider the better
        self.chunk_rows = CHUNK_ROWS if device.type == "cpu" else None
        self._slices: dict[int, list[_Slice]] = {}

    def slices(self, heads: int) -> list[_Slice]:
        """The batched computations of ``heads`` heads, in the order of the plan layout."""
        if heads not in self._slices:
            slices = []
            for group in self.groups:
                pairs = group.count * heads
                per = pairs if self.chunk_rows is None else max(
                    1, self.chunk_rows // group.layout.padded)
                slices += [_Slice(group, first, min(per, pairs - first))
                           for first in range(0, pairs, per)]
            self._slices[heads] = slices
        return self._slices[heads]

    def heads(self, x: torch.Tensor) -> int:
        """How many heads a tensor in the plan layout ``(rows, D)`` holds."""
        return x.shape[0] // self.rows_per_head

    def _slabs(self, x: torch.Tensor, heads: int) -> list[torch.Tensor]:
        """The plan layout ``(rows, D)`` cut into each slice's ``(size, padded, D)``."""
        slices = self.slices(heads)
        sizes = [piece.size * piece.layout.padded for piece in slices]
        # one slice: a view, not a split (whose backward would copy the whole gradient)
        parts = torch.split(x, sizes) if len(sizes) > 1 else (x,)
        return [part.view(-1, piece.layout.padded, x.shape[-1])
                for part, piece in zip(parts, slices, strict=True)]

    def per_slice(self, attention: tuple[torch.Tensor, ...], z: torch.Tensor
                  ) -> list[tuple[_Slice, tuple[torch.Tensor, ...], torch.Tensor]]:
        """Each slice with its attention parts and its slab of ``z`` (plan layout)."""
        heads = self.heads(z)
        return [(piece, attention[PARTS * i:PARTS * (i + 1)], slab) for i, (piece, slab) in
                enumerate(zip(self.slices(heads), self._slabs(z, heads), strict=True))]

    def entered(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each slice's ``(size, padded, D)`` rows of packed ``x: (N, H, D)`` (any strides),
        made one at a time as they are asked for."""
        for _, pieces in itertools.groupby(self.slices(x.shape[1]), lambda piece: id(piece.group)):
            tokens = None
            for piece in pieces:
                if tokens is None:
                    tokens = self.tokens(piece.group, x)
                yield piece.enter(tokens)

    def packed(self, slabs: Iterable[torch.Tensor], heads: int) -> torch.Tensor:
        """Packed ``(N, H, D)`` from the slices' ``(size, padded, D)`` slabs (:meth:`entered`'s
        adjoint, less the padding), each taken and let go before the next is asked for; the
        output is made once the first slab is."""
        slabs = iter(slabs)
        out: torch.Tensor | None = None
        for _, pieces in itertools.groupby(self.slices(heads), lambda piece: id(piece.group)):
            written = None  # the group's tokens of out
            for piece in pieces:
                slab = next(slabs)
                if out is None:
                    out = slab.new_empty(self.num_tokens, heads, slab.shape[-1])
                group = piece.group
                if written is None:
                    written = (self.tokens(group, out) if group.first is not None else
                               out.new_empty(group.count, group.layout.n, *out.shape[1:]))
                piece.leave(slab, written)
                del slab
            if piece.group.first is None:
                assert out is not None and written is not None
                out.index_copy_(0, piece.group.rows, written.flatten(0, 1))
        assert out is not None
        return out

    def map_slices(self, attention: tuple[torch.Tensor, ...], x: torch.Tensor,
                   fn: Callable[[_Slice, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
        """``fn(slice, its attention parts, its slab of x)`` for every slice of packed
        ``x: (N, H, D)`` (any strides), the ``(size, padded, D')`` results packed as
        ``(N, H, D')``. The slices enter and leave one at a time: no tensor of the whole plan
        layout is made."""
        def results() -> Iterator[torch.Tensor]:
            slabs = self.entered(x)
            for i, piece in enumerate(self.slices(x.shape[1])):
                # the slab goes straight to fn: no name here keeps it while fn runs
                yield fn(piece, attention[PARTS * i:PARTS * (i + 1)], next(slabs))

        return self.packed(results(), x.shape[1])

    @staticmethod
    def tokens(group: _Group, x: torch.Tensor) -> torch.Tensor:
        """The group's tokens of packed ``x: (N, H, D)`` as ``(count, n, H, D)``: a view where
        its rows are consecutive, else a copy."""
        if group.first is None:
            rows = x.index_select(0, group.rows)
        else:
            rows = x.narrow(0, group.first, group.rows.numel())
        return rows.unflatten(0, (group.count, group.layout.n))

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``x: (N, H, D)`` -> the plan layout ``(rows, D)``."""
        heads, dim = x.shape[1], x.shape[2]
        slabs = []
        for group in self.groups:
            n, padded = group.layout.n, group.layout.padded
            if group.first is None:
                rows = x.index_select(0, group.rows)
            elif group.rows.numel() < x.shape[0]:
                rows = x.narrow(0, group.first, group.rows.numel())
            else:  # the group holds every token in order
                rows = x
            rows = rows.view(group.count, n, heads, dim)
            if padded > n:
                rows = F.pad(rows, (0, 0, 0, 0, 0, padded - n))
            # contiguous even where reshape could keep a view (one head sliced out of several):
            # the band products read windows as strided views of contiguous rows
            slabs.append(rows.permute(0, 2, 1, 3).reshape(-1, dim).contiguous())
        return slabs[0] if len(slabs) == 1 else torch.cat(slabs)

    def leave(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """The plan layout ``(rows, D)`` -> packed ``(N, H, D)``."""
        dim = x.shape[-1]
        sizes = [group.count * heads * group.layout.padded for group in self.groups]
        tokens = []
        for group, slab in zip(self.groups, torch.split(x, sizes) if len(sizes) > 1 else (x,),
                               strict=True):
            rows = slab.view(group.count, heads, -1, dim)
            if group.layout.padded > group.layout.n:  # a slice's backward zero-fills its input
                rows = rows[:, :, :group.layout.n]
            tokens.append(rows.permute(0, 2, 1, 3).reshape(-1, heads, dim))
        if len(self.groups) == 1 and self.groups[0].first == 0:
            return tokens[0]  # one group holding every token in order
        out = x.new_empty(self.num_tokens, heads, dim)
        for group, rows in zip(self.groups, tokens, strict=True):
            out = out.index_copy(0, group.rows, rows)
        return out

    def attention(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensor for piece, q_slab, k_slab in zip(
            self.slices(q.shape[1]), _Enter.apply(self, q), _Enter.apply(self, k), strict=True)
            for tensor in _attention_parts(piece.layout, q_slab, k_slab, piece.gather))

    def propagate(self, attention: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor:
        """One hop in the plan layout: ``z: (rows, D)`` from :meth:`enter`."""
        hops = [self.propagate_slice(piece, parts, slab).reshape(-1, z.shape[-1])
                for piece, parts, slab in self.per_slice(attention, z)]
        return hops[0] if len(hops) == 1 else torch.cat(hops)

    def propagate_slice(self, piece: _Slice, parts: tuple[torch.Tensor, ...],
                        z: torch.Tensor) -> torch.Tensor:
        """One hop of one slice: ``A z`` for its ``z: (size, padded, D)`` and its parts."""
        return _propagate_one(piece.layout, parts, z, piece.gather)

    def diffuse(self, attention: tuple[torch.Tensor, ...], v: torch.Tensor, diffusion: Diffusion,
                hop_dropout: float, after_mix: bool = False) -> torch.Tensor:
        """The K-hop series of packed ``v: (N, H, Dv)``, packed, with its gradient by the
        adjoint series (:class:`_Diffusion`)."""
        return _Diffusion.apply(self, diffusion, (hop_dropout, after_mix), v, *attention)

    def edge_attention(self, attention: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise ValueError("the block engine holds attention in blocks, not per edge; use the "
                         "dgl or gather engine for edge attention")


class _Enter(torch.autograd.Function):
    """Packed ``x: (N, H, D)`` -> every slice's ``(size, padded, D)`` rows; backward packs their
    gradients into one (the slices' own autograd copies would each make a zero-filled gradient
    of all of ``x``)."""

    @staticmethod
    def forward(ctx: Any, plan: BlockPlan, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan, ctx.heads = plan, x.shape[1]
        return tuple(plan.entered(x))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return None, ctx.plan.packed(grads, ctx.heads)


class _Diffusion(torch.autograd.Function):
    """``sum_k theta_k A^k v`` (Horner, dropout on every ``A z``) from packed ``v: (N, H, Dv)``
    to packed, slice by slice, whose backward runs the adjoint series: the gradient flows back
    through ``A^T`` hop by hop, and each hop adds its part of the gradient of ``A`` (its
    gradient against its input) to the others' inside the matmuls, so nothing is stacked or
    concatenated and no hop's gradient outlives its hop. A slice enters the plan layout, runs
    its hops to the end and leaves it before the next slice enters: only its tensors are being
    read and written (see :data:`CHUNK_ROWS`). The first hop's input, a slice's rows of ``v``,
    is not kept: backward takes it from ``v`` again."""

    @staticmethod
    def forward(ctx: Any, plan: BlockPlan, diffusion: Diffusion, dropout: tuple[float, bool],
                v: torch.Tensor, *attention: torch.Tensor) -> torch.Tensor:
        hop_dropout, after_mix = dropout
        # the hops' inputs serve only the gradient of A: not kept in inference or for v alone
        keep_inputs = any(ctx.needs_input_grad[4:])
        inputs: list[torch.Tensor] = []  # slice after slice: the inputs of hops 2..K
        masks: list[torch.Tensor] = []  # slice after slice: the K hops' dropout masks

        def drop(z: torch.Tensor) -> torch.Tensor:
            keep = torch.empty_like(z).bernoulli_(1 - hop_dropout).bool()
            masks.append(keep)
            return z * keep / (1 - hop_dropout)

        def series(piece: _Slice, parts: tuple[torch.Tensor, ...],
                   v_slab: torch.Tensor) -> torch.Tensor:
            def hop(z: torch.Tensor) -> torch.Tensor:
                if keep_inputs and z is not v_slab:
                    inputs.append(z)
                out = plan.propagate_slice(piece, parts, z)
                return drop(out) if hop_dropout and not after_mix else out

            # every hop's output is new and kept by nothing yet: theta_k v is added into it
            return diffusion.apply(hop, v_slab, drop if hop_dropout and after_mix else None,
                                   in_place=True)

        out = plan.map_slices(attention, v, series)
        ctx.plan, ctx.diffusion, ctx.hop_dropout = plan, diffusion, hop_dropout
        ctx.after_mix, ctx.parts, ctx.inputs = after_mix, len(attention), keep_inputs
        ctx.later_inputs = len(inputs)
        ctx.save_for_backward(*attention, *((v,) if keep_inputs else ()), *inputs, *masks)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        hops = ctx.diffusion.hops
        attention, rest = ctx.saved_tensors[:ctx.parts], ctx.saved_tensors[ctx.parts:]
        v = rest[0] if ctx.inputs else None
        later = hops - 1 if ctx.inputs else 0  # hop inputs kept per slice
        assert ctx.later_inputs == later * len(ctx.plan.slices(grad.shape[1]))
        inputs = rest[ctx.inputs:ctx.inputs + ctx.later_inputs]
        masks = rest[ctx.inputs + ctx.later_inputs:]
        v_tokens: list[Any] = [None, None]  # a group and its tokens of v, one group at a time
        attention_grads: list[torch.Tensor | None] = []

        def adjoint(piece: _Slice, parts: tuple[torch.Tensor, ...],
                    g_slab: torch.Tensor) -> torch.Tensor:
            index = len(attention_grads) // PARTS

            def hop_input(hop: int) -> torch.Tensor:
                if hop:
                    return inputs[index * later + hop - 1]
                if v_tokens[0] is not piece.group:  # hop 0's input: entered when needed, last
                    v_tokens[:] = piece.group, ctx.plan.tokens(piece.group, v)
                return piece.enter(v_tokens[1])

            handed = [g_slab]  # only the first hop reads it: not held through the others
            del g_slab
            grad_v, grads = _adjoint_series(ctx, piece, parts, handed,
                                            hop_input if v is not None else None,
                                            masks[index * hops:(index + 1) * hops])
            attention_grads.extend(grads if grads is not None else [None] * PARTS)
            return grad_v

        # the slices copy their rows of the gradient (of any strides: a loss such as out.sum()
        # hands back an expanded one, which the batched matmuls would read 4-5x slower)
        grad_v = ctx.plan.map_slices(attention, grad, adjoint)
        return (None, None, None, grad_v, *attention_grads)


def _adjoint_series(ctx: Any, piece: _Slice, parts: tuple[torch.Tensor, ...],
                    handed: list[torch.Tensor], hop_input: Callable[[int], torch.Tensor] | None,
                    kept: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """One slice's gradients of ``v`` and of its attention parts (None without ``hop_input``,
    which gives a hop's input) from the gradient of its output, handed over as the one item of
    ``handed`` (taken out, so it is freed once used), by the adjoint series of
    :class:`_Diffusion`. ``kept``: the hops' dropout masks."""
    grad = handed.pop()
    theta, hops = ctx.diffusion.coefficients, ctx.diffusion.hops
    attention_grads = None
    grad_v: torch.Tensor | None = None  # made by its first term, not zeros plus it

    def add_to_grad_v(term: torch.Tensor, weight: float) -> torch.Tensor:
        return term * weight if grad_v is None else grad_v.add_(term, alpha=weight)

    layout, gather = piece.layout, piece.gather
    transposed = _transposed_parts(layout, parts, gather)
    for index in reversed(range(hops)):  # hop `index` added theta[hops - 1 - index] * v
        if kept and ctx.after_mix:
            grad = grad * kept[index] / (1 - ctx.hop_dropout)
        if theta[hops - 1 - index]:
            grad_v = add_to_grad_v(grad, theta[hops - 1 - index])
        scale = theta[-1] if index == 0 else 1.0  # the first hop propagated v, then scaled
        if kept and not ctx.after_mix:
            grad = grad * kept[index] * (scale / (1 - ctx.hop_dropout))
        elif scale != 1:
            grad = grad * scale
        if hop_input is not None:
            attention_grads = _attention_grads(layout, grad, hop_input(index), gather,
                                               attention_grads)
        grad = _propagate_transposed(layout, transposed, grad, gather)
    grad_v = grad if grad_v is None else grad_v.add_(grad)  # grad is this function's own
    return grad_v, attention_grads
