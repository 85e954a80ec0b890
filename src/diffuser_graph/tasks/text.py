"""Byte-level text classification (LRA "Text"): UTF-8 bytes are the tokens.

Data comes from files the user points to (``path``: a folder with ``train``, ``val`` and
``test`` files, each ``.csv``, ``.jsonl`` or ``.tsv`` with ``text`` and ``label`` columns;
LRA-style TSV headers ``Source``/``Target`` are accepted too) or, without ``path``, from a
synthetic long-document sentiment generator: documents of neutral filler with positive and
negative cue phrases scattered through them, labelled by which kind is in the majority, so the
answer needs evidence from across the whole document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..checks import Int, UserPath
from ..io import read_rows, read_text
from .base import DataError, Split, TaskData, find_split_file
from .vocab import BYTES, Tokenizer, encode_document, load_tokenizer

EXTENSIONS = (".csv", ".jsonl", ".tsv")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "dev", "valid"), "test": ("test",)}

FILLER = ("the", "movie", "a", "plot", "scene", "actor", "story", "was", "of", "and", "it",
          "in", "with", "director", "film", "some", "there", "camera", "script", "long")
POSITIVE = ("wonderful", "brilliant", "moving", "superb", "delightful")
NEGATIVE = ("dreadful", "boring", "clumsy", "awful", "tedious")


class TextTask(BaseModel):
    """Config of byte-level text classification (``task: {name: text, ...}``)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["text"] = "text"
    path: UserPath | None = None
    max_length: Int = Field(default=4001, ge=2)  # tokens incl. <cls> (4,000 bytes); longer is cut
    tokenizer: str = "bytes"  # or a folder holding a Hugging Face tokenizer (e.g. RoBERTa's)
    num_labels: Int | None = Field(default=None, ge=2)  # None: 1 + the largest label seen
    synthetic_words: Int = Field(default=600, ge=10)  # document length of the generator
    synthetic_cues: Int = Field(default=7, ge=1)  # cue phrases per document (odd: no ties)
    train_size: Int = Field(default=4000, ge=1)
    val_size: Int = Field(default=500, ge=1)
    test_size: Int = Field(default=500, ge=1)




def _parse_label(raw, path: Path, line: int) -> int:
    try:
        label = int(str(raw).strip())
    except ValueError:
        raise DataError(path, line, f"label must be a non-negative integer, got {raw!r}") from None
    if label < 0:
        raise DataError(path, line, f"label must be a non-negative integer, got {label}")
    return label


def _rows(path: Path):
    """(line, text, raw label) for each example of a CSV, TSV or JSONL file."""
    if path.suffix == ".jsonl":
        for line, raw in enumerate(read_text(path).splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                raise DataError(path, line, f"not valid JSON: {err.msg}") from None
            if not isinstance(record, dict) or "text" not in record or "label" not in record:
                raise DataError(path, line, "each JSON line needs 'text' and 'label' keys")
            yield line, record["text"], record["label"]
        return
    rows = read_rows(path, delimiter="\t" if path.suffix == ".tsv" else ",")
    first = next(rows, None)
    if first is None:
        raise DataError(path, None, "file is empty")
    header_line, header = first[0], [h.strip() for h in first[1]]
    names = ("text", "label") if "text" in header else ("Source", "Target")
    if not set(names) <= set(header):
        raise DataError(path, header_line, f"header must name 'text' and 'label' columns (or "
                                           f"'Source' and 'Target'), got {header}")
    text_col, label_col = header.index(names[0]), header.index(names[1])
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(path, line, f"expected {len(header)} columns, got {len(row)}")
        yield line, row[text_col], row[label_col]


def read_file(path: Path, max_length: int, tokenizer: Tokenizer = BYTES) -> Split:
    if path.suffix not in EXTENSIONS:
        raise DataError(path, None, f"unsupported file type; use one of {EXTENSIONS}")
    sequences, labels = [], []
    for line, text, raw_label in _rows(path):
        if not isinstance(text, str):
            raise DataError(path, line, f"text must be a string, got {type(text).__name__}")
        sequences.append(encode_document(tokenizer, text, max_length))
        labels.append(_parse_label(raw_label, path, line))
    if not sequences:
        raise DataError(path, None, "file has no examples")
    return Split(sequences, np.array(labels))


def synthetic_document(rng: np.random.Generator, words: int, cues: int) -> tuple[str, int]:
    """Filler words with ``cues`` sentiment words at random places; label 1 if most are positive."""
    tokens = list(rng.choice(FILLER, size=words))
    positive = int(rng.integers(0, cues + 1))
    cue_words = ([POSITIVE[i] for i in rng.integers(len(POSITIVE), size=positive)]
                 + [NEGATIVE[i] for i in rng.integers(len(NEGATIVE), size=cues - positive)])
    for position, word in zip(rng.choice(words, size=cues, replace=False), cue_words, strict=True):
        tokens[position] = word
    return " ".join(tokens), int(positive > cues - positive)


def generate(task: TextTask, size: int, rng: np.random.Generator,
             tokenizer: Tokenizer = BYTES) -> Split:
    sequences, labels = [], []
    for _ in range(size):
        text, label = synthetic_document(rng, task.synthetic_words, task.synthetic_cues)
        sequences.append(encode_document(tokenizer, text, task.max_length))
        labels.append(label)
    return Split(sequences, np.array(labels))


def load(task: TextTask, seed: int) -> TaskData:
    tokenizer = load_tokenizer(task.tokenizer)
    if task.path is not None:
        folder = Path(task.path)
        files = {name: find_split_file(folder, name, [f"{stem}{ext}" for stem in stems
                                                      for ext in EXTENSIONS])
                 for name, stems in SPLIT_NAMES.items()}
        splits = {name: read_file(path, task.max_length, tokenizer)
                  for name, path in files.items()}
    else:
        rng = np.random.default_rng([seed, 0x7E47])
        splits = {name: generate(task, getattr(task, f"{name}_size"), rng, tokenizer)
                  for name in SPLIT_NAMES}
    largest = max(int(split.labels.max()) for split in splits.values())
    num_labels = task.num_labels or max(2, largest + 1)
    if largest >= num_labels:
        raise DataError(task.path or "synthetic", None,
                        f"label {largest} found but num_labels is {num_labels}")
    return TaskData.from_splits(splits, vocab_size=tokenizer.vocab_size, num_labels=num_labels,
                                decode=tokenizer.decode, pad_id=tokenizer.pad_id)
