"""What every task produces: token-id sequences with labels, split three ways, and batching.

A task turns a config into :class:`TaskData`: ``train``/``val``/``test`` :class:`Split` objects
(unpadded int64 token arrays with one label each, or, for language modelling, a target token per
position), the vocabulary size, the number of labels and the kind of model ``head`` it needs.
:func:`collate` pads a list of examples into the tensors the models take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Literal, Optional, Sequence

import numpy as np
import torch

from ..model import IGNORE_INDEX

PAD_ID = 0
CLS_ID = 1


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""

    def __init__(self, path: Path | str, line: Optional[int], problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


def find_split_file(folder: Path, split: str, names: Sequence[str]) -> Path:
    """The first of ``names`` that exists in ``folder``; the error lists every name tried."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(folder, None, f"no {split} file found (looked for {', '.join(names)})")


@dataclass
class Split:
    """One split: ``sequences[i]`` (int64 token ids, no padding) has label ``labels[i]``.

    Matching tasks also set ``pairs[i]``, the second sequence of example i. Language modelling
    sets ``targets[i]`` (the next token at every position of ``sequences[i]``) instead of labels.
    """

    sequences: List[np.ndarray]
    labels: Optional[np.ndarray] = None
    pairs: Optional[List[np.ndarray]] = None
    targets: Optional[List[np.ndarray]] = None

    def __post_init__(self) -> None:
        if (self.labels is None) == (self.targets is None):
            raise ValueError("a split has either labels (one per sequence) or targets (one per "
                             "token)")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if len(self.sequences) != len(self.labels):
                raise ValueError(f"{len(self.sequences)} sequences but {len(self.labels)} labels")
        else:
            if len(self.targets) != len(self.sequences) or any(
                    len(t) != len(s) for t, s in zip(self.targets, self.sequences)):
                raise ValueError("targets must have one token per token of each sequence")
        if self.pairs is not None and len(self.pairs) != len(self.sequences):
            raise ValueError(f"{len(self.sequences)} sequences but {len(self.pairs)} pairs")

    def __len__(self) -> int:
        return len(self.sequences)

    def max_length(self) -> int:
        lengths = [len(s) for s in self.sequences + (self.pairs or [])]
        return max(lengths) if lengths else 0


@dataclass
class TaskData:
    """A task's splits and what the model needs to know of it.

    ``head``: ``"classification"`` (one label per sequence), ``"matching"`` (one label per pair
    of sequences, two towers) or ``"lm"`` (next-token prediction; ``num_labels`` is the
    vocabulary size).
    """

    train: Split
    val: Split
    test: Split
    vocab_size: int
    num_labels: int
    head: Literal["classification", "matching", "lm"] = "classification"
    decode: Optional[object] = field(default=None, repr=False)  # ids -> readable text
    image_size: Optional[tuple] = None  # (H, W) when every sequence is an H x W image
    source: Optional[str] = None  # where the data came from, for results.json

    def splits(self) -> Iterator[tuple[str, Split]]:
        yield from (("train", self.train), ("val", self.val), ("test", self.test))

    def baseline(self, split: str = "test") -> dict:
        """What a model that ignores the input scores on ``split``, fitted on the train split:
        the majority-class rate, or for language modelling the bits per character of the
        training set's byte (unigram) frequencies."""
        target = getattr(self, split)
        if self.head != "lm":
            majority = np.bincount(self.train.labels, minlength=self.num_labels).argmax()
            rate = float(np.mean(target.labels == majority)) if len(target) else float("nan")
            return {"majority_rate": rate}
        counts = np.bincount(np.concatenate(self.train.targets), minlength=self.vocab_size) + 1.0
        tokens = np.concatenate(target.targets)
        return {"unigram_bits_per_char": float(-np.log2(counts[tokens] / counts.sum()).mean())}


def pad(sequences: Sequence[np.ndarray], fill: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``(B, L)`` ids with ``fill`` and a bool mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), fill, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
    mask = torch.arange(width)[None, :] < torch.tensor([len(s) for s in sequences])[:, None]
    return ids, mask


def collate(split: Split, indices: Sequence[int]) -> dict:
    """Examples ``indices`` of ``split`` as model inputs: ``input_ids``, ``attention_mask``
    ``(B, L)`` and ``labels`` (``(B,)``, or ``(B, L)`` next tokens with ``IGNORE_INDEX`` at
    padding), plus ``input_ids_2``/``attention_mask_2`` for matching tasks."""
    ids, mask = pad([split.sequences[i] for i in indices])
    if split.targets is not None:
        labels, _ = pad([split.targets[i] for i in indices], fill=IGNORE_INDEX)
    else:
        labels = torch.from_numpy(split.labels[list(indices)])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if split.pairs is not None:
        batch["input_ids_2"], batch["attention_mask_2"] = pad([split.pairs[i] for i in indices])
    return batch
