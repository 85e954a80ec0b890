"""What every task produces: token-id sequences with labels, split three ways, and batching.

A task turns a config into :class:`TaskData`: ``train``/``val``/``test`` :class:`Split` objects
(unpadded int64 token arrays and integer labels), the vocabulary size and the number of labels.
:func:`collate` pads a list of examples into the tensors the models take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

PAD_ID = 0
CLS_ID = 1


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""

    def __init__(self, path: Path | str, line: Optional[int], problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


@dataclass
class Split:
    """One split: ``sequences[i]`` (int64 token ids, no padding) has label ``labels[i]``.

    Matching tasks also set ``pairs[i]``, the second sequence of example i.
    """

    sequences: List[np.ndarray]
    labels: np.ndarray
    pairs: Optional[List[np.ndarray]] = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.sequences) != len(self.labels):
            raise ValueError(f"{len(self.sequences)} sequences but {len(self.labels)} labels")
        if self.pairs is not None and len(self.pairs) != len(self.sequences):
            raise ValueError(f"{len(self.sequences)} sequences but {len(self.pairs)} pairs")

    def __len__(self) -> int:
        return len(self.labels)

    def max_length(self) -> int:
        lengths = [len(s) for s in self.sequences + (self.pairs or [])]
        return max(lengths) if lengths else 0


@dataclass
class TaskData:
    train: Split
    val: Split
    test: Split
    vocab_size: int
    num_labels: int
    matching: bool = False
    decode: Optional[object] = field(default=None, repr=False)  # ids -> readable text
    image_size: Optional[tuple] = None  # (H, W) when every sequence is an H x W image

    def splits(self) -> Iterator[tuple[str, Split]]:
        yield from (("train", self.train), ("val", self.val), ("test", self.test))

    def majority_rate(self, split: str = "test") -> float:
        """Accuracy of always answering the most frequent *training* label."""
        majority = np.bincount(self.train.labels, minlength=self.num_labels).argmax()
        labels = getattr(self, split).labels
        return float(np.mean(labels == majority)) if len(labels) else float("nan")


def pad(sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``(B, L)`` ids with ``PAD_ID`` and a bool mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
    mask = torch.arange(width)[None, :] < torch.tensor([len(s) for s in sequences])[:, None]
    return ids, mask


def collate(split: Split, indices: Sequence[int]) -> dict:
    """Examples ``indices`` of ``split`` as model inputs (``input_ids``, ``attention_mask``,
    ``labels``, and ``input_ids_2``/``attention_mask_2`` for matching tasks)."""
    ids, mask = pad([split.sequences[i] for i in indices])
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": torch.from_numpy(split.labels[list(indices)])}
    if split.pairs is not None:
        batch["input_ids_2"], batch["attention_mask_2"] = pad([split.pairs[i] for i in indices])
    return batch


