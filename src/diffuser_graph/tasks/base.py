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


@dataclass
class Split:
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

    def __len__(self) -> int:
        return len(self.sequences)

    def max_length(self) -> int:
        lengths = [len(s) for s in self.sequences + (self.pairs or [])]
        return max(lengths) if lengths else 0

    def batch_labels(self, indices: Indices) -> torch.Tensor:
        """``(B,)`` labels of examples ``indices``."""
        return torch.from_numpy(self.labels[list(indices)])

    def describe(self, i: int) -> str:
        return f"label {self.labels[i]}"


@dataclass
class TokenSplit:
    """One split of a language-modelling task: ``targets[i]`` holds the next token at every
    position of ``sequences[i]``."""

    sequences: list[np.ndarray]
    targets: list[np.ndarray]

    def __post_init__(self) -> None:
        if len(self.targets) != len(self.sequences) or any(
                len(t) != len(s) for t, s in zip(self.targets, self.sequences, strict=True)):
            raise ValueError("targets must have one token per token of each sequence")

    def __len__(self) -> int:
        return len(self.sequences)

    def max_length(self) -> int:
        return max((len(s) for s in self.sequences), default=0)

    def batch_labels(self, indices: Indices) -> torch.Tensor:
        """``(B, L)`` next tokens of examples ``indices``, ``IGNORE_INDEX`` at padding."""
        return pad([self.targets[i] for i in indices], fill=IGNORE_INDEX)[0]

    def describe(self, i: int) -> str:
        return "next-token targets"


AnySplit = Split | TokenSplit


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
    head: Literal["classification", "matching", "lm"] = "classification"
    decode: Callable[[Iterable[int]], str] | None = field(default=None, repr=False)  # ids -> text
    image_size: tuple[int, int] | None = None  # (H, W) when every sequence is an H x W image
    source: str | None = None  # where the data came from, for results.json

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
        if isinstance(train, TokenSplit) and isinstance(target, TokenSplit):
            counts = np.bincount(np.concatenate(train.targets), minlength=self.vocab_size) + 1.0
            tokens = np.concatenate(target.targets)
            return {"unigram_bits_per_char": float(-np.log2(counts[tokens] / counts.sum()).mean())}
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


def collate(split: AnySplit, indices: Indices) -> dict[str, torch.Tensor]:
    """Examples ``indices`` of ``split`` as model inputs: ``input_ids``, ``attention_mask``
    ``(B, L)`` and ``labels`` (``(B,)``, or ``(B, L)`` next tokens with ``IGNORE_INDEX`` at
    padding), plus ``input_ids_2``/``attention_mask_2`` for matching tasks."""
    ids, mask = pad([split.sequences[i] for i in indices])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": split.batch_labels(indices)}
    if isinstance(split, Split) and split.pairs is not None:
        batch["input_ids_2"], batch["attention_mask_2"] = pad([split.pairs[i] for i in indices])
    return batch
