"""Character-level (byte-level) language modelling, scored in bits per character.

The text is cut into consecutive chunks of ``seq_len + 1`` bytes; each chunk gives an example
whose input is its first ``seq_len`` bytes and whose targets are the same bytes shifted by one.
Chunks do not overlap, so every byte of a split is predicted exactly once (early bytes of a chunk
see little context). Bits per character = mean cross-entropy in nats / ln 2 (one character per
byte for ASCII text).

Sources:

- ``path``: a UTF-8 text file (split by position into train / val / test by ``val_fraction``
  and ``test_fraction``) or a folder with ``train.txt``, ``valid.txt`` (or ``val.txt``) and
  ``test.txt`` (enwik8/text8-style splits).
- no ``path``: text every Python installation holds, collected deterministically in sorted
  order: ``corpus: python-docs`` (the default; the language and library reference topics of
  ``pydoc_data.topics``, ~460 KB of English) or ``python-source`` (the source files of the
  standard-library modules in :data:`SOURCE_MODULES`). ``TaskData.source`` records the Python
  version, the size and a SHA-256 of the text, so a result names exactly what it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import platform
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..checks import Float, Int, UserPath
from ..io import read_text
from .base import DataError, TaskData, TokenSplit, find_split_file
from .vocab import BYTE_VOCAB_SIZE, decode_bytes, encode_bytes

SOURCE_MODULES = ("argparse", "bisect", "calendar", "colorsys", "configparser", "contextlib",
                  "copy", "csv", "dataclasses", "difflib", "fnmatch", "fractions", "functools",
                  "getopt", "glob", "heapq", "ipaddress", "json.decoder", "json.encoder",
                  "keyword", "numbers", "operator", "pprint", "queue", "random", "sched",
                  "shlex", "statistics", "string", "textwrap", "tokenize", "uuid")
FOLDER_FILES = {"train": ("train.txt",), "val": ("valid.txt", "val.txt"), "test": ("test.txt",)}


class CorpusTask(BaseModel):
    """Where a text corpus comes from and how it is cut (shared by ``lm`` and ``mlm``)."""

    model_config = ConfigDict(extra="forbid")
    path: UserPath | None = None  # a text file, or a folder of train/valid/test .txt files
    corpus: Literal["python-docs", "python-source"] = "python-docs"  # used without a path
    seq_len: Int = Field(default=512, ge=2)  # tokens per example
    max_bytes: Int | None = Field(default=None, ge=1)  # use only the first max_bytes of text
    val_fraction: Float = Field(default=0.05, gt=0, lt=1)  # for a single file or corpus
    test_fraction: Float = Field(default=0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _fractions(self) -> CorpusTask:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class LMTask(CorpusTask):
    """Config of byte-level language modelling (``task: {name: lm, ...}``); ``seq_len`` bytes
    are the inputs of an example, its targets the same bytes shifted by one."""

    name: Literal["lm"] = "lm"


def read_bytes(path: Path) -> bytes:
    """A UTF-8 text file's bytes; errors name the file (and the line of an invalid byte)."""
    data = read_text(path).encode("utf-8")
    if not data:
        raise DataError(path, None, "file is empty")
    return data


def python_corpus(corpus: str) -> tuple[bytes, str]:
    """The embedded default text and a description of it (Python version, bytes, SHA-256)."""
    if corpus == "python-docs":
        from pydoc_data.topics import topics

        text = "".join(topics[name] for name in sorted(topics)).encode("utf-8")
        what = "pydoc_data.topics"
    else:
        parts = []
        for module in SOURCE_MODULES:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                raise DataError(module, None, "standard-library module source not found; "
                                              "use task.path to give a text file instead")
            parts.append(Path(spec.origin).read_bytes())
        text = b"\n".join(parts)
        what = f"source of {len(SOURCE_MODULES)} standard-library modules"
    digest = hashlib.sha256(text).hexdigest()[:16]
    return text, f"{what} of Python {platform.python_version()}: {len(text)} bytes, sha256 {digest}"


def chunk(data: bytes, seq_len: int, where: str) -> TokenSplit:
    """Non-overlapping examples of ``seq_len`` input bytes and their next-byte targets."""
    ids = encode_bytes(data)
    count = (len(ids) - 1) // seq_len
    if count < 1:
        raise DataError(where, None, f"{len(ids)} bytes cannot make one example of seq_len "
                                     f"{seq_len} (needs {seq_len + 1})")
    starts = np.arange(count) * seq_len
    return TokenSplit([ids[s:s + seq_len] for s in starts],
                      [ids[s + 1:s + seq_len + 1] for s in starts])


def corpus_parts(task: CorpusTask) -> tuple[dict[str, bytes], dict[str, str], str]:
    """The train/val/test text (UTF-8 bytes), where each part came from, and the whole
    source's description (file names and sizes, or the embedded corpus with its SHA-256)."""
    if task.path is not None and Path(task.path).is_dir():
        folder = Path(task.path)
        files = {name: find_split_file(folder, name, names)
                 for name, names in FOLDER_FILES.items()}
        parts = {name: read_bytes(path)[:task.max_bytes] for name, path in files.items()}
        where = {name: str(path) for name, path in files.items()}
        source = f"{folder}: " + ", ".join(f"{p.name} {len(parts[n])} bytes"
                                           for n, p in files.items())
    else:
        if task.path is not None:
            text, source = read_bytes(Path(task.path)), task.path
        else:
            text, source = python_corpus(task.corpus)
        text = text[:task.max_bytes]
        n_val, n_test = (int(len(text) * f) for f in (task.val_fraction, task.test_fraction))
        n_train = len(text) - n_val - n_test
        parts = {"train": text[:n_train], "val": text[n_train:n_train + n_val],
                 "test": text[n_train + n_val:]}
        where = {name: f"{source} ({name} part)" for name in parts}
        source = f"{source}; train/val/test {n_train}/{n_val}/{n_test} bytes"
    return parts, where, source


def load(task: LMTask, seed: int) -> TaskData:  # the text fixes the data: seed is not used
    parts, where, source = corpus_parts(task)
    splits = {name: chunk(data, task.seq_len, where[name]) for name, data in parts.items()}
    return TaskData.from_splits(splits, vocab_size=BYTE_VOCAB_SIZE, num_labels=BYTE_VOCAB_SIZE,
                                head="lm", decode=decode_bytes, source=source)
