"""ListOps (Long Range Arena): evaluate nested MAX/MIN/MED/SM expressions over digits.

``[MAX 2 9 [MIN 4 7 ] 0 ]`` evaluates to 9. MED is the median rounded down (LRA:
``int(np.median(x))``), SM the sum modulo 10; the answer (0-9) is the label. Our generator draws
random expression trees deterministically from the seed, keeping those whose length falls in
the configured range. ``path`` reads LRA's released TSV files instead (``Source<TAB>Target``
with a header; ``basic_train.tsv``, ``basic_val.tsv``, ``basic_test.tsv``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..checks import Float, Int, UserPath
from ..io import read_rows
from .base import DataError, Split, TaskData, check_folder
from .vocab import CLS_ID

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
VOCAB = ["<pad>", "<cls>", *[str(d) for d in range(10)], *OPERATORS, CLOSE]
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
LRA_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}

Tree = int | tuple  # a digit, or (operator, [children])


class ListOpsTask(BaseModel):
    """Config of the ListOps task (``task: {name: listops, ...}``)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["listops"] = "listops"
    path: UserPath | None = None  # folder with LRA's basic_{train,val,test}.tsv
    max_depth: Int = Field(default=10, ge=1)
    max_args: Int = Field(default=10, ge=2)
    min_length: Int = Field(default=500, ge=1)
    max_length: Int = Field(default=2000, ge=1)
    leaf_probability: Float = Field(default=0.75, ge=0, lt=1)  # LRA: a digit w.p. 0.75
    train_size: Int = Field(default=96000, ge=1)
    val_size: Int = Field(default=2000, ge=1)
    test_size: Int = Field(default=2000, ge=1)

    @model_validator(mode="after")
    def _lengths(self) -> ListOpsTask:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must be <= max_length "
                             f"({self.max_length})")
        return self


def evaluate(tree: Tree) -> int:
    """The value (0-9) of an expression tree."""
    if isinstance(tree, int):
        return tree
    operator, children = tree
    values = [evaluate(child) for child in children]
    if operator == "[MAX":
        return max(values)
    if operator == "[MIN":
        return min(values)
    if operator == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def to_tokens(tree: Tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    operator, children = tree
    return [operator, *(token for child in children for token in to_tokens(child)), CLOSE]


def parse(tokens: list[str]) -> Tree:
    """Inverse of :func:`to_tokens`; raises ``ValueError`` on malformed expressions."""
    stack: list[tuple] = []
    result: Tree | None = None
    for token in tokens:
        if token in OPERATORS:
            stack.append((token, []))
        elif token == CLOSE:
            if not stack:
                raise ValueError("']' without an open operator")
            node = stack.pop()
            if not node[1]:
                raise ValueError(f"operator {node[0]} has no arguments")
            if stack:
                stack[-1][1].append(node)
            elif result is None:
                result = node
            else:
                raise ValueError("more than one top-level expression")
        elif token.isdigit() and len(token) == 1:
            if stack:
                stack[-1][1].append(int(token))
            elif result is None:
                result = int(token)
            else:
                raise ValueError("more than one top-level expression")
        else:
            raise ValueError(f"unknown token {token!r}")
    if stack or result is None:
        raise ValueError("unbalanced expression")
    return result


class _TooLong(Exception):
    """A tree being grown has passed ``max_length`` tokens: stop and draw another."""


def random_tree(rng: np.random.Generator, task: ListOpsTask) -> Tree | None:
    """A random expression, or None as soon as it would exceed ``task.max_length`` tokens."""
    budget = [task.max_length]

    def grow(depth: int) -> Tree:
        if depth >= task.max_depth or (depth > 1 and rng.random() < task.leaf_probability):
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooLong
            return int(rng.integers(10))
        budget[0] -= 2  # the operator and its closing bracket
        if budget[0] < 0:
            raise _TooLong
        operator = OPERATORS[int(rng.integers(len(OPERATORS)))]
        arity = int(rng.integers(2, task.max_args + 1))
        return operator, [grow(depth + 1) for _ in range(arity)]

    try:
        return grow(1)
    except _TooLong:
        return None


def encode(tokens: list[str]) -> np.ndarray:
    return np.array([CLS_ID, *(TOKEN_ID[t] for t in tokens)], dtype=np.int64)


def decode(ids: Iterable[int]) -> str:
    return " ".join(VOCAB[int(i)] for i in ids if int(i) > CLS_ID)


def generate(task: ListOpsTask, size: int, rng: np.random.Generator,
             max_tries_per_example: int = 2000) -> Split:
    """``size`` expressions with ``min_length <= tokens <= max_length`` (tokens exclude CLS)."""
    sequences: list[np.ndarray] = []
    labels: list[int] = []
    tries = 0
    while len(sequences) < size:
        tree = random_tree(rng, task)
        tokens = to_tokens(tree) if tree is not None else []
        tries += 1
        if tree is not None and task.min_length <= len(tokens) <= task.max_length:
            sequences.append(encode(tokens))
            labels.append(evaluate(tree))
        elif tries > max_tries_per_example * (len(sequences) + 1):
            raise ValueError(
                f"ListOps generator found only {len(sequences)} of {size} expressions with "
                f"{task.min_length}..{task.max_length} tokens after {tries} tries; widen the "
                f"length range or change max_depth ({task.max_depth}) / max_args "
                f"({task.max_args})")
    return Split(sequences, np.array(labels))


def read_lra_tsv(path: Path) -> Split:
    """LRA's ListOps TSV: header ``Source<TAB>Target``; parentheses in sources are ignored."""
    sequences, labels = [], []
    rows = read_rows(path, delimiter="\t")
    first = next(rows, None)
    if first is None:
        raise DataError(path, None, "file is empty")
    if [h.strip() for h in first[1]] != ["Source", "Target"]:
        raise DataError(path, first[0], f"header must be 'Source<TAB>Target', got {first[1]}")
    for line, row in rows:
        if len(row) != 2:
            raise DataError(path, line, f"expected 2 tab-separated columns, got {len(row)}")
        tokens = row[0].replace("(", " ").replace(")", " ").split()
        try:
            tree = parse(tokens)
        except ValueError as err:
            raise DataError(path, line, f"malformed expression: {err}") from None
        try:
            label = int(row[1])
        except ValueError:
            raise DataError(path, line, f"label must be an integer 0-9, got {row[1]!r}") from None
        if not 0 <= label <= 9:
            raise DataError(path, line, f"label must be in 0-9, got {label}")
        if evaluate(tree) != label:
            raise DataError(path, line, f"label {label} disagrees with the expression's "
                                        f"value {evaluate(tree)}")
        sequences.append(encode(tokens))
        labels.append(label)
    if not sequences:
        raise DataError(path, None, "file has a header but no examples")
    return Split(sequences, np.array(labels))


def load(task: ListOpsTask, seed: int) -> TaskData:
    """Generated splits (deterministic in ``seed``) or LRA's TSV files under ``task.path``."""
    if task.path is not None:
        folder = check_folder(Path(task.path))
        splits = {name: read_lra_tsv(folder / file) for name, file in LRA_FILES.items()}
    else:
        rng = np.random.default_rng([seed, 0x11570])
        splits = {name: generate(task, getattr(task, f"{name}_size"), rng)
                  for name in ("train", "val", "test")}
    return TaskData.from_splits(splits, vocab_size=len(VOCAB), num_labels=10, decode=decode)
