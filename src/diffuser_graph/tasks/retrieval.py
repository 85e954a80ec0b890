"""Document matching (LRA "Retrieval", the AAN citation task) with a two-tower model.

An example is a pair of byte-level documents and label 1 if they are related. The model
(:class:`~diffuser_graph.model.DiffuserForMatching`) encodes each document alone and classifies
the pair of embeddings, so everything it knows of a document must be gathered into one vector.

Sources:

- ``path``: a folder with LRA's files ``new_aan_pairs.train.tsv``, ``new_aan_pairs.eval.tsv``,
  ``new_aan_pairs.test.tsv`` (or ``train.tsv``, ``val.tsv``/``eval.tsv``, ``test.tsv``): one
  pair per line, tab-separated ``label, id1, id2, text1, text2``, no header (a first line
  starting with ``label`` is skipped). Labels are 0/1, written as ``1`` or ``1.0``.
- no ``path``: a synthetic generator. There are ``num_topics`` topics, each with its own
  ``topic_words`` invented words. A document of topic T is filler words with ``cues`` words of
  T and ``noise_cues`` words of other topics (one each) at random places, so its topic is the
  one named most often, and telling it needs the whole document. Pairs of the same topic are
  related (label 1), pairs of different topics are not; the classes are balanced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..checks import Int, UserPath
from ..io import read_text
from .base import DataError, Split, TaskData, find_split_file
from .vocab import BYTES, Tokenizer, encode_document, load_tokenizer

LRA_FILES = {"train": ("new_aan_pairs.train.tsv", "train.tsv"),
             "val": ("new_aan_pairs.eval.tsv", "eval.tsv", "val.tsv"),
             "test": ("new_aan_pairs.test.tsv", "test.tsv")}
COLUMNS = ("label", "id1", "id2", "text1", "text2")
FILLER = ("we", "the", "model", "results", "show", "that", "a", "method", "of", "data", "in",
          "this", "paper", "is", "for", "approach", "on", "and", "propose", "evaluate")
LETTERS = "bcdfghklmnprstvz"
VOWELS = "aeiou"


class RetrievalTask(BaseModel):
    """Config of document matching (``task: {name: retrieval, ...}``)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["retrieval"] = "retrieval"
    path: UserPath | None = None
    max_length: Int = Field(default=4001, ge=2)  # per document incl. <cls> (LRA: 4,000 bytes)
    tokenizer: str = "bytes"  # or a folder holding a Hugging Face tokenizer
    num_topics: Int = Field(default=16, ge=2)
    topic_words: Int = Field(default=4, ge=1)
    words: Int = Field(default=500, ge=4)  # words per synthetic document
    cues: Int = Field(default=3, ge=2)  # words of the document's own topic
    noise_cues: Int = Field(default=3, ge=0)  # words of other topics, one per topic
    train_size: Int = Field(default=8000, ge=1)
    val_size: Int = Field(default=1000, ge=1)
    test_size: Int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> RetrievalTask:
        if self.noise_cues > self.num_topics - 1:
            raise ValueError(f"noise_cues ({self.noise_cues}) takes one word from each of as "
                             f"many other topics; at most num_topics - 1 = "
                             f"{self.num_topics - 1}")
        if self.cues + self.noise_cues > self.words:
            raise ValueError(f"cues + noise_cues ({self.cues + self.noise_cues}) must fit in "
                             f"words ({self.words})")
        return self


# --- LRA files ------------------------------------------------------------------------------

def _parse_label(raw: str, path: Path, line: int) -> int:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if value not in (0.0, 1.0):
        raise DataError(path, line, f"label must be 0 or 1, got {raw!r}")
    return int(value)


def read_pairs(path: Path, max_length: int, tokenizer: Tokenizer = BYTES) -> Split:
    """One LRA retrieval TSV (``label, id1, id2, text1, text2`` per line) as a paired split."""
    firsts, seconds, labels = [], [], []
    for line, raw in enumerate(read_text(path).split("\n"), start=1):
        fields = raw.rstrip("\r").split("\t")  # LRA's texts hold no tabs or newlines: no quoting
        if (line == 1 and fields[0].strip().lower() == "label") or not raw.strip():
            continue  # a header, or a blank line
        if len(fields) != len(COLUMNS):
            raise DataError(path, line, f"expected {len(COLUMNS)} tab-separated columns "
                                        f"({', '.join(COLUMNS)}), got {len(fields)}")
        labels.append(_parse_label(fields[0], path, line))
        firsts.append(encode_document(tokenizer, fields[3], max_length))
        seconds.append(encode_document(tokenizer, fields[4], max_length))
    if not labels:
        raise DataError(path, None, "file has no examples")
    return Split(firsts, np.array(labels), pairs=seconds)


# --- synthetic pairs ------------------------------------------------------------------------

def topic_lexicon(task: RetrievalTask, rng: np.random.Generator) -> list[list[str]]:
    """``num_topics`` lists of ``topic_words`` distinct invented words (never filler words)."""
    words: set[str] = set()
    while len(words) < task.num_topics * task.topic_words:
        syllables = [rng.choice(list(LETTERS)) + rng.choice(list(VOWELS)) for _ in range(3)]
        words.add("".join(syllables) + rng.choice(list(LETTERS)))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return [ordered[t * task.topic_words:(t + 1) * task.topic_words]
            for t in range(task.num_topics)]


def make_document(task: RetrievalTask, lexicon: list[list[str]], topic: int,
                  rng: np.random.Generator) -> str:
    """Filler with ``cues`` words of ``topic`` and one word each of ``noise_cues`` others."""
    tokens = list(rng.choice(FILLER, size=task.words))
    others = rng.choice([t for t in range(task.num_topics) if t != topic], task.noise_cues,
                        replace=False)
    cue_words = [lexicon[topic][rng.integers(task.topic_words)] for _ in range(task.cues)]
    cue_words += [lexicon[t][rng.integers(task.topic_words)] for t in others]
    for position, word in zip(rng.choice(task.words, size=len(cue_words), replace=False),
                              cue_words, strict=True):
        tokens[position] = word
    return " ".join(tokens)


def document_topic(text: str, lexicon: list[list[str]]) -> int:
    """The topic named most often in ``text`` (an independent reading of a document)."""
    counts = np.zeros(len(lexicon), dtype=np.int64)
    owner = {word: topic for topic, words in enumerate(lexicon) for word in words}
    for word in text.split():
        if word in owner:
            counts[owner[word]] += 1
    return int(counts.argmax())


def generate(task: RetrievalTask, lexicon: list[list[str]], size: int,
             rng: np.random.Generator, tokenizer: Tokenizer = BYTES) -> Split:
    labels = rng.permutation(np.arange(size) % 2)
    firsts: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    for label in labels:
        topic = int(rng.integers(task.num_topics))
        other = topic if label else int(rng.choice(
            [t for t in range(task.num_topics) if t != topic]))
        for documents, about in ((firsts, topic), (seconds, other)):
            text = make_document(task, lexicon, about, rng)
            documents.append(encode_document(tokenizer, text, task.max_length))
    return Split(firsts, labels, pairs=seconds)


def load(task: RetrievalTask, seed: int) -> TaskData:
    tokenizer = load_tokenizer(task.tokenizer)
    if task.path is not None:
        folder = Path(task.path)
        splits = {name: read_pairs(find_split_file(folder, name, files), task.max_length,
                                   tokenizer)
                  for name, files in LRA_FILES.items()}
    else:
        rng = np.random.default_rng([seed, 0xAA2])
        lexicon = topic_lexicon(task, rng)
        splits = {name: generate(task, lexicon, getattr(task, f"{name}_size"), rng, tokenizer)
                  for name in LRA_FILES}
    return TaskData.from_splits(splits, vocab_size=tokenizer.vocab_size, num_labels=2,
                                head="matching", decode=tokenizer.decode, pad_id=tokenizer.pad_id)
