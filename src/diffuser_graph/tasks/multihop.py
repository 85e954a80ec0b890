"""Multi-hop probe: pointer chasing over facts scattered through a long sequence.

A sequence holds facts ``x -> y`` (three tokens: symbol, arrow, symbol) at random places among
filler tokens, and ends with a query ``? a``. The facts contain a chain
``a -> b -> c -> ...`` of ``chain`` links plus distractor facts; every symbol has at most one
outgoing fact, so the answer is unambiguous: the symbol reached from ``a`` after ``chain`` links.
Answering needs the query to gather the first fact, that fact's target to gather the next one,
and so on: facts that sit far apart must be chained, which is what attention diffusion offers in
one layer and one-hop sparse attention does not.

Tokens: ``<pad>``, ``<cls>``, ``.`` (filler), ``->``, ``?`` and ``num_symbols`` symbols; the
label is the answer symbol's index (``num_symbols`` classes).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..checks import Int
from .base import Split, TaskData
from .vocab import CLS_ID, NUM_SPECIAL

FILLER, ARROW, QUERY = NUM_SPECIAL, NUM_SPECIAL + 1, NUM_SPECIAL + 2
FIRST_SYMBOL = NUM_SPECIAL + 3


class MultiHopTask(BaseModel):
    """Config of the pointer-chasing probe (``task: {name: multihop, ...}``)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["multihop"] = "multihop"
    seq_len: Int = Field(default=1024, ge=16)  # tokens including <cls> and the query
    num_symbols: Int = Field(default=16, ge=3)
    chain: Int = Field(default=3, ge=1)  # links to follow from the queried symbol
    distractors: Int = Field(default=8, ge=0)  # facts not on the chain
    train_size: Int = Field(default=8000, ge=1)
    val_size: Int = Field(default=1000, ge=1)
    test_size: Int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> MultiHopTask:
        facts = self.chain + self.distractors
        if self.chain + 1 + self.distractors > self.num_symbols:
            raise ValueError(f"chain + 1 + distractors = {self.chain + 1 + self.distractors} "
                             f"symbols with an outgoing or final fact, but num_symbols is "
                             f"{self.num_symbols}")
        if 3 * facts + 3 > self.seq_len:
            raise ValueError(f"{facts} facts need {3 * facts + 3} tokens but seq_len is "
                             f"{self.seq_len}")
        return self


def make_example(task: MultiHopTask, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One sequence and its answer (the symbol index reached after ``chain`` links)."""
    symbols = rng.permutation(task.num_symbols)
    chain = symbols[: task.chain + 1]  # a -> b -> ... ; the last one has no outgoing fact
    sources = symbols[task.chain + 1: task.chain + 1 + task.distractors]
    facts = [(chain[i], chain[i + 1]) for i in range(task.chain)]
    facts += [(source, rng.integers(task.num_symbols)) for source in sources]
    order = rng.permutation(len(facts))
    body = task.seq_len - 3  # <cls> ... ? a
    free = body - 3 * len(facts)
    # Spread the facts: choose where each begins among the filler, keeping them in one piece.
    gaps = np.sort(rng.choice(free + len(facts), size=len(facts), replace=False))
    tokens = np.full(body, FILLER, dtype=np.int64)
    for slot, (fact, gap) in enumerate(zip(order, gaps, strict=True)):
        start = gap - slot + 3 * slot
        x, y = facts[fact]
        tokens[start:start + 3] = (FIRST_SYMBOL + x, ARROW, FIRST_SYMBOL + y)
    sequence = np.concatenate([[CLS_ID], tokens, [QUERY, FIRST_SYMBOL + chain[0]]])
    return sequence, int(chain[-1])


def answer(sequence: np.ndarray) -> int:
    """Follow the facts of ``sequence`` from its queried symbol (an independent solver)."""
    pointer = {}
    tokens = list(sequence)
    for i in range(len(tokens) - 2):
        if tokens[i + 1] == ARROW and tokens[i] >= FIRST_SYMBOL:
            pointer[tokens[i]] = tokens[i + 2]
    symbol = tokens[-1]
    while symbol in pointer:
        symbol = pointer[symbol]
    return int(symbol - FIRST_SYMBOL)


def load(task: MultiHopTask, seed: int) -> TaskData:
    rng = np.random.default_rng([seed, 0x40B])
    splits = {}
    for name in ("train", "val", "test"):
        examples = [make_example(task, rng) for _ in range(getattr(task, f"{name}_size"))]
        splits[name] = Split([e[0] for e in examples], np.array([e[1] for e in examples]))
    return TaskData.from_splits(splits, vocab_size=FIRST_SYMBOL + task.num_symbols,
                                num_labels=task.num_symbols)
