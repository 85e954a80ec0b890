"""Sparse attention patterns as edge lists.

Convention used everywhere in this package: an edge ``u -> v`` means *query token v attends to
key token u*. DGL's ``edge_softmax`` normalises over each node's incoming edges, so it is a
softmax over a query's keys. Every pattern contains all self-loops.

Three kinds of pattern are described by one validated value, :class:`PatternSpec`:

* ``kind="window"``: a centred 1-D sliding window (``window`` tokens on each side, spaced by
  ``dilation``), global tokens and ``num_random`` random keys per query.
* ``kind="grid"``: the 2-D analogue for images flattened row-major: a (2w+1) x (2w+1)
  neighbourhood on an ``image_size = (H, W)`` pixel grid, plus globals and random keys.
* ``kind="official"``: a bit-for-bit reproduction of the authors' released construction
  (see :func:`official_pattern`).

``causal=True`` keeps only edges from earlier to later tokens (``u <= v``), for language models.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from .checks import Int

PatternKind = Literal["window", "grid", "official"]

# Defaults per kind: the official ones are the authors' (shared/paper.md section 5).
_KIND_DEFAULTS = {
    "window": {"window": 32, "num_global": 0, "num_random": 0},
    "grid": {"window": 1, "num_global": 0, "num_random": 0},
    "official": {"window": 64, "num_global": 64, "num_random": 64},
}


class PatternSpec(BaseModel):
    """Which keys each query attends to. Frozen and hashable, so it can key caches.

    Fields (all validated; a wrong value raises ``pydantic.ValidationError``, a ``ValueError``,
    naming the field):

    - ``kind``: ``"window"`` (1-D), ``"grid"`` (2-D images) or ``"official"`` (authors' code).
    - ``window``: ``window``/``grid``: tokens (pixels) on each side, >= 0 (default 32 / 1).
      ``official``: block width w of the overlapping blocks, even and >= 2 (default 64).
    - ``dilation``: spacing of window offsets, >= 1 (not used by ``official``).
    - ``num_global``: ``window``/``grid``: the first ``num_global`` tokens are global (attend to
      all, attended by all). ``official``: number of globals drawn at random from
      ``range(w, max_len)``.
    - ``global_positions``: explicit global token positions (``window``/``grid`` only); used
      instead of ``num_global``.
    - ``num_random``: random keys per query (``window``/``grid``: exactly that many distinct keys
      not already in the pattern, or all remaining keys if fewer exist). ``official``: the
      authors' ``num_rand`` (``max_len * num_rand`` random entries of the max_len^2 grid).
      ``num_global`` and ``num_random`` default to 0, or to the authors' 64 for ``official``.
    - ``image_size``: ``(H, W)`` for ``grid``; the sequence length must be ``H * W``.
    - ``max_len``: the authors' ``max_len`` for ``official``; sequences must not be longer.
    - ``causal``: keep only edges ``u -> v`` with ``u <= v``.
    - ``seed``: seeds the random keys (``official`` always uses the authors' seed 0).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: PatternKind = "window"
    # window, num_global and num_random default per kind (_KIND_DEFAULTS); these are "window"'s.
    window: Int = Field(default=32, ge=0)
    dilation: Int = Field(default=1, ge=1)
    num_global: Int = Field(default=0, ge=0)
    global_positions: tuple[Int, ...] | None = None
    num_random: Int = Field(default=0, ge=0)
    image_size: tuple[Int, Int] | None = None
    max_len: Int = Field(default=4096, ge=1)
    causal: StrictBool = False
    seed: Int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            kind = data.get("kind", "window")
            for name, value in _KIND_DEFAULTS.get(kind, {}).items():
                if data.get(name) is None:
                    data = {**data, name: value}
        return data

    @model_validator(mode="after")
    def _check_kind_fields(self) -> PatternSpec:
        if self.kind == "official":
            if self.window < 2 or self.window % 2:
                raise ValueError(
                    f"window (the official block width w) must be even and >= 2, got {self.window}"
                )
            if self.global_positions is not None:
                raise ValueError("global_positions is not used by kind='official'; use num_global")
            if self.dilation != 1:
                raise ValueError("dilation is not used by kind='official'; leave it at 1")
            if self.num_global > self.max_len - self.window:
                raise ValueError(
                    f"num_global must be <= max_len - window = {self.max_len - self.window} "
                    f"for kind='official', got {self.num_global}"
                )
        if self.kind == "grid":
            if self.image_size is None or len(self.image_size) != 2 or min(self.image_size) < 1:
                raise ValueError(
                    f"image_size must be (H, W) with H, W >= 1 for kind='grid', got "
                    f"{self.image_size}"
                )
        elif self.image_size is not None:
            raise ValueError(f"image_size is only used by kind='grid', not kind={self.kind!r}")
        if self.global_positions is not None:
            if any(p < 0 for p in self.global_positions):
                raise ValueError(f"global_positions must be >= 0, got {self.global_positions}")
            if len(set(self.global_positions)) != len(self.global_positions):
                raise ValueError(f"global_positions has duplicates: {self.global_positions}")
        return self

    def globals_for(self, seq_len: int) -> np.ndarray:
        """Global token positions for a sequence of ``seq_len`` tokens (``window``/``grid``)."""
        if self.global_positions is not None:
            positions = np.asarray(self.global_positions, dtype=np.int64)
            if positions.size and positions.max() >= seq_len:
                raise ValueError(
                    f"global_positions must be < seq_len={seq_len}, got max {positions.max()}"
                )
            return np.sort(positions)
        if self.num_global > seq_len:
            raise ValueError(
                f"num_global={self.num_global} exceeds the number of tokens seq_len={seq_len}"
            )
        return np.arange(self.num_global, dtype=np.int64)


def _check_seq_len(seq_len: int) -> int:
    if isinstance(seq_len, (bool, np.bool_)) or not isinstance(seq_len, (int, np.integer)):
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return int(seq_len)


def _unique_edges(src: np.ndarray, dst: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicate and sort edges by (dst, src): each query's keys are contiguous."""
    code = np.unique(dst.astype(np.int64) * n + src.astype(np.int64))
    return code % n, code // n


def _window_edges(n: int, window: int, dilation: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = dilation * np.arange(-window, window + 1, dtype=np.int64)
    dst = np.repeat(np.arange(n, dtype=np.int64), offsets.size)
    src = dst + np.tile(offsets, n)
    keep = (src >= 0) & (src < n)
    return src[keep], dst[keep]


def _grid_edges(
    height: int, width: int, radius: int, dilation: int
) -> tuple[np.ndarray, np.ndarray]:
    steps = dilation * np.arange(-radius, radius + 1, dtype=np.int64)
    dy, dx = (a.ravel() for a in np.meshgrid(steps, steps, indexing="ij"))
    rows, cols = (a.ravel() for a in np.meshgrid(
        np.arange(height, dtype=np.int64), np.arange(width, dtype=np.int64), indexing="ij"))
    key_rows = rows[:, None] + dy[None, :]
    key_cols = cols[:, None] + dx[None, :]
    keep = (key_rows >= 0) & (key_rows < height) & (key_cols >= 0) & (key_cols < width)
    dst = np.broadcast_to((rows * width + cols)[:, None], keep.shape)[keep]
    src = (key_rows * width + key_cols)[keep]
    return src, dst


def _global_edges(n: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    everyone = np.arange(n, dtype=np.int64)
    src = np.concatenate([np.repeat(positions, n), np.tile(everyone, positions.size)])
    dst = np.concatenate([np.tile(everyone, positions.size), np.repeat(positions, n)])
    return src, dst


def _random_edges(
    n: int, existing_code: np.ndarray, num_random: int, causal: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``num_random`` distinct new keys per query, avoiding ``existing_code`` (= dst * n + src).

    Queries with too few free keys get all of them. Sampling is vectorised rejection sampling;
    queries whose free keys are scarce are completed exactly with a permutation.
    """
    queries = np.arange(n, dtype=np.int64)
    num_candidates = queries + 1 if causal else np.full(n, n, dtype=np.int64)
    existing_per_query = np.bincount(existing_code // n, minlength=n)
    wanted = np.minimum(num_random, num_candidates - existing_per_query)
    taken = existing_code  # sorted codes of edges that may not be drawn again
    new_codes = []
    remaining = wanted.copy()
    for _ in range(8):
        active = np.flatnonzero(remaining > 0)
        if active.size == 0:
            break
        # Oversample so most queries fill in one round.
        draws = np.repeat(active, 2 * remaining[active])
        keys = (rng.random(draws.size) * num_candidates[draws]).astype(np.int64)
        code = draws * n + keys
        code = code[~np.isin(code, taken)]
        code, first = np.unique(code, return_index=True)
        code = code[np.argsort(first)]  # keep draw order so truncation below is unbiased
        rank = _rank_within_group(code // n)
        code = code[rank < remaining[code // n]]
        new_codes.append(code)
        taken = np.union1d(taken, code)
        remaining -= np.bincount(code // n, minlength=n)
    for query in np.flatnonzero(remaining > 0):  # scarce free keys: finish exactly
        free = np.setdiff1d(np.arange(num_candidates[query]), taken[taken // n == query] % n)
        pick = rng.permutation(free)[: remaining[query]]
        new_codes.append(query * n + pick)
    code = np.concatenate(new_codes) if new_codes else np.zeros(0, dtype=np.int64)
    return code % n, code // n


def _rank_within_group(groups: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group value (stable)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run_lengths = np.diff(np.r_[starts, sorted_groups.size])
    rank_sorted = np.arange(sorted_groups.size) - np.repeat(starts, run_lengths)
    rank = np.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


@lru_cache(maxsize=8)
def _official_adjacency(window: int, num_rand: int, num_glob: int, max_len: int) -> np.ndarray:
    """The authors' full ``max_len x max_len`` adjacency (rows are sources), built their way."""
    adj = np.zeros((max_len, max_len), dtype=bool)
    stride = window // 2
    for i in range(max_len // stride - 1):
        start = i * stride
        adj[start:start + window, start:start + window] = True
    legacy = np.random.RandomState(0)  # same stream as the authors' np.random.seed(0)
    idx = legacy.choice(np.arange(max_len * max_len), max_len * num_rand, replace=False)
    adj[idx % max_len, idx // max_len] = True
    glob = legacy.choice(np.arange(window, max_len), num_glob, replace=False)
    adj[glob, :] = True
    adj[:, glob] = True
    adj.setflags(write=False)
    return adj


def official_pattern(
    seq_len: int,
    attention_window: int = 64,
    num_rand: int = 64,
    num_glob: int = 64,
    max_len: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``(src, dst)`` of the authors' released pattern for a sequence of ``seq_len`` tokens.

    Overlapping blocks of width ``attention_window`` with stride ``attention_window / 2``; then,
    after ``np.random.seed(0)``, ``max_len * num_rand`` distinct entries of the ``max_len^2`` grid
    (row ``idx % max_len`` is the source); then ``num_glob`` global tokens drawn from
    ``range(attention_window, max_len)``. The graph for length L is the top-left L x L block.
    Edge counts: 148,938 (L=1024), 386,268 (2048), 1,147,411 (4096) with the defaults.
    """
    spec = PatternSpec(kind="official", window=attention_window, num_random=num_rand,
                       num_global=num_glob, max_len=max_len)
    return pattern_edges(seq_len, spec)


def pattern_edges(seq_len: int, spec: PatternSpec) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``(src, dst)`` (int64 arrays of length E) of ``spec`` for ``seq_len`` tokens.

    Edges are unique, include every self-loop and are sorted by ``(dst, src)``.
    """
    if not isinstance(spec, PatternSpec):
        raise ValueError(f"spec must be a PatternSpec, got {type(spec).__name__}")
    n = _check_seq_len(seq_len)
    if spec.kind == "official":
        if n > spec.max_len:
            raise ValueError(f"seq_len={n} exceeds the official pattern's max_len={spec.max_len}")
        adj = _official_adjacency(spec.window, spec.num_random, spec.num_global, spec.max_len)
        src, dst = np.nonzero(adj[:n, :n])
        # The authors' blocks cover the diagonal whenever max_len is a multiple of w/2; adding
        # self-loops keeps "every token attends to itself" true for any other max_len too.
        src, dst = np.concatenate([src, np.arange(n)]), np.concatenate([dst, np.arange(n)])
        src, dst = _unique_edges(src, dst, n)
        return _causal_filter(src, dst, spec.causal)
    if spec.kind == "grid":
        assert spec.image_size is not None  # required for kind="grid" by the validator
        height, width = spec.image_size
        if n != height * width:
            raise ValueError(
                f"seq_len={n} must equal H*W={height * width} for image_size={spec.image_size}"
            )
        src, dst = _grid_edges(height, width, spec.window, spec.dilation)
    else:
        src, dst = _window_edges(n, spec.window, spec.dilation)
    gsrc, gdst = _global_edges(n, spec.globals_for(n))
    src, dst = _causal_filter(np.concatenate([src, gsrc]), np.concatenate([dst, gdst]), spec.causal)
    src, dst = _unique_edges(src, dst, n)
    if spec.num_random:
        rng = np.random.default_rng(spec.seed)
        rsrc, rdst = _random_edges(n, dst * n + src, spec.num_random, spec.causal, rng)
        src, dst = _unique_edges(np.concatenate([src, rsrc]), np.concatenate([dst, rdst]), n)
    return src, dst


def _causal_filter(src: np.ndarray, dst: np.ndarray, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    if not causal:
        return src, dst
    keep = src <= dst
    return src[keep], dst[keep]
