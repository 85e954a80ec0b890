"""What every task produces: token-id sequences with labels, split three ways, and batching.

A task turns a config into :class:`TaskData`: ``train``/``val``/``test`` splits (unpadded int64
token arrays with one label each, :class:`Split`, or for language modelling a target token per
position, :class:`TokenSplit`), the vocabulary size, the number of labels and the kind of model
``head`` it needs.
:func:`collate` pads a list of examples into the tensors the models take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..io import DataError
from .vocab import IGNORE_INDEX, PAD_ID

Indices = Sequence[int] | np.ndarray


def check_folder(folder: Path) -> Path:
    """``folder`` if it is an existing folder, else :class:`DataError` saying what it is."""
    if not folder.is_dir():
        raise DataError(folder, None, "is a file, not a folder" if folder.exists()
                        else "folder does not exist")
    return folder


def find_split_file(folder: Path, split: str, names: Sequence[str]) -> Path:
    """The first of ``names`` that exists in ``folder``; the error lists every name tried."""
    check_folder(folder)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(folder, None, f"no {split} file found (looked for {', '.join(names)})")


class Sequences:
    """What every split has: token-id ``sequences`` (int64, no padding), a length and the
    longest sequence."""

    sequences: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.sequences)

    def max_length(self) -> int:
        return max((len(s) for s in self.sequences), default=0)


@dataclass
class Split(Sequences):
    """One split of a classification or matching task: ``sequences[i]`` (int64 token ids, no
    padding) has label ``labels[i]``; matching tasks also set ``pairs[i]``, the second sequence
    of example i."""

    sequences: list[np.ndarray]
    labels: np.ndarray
    pairs: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.sequences) != len(self.labels):
            raise ValueError(f"{len(self.sequences)} sequences but {len(self.labels)} labels")
        if self.pairs is not None and len(self.pairs) != len(self.sequences):
            raise ValueError(f"{len(self.sequences)} sequences but {len(self.pairs)} pairs")

    def max_length(self) -> int:
        return max((len(s) for s in self.sequences + (self.pairs or [])), default=0)

    def examples(self, indices: Indices, draw: int | None = None
                 ) -> tuple[list[np.ndarray], torch.Tensor]:
        """Input ids of examples ``indices`` and their ``(B,)`` labels."""
        return [self.sequences[i] for i in indices], torch.from_numpy(self.labels[list(indices)])

    def describe(self, i: int) -> str:
        return f"label {self.labels[i]}"


@dataclass
class TokenSplit(Sequences):
    """One split of a language-modelling task: ``targets[i]`` holds the next token at every
    position of ``sequences[i]``."""

    sequences: list[np.ndarray]
    targets: list[np.ndarray]

    def __post_init__(self) -> None:
        if len(self.targets) != len(self.sequences) or any(
                len(t) != len(s) for t, s in zip(self.targets, self.sequences, strict=True)):
            raise ValueError("targets must have one token per token of each sequence")

    def examples(self, indices: Indices, draw: int | None = None
                 ) -> tuple[list[np.ndarray], torch.Tensor]:
        """Input ids of examples ``indices`` and their ``(B, L)`` next tokens
        (``IGNORE_INDEX`` at padding)."""
        targets = pad([self.targets[i] for i in indices], fill=IGNORE_INDEX)[0]
        return [self.sequences[i] for i in indices], targets

    def describe(self, i: int) -> str:
        return "next-token targets"


@dataclass(frozen=True)
class Masking:
    """BERT's masked-LM corruption: ``probability`` of the ordinary tokens (never specials) are
    chosen; a chosen token becomes ``<mask>`` with probability 0.8, a random ordinary token with
    0.1 and stays itself with 0.1; the loss is on chosen tokens only."""

    probability: float
    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    seed: int

    @property
    def ordinary_ids(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.vocab_size), self.special_ids)

    def apply(self, ids: np.ndarray, key: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, labels)`` for ``ids``; the draw is a function of ``key`` alone. At least
        one token is chosen in a sequence that has an ordinary token."""
        rng = np.random.default_rng([self.seed, *key])
        ordinary = ~np.isin(ids, self.special_ids)
        chosen = (rng.random(ids.size) < self.probability) & ordinary
        if not chosen.any() and ordinary.any():
            chosen[rng.choice(np.flatnonzero(ordinary))] = True
        labels = np.where(chosen, ids, IGNORE_INDEX)
        action = rng.random(ids.size)
        inputs = ids.copy()
        inputs[chosen & (action < 0.8)] = self.mask_id
        swap = chosen & (action >= 0.8) & (action < 0.9)
        inputs[swap] = rng.choice(self.ordinary_ids, size=int(swap.sum()))
        return inputs, labels


@dataclass
class MaskedSplit(Sequences):
    """One split of a masked-LM task: ``sequences[i]`` is corrupted by ``masking`` each time it
    is drawn for training (dynamic masking, a function of the seed and the draw) and the same way
    every time it is evaluated (``draw=None``)."""

    sequences: list[np.ndarray]
    masking: Masking

    def examples(self, indices: Indices, draw: int | None = None
                 ) -> tuple[list[np.ndarray], torch.Tensor]:
        """Corrupted input ids of examples ``indices`` and ``(B, L)`` labels: the original token
        where one was chosen, ``IGNORE_INDEX`` elsewhere and at padding."""
        pairs = [self.masking.apply(self.sequences[i], (i,) if draw is None else (draw, i))
                 for i in indices]
        return [inputs for inputs, _ in pairs], pad([labels for _, labels in pairs],
                                                    fill=IGNORE_INDEX)[0]

    def describe(self, i: int) -> str:
        return f"{self.masking.probability:.0%} of tokens masked"


AnySplit = Split | TokenSplit | MaskedSplit


@dataclass
class TaskData:
    """A task's splits and what the model needs to know of it.

    ``head``: ``"classification"`` (one label per sequence), ``"matching"`` (one label per pair
    of sequences, two towers) or ``"lm"`` (next-token prediction with :class:`TokenSplit`
    splits; ``num_labels`` is the vocabulary size).
    """

    train: AnySplit
    val: AnySplit
    test: AnySplit
    vocab_size: int
    num_labels: int
    head: Literal["classification", "matching", "lm", "mlm"] = "classification"
    decode: Callable[[Iterable[int]], str] | None = field(default=None, repr=False)  # ids -> text
    image_size: tuple[int, int] | None = None  # (H, W) when every sequence is an H x W image
    source: str | None = None  # where the data came from, for results.json
    pad_id: int = PAD_ID  # the tokenizer's padding id (a model's pad_token_id)
    unit: Literal["char", "token"] = "char"  # what bits per unit of an LM loss count

    @classmethod
    def from_splits(cls, splits: Mapping[str, AnySplit], **fields: Any) -> TaskData:
        """``splits``: ``{"train": ..., "val": ..., "test": ...}``; ``fields``: the rest."""
        return cls(train=splits["train"], val=splits["val"], test=splits["test"], **fields)

    def splits(self) -> Iterator[tuple[str, AnySplit]]:
        yield from (("train", self.train), ("val", self.val), ("test", self.test))

    def baseline(self, split: str = "test") -> dict:
        """What a model that ignores the input scores on ``split``, fitted on the train split:
        the majority-class rate, or for language modelling the bits per character of the
        training set's byte (unigram) frequencies."""
        train, target = self.train, getattr(self, split)
        if isinstance(train, (TokenSplit, MaskedSplit)):
            seen = train.targets if isinstance(train, TokenSplit) else train.sequences
            counts = np.bincount(np.concatenate(seen), minlength=self.vocab_size) + 1.0
            labels = target.examples(range(len(target)))[1].numpy()
            tokens = labels[labels != IGNORE_INDEX]
            bits = float(-np.log2(counts[tokens] / counts.sum()).mean())
            return {f"unigram_bits_per_{self.unit}": bits}
        assert isinstance(train, Split) and isinstance(target, Split)
        majority = np.bincount(train.labels, minlength=self.num_labels).argmax()
        rate = float(np.mean(target.labels == majority)) if len(target) else float("nan")
        return {"majority_rate": rate}


def pad(sequences: Sequence[np.ndarray], fill: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``(B, L)`` ids with ``fill`` and a bool mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), fill, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
    mask = torch.arange(width)[None, :] < torch.tensor([len(s) for s in sequences])[:, None]
    return ids, mask


def collate(split: AnySplit, indices: Indices, draw: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Examples ``indices`` of ``split`` as model inputs: ``input_ids``, ``attention_mask``
    ``(B, L)`` and ``labels`` (``(B,)``, or ``(B, L)`` per-token targets with ``IGNORE_INDEX``
    where there is no loss), plus ``input_ids_2``/``attention_mask_2`` for matching tasks.
    ``draw`` numbers a training draw (masked LM: which random masks); ``None`` for evaluation."""
    inputs, labels = split.examples(indices, draw)
    ids, mask = pad(inputs)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if isinstance(split, Split) and split.pairs is not None:
        batch["input_ids_2"], batch["attention_mask_2"] = pad([split.pairs[i] for i in indices])
    return batch
