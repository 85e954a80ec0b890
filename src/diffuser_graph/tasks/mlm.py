"""Masked-language-model pretraining (BERT / RoBERTa), scored in bits per character or token.

The corpus is that of the ``lm`` task (a text file, a folder of train/valid/test files, or
text every Python holds), tokenized by bytes or by a local Hugging Face tokenizer, and cut into
non-overlapping examples of ``seq_len`` tokens: ``[CLS] ... [SEP]`` (``[SEP]`` where the
tokenizer has one). Each time an example is drawn for training, 15 % of its ordinary tokens are
chosen afresh (dynamic masking, as RoBERTa; the draw is a function of the seed and the step, so
resuming is exact) and 80/10/10 become ``<mask>``/a random token/themselves; validation and test
keep one fixed draw. The loss is the cross-entropy on chosen tokens only; with the byte
tokenizer, bits per character; with a subword tokenizer, bits per token.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..checks import Float
from .base import DataError, MaskedSplit, Masking, TaskData
from .lm import CorpusTask, corpus_parts
from .vocab import Tokenizer, load_tokenizer


class MLMTask(CorpusTask):
    """Config of masked-LM pretraining (``task: {name: mlm, ...}``)."""

    name: Literal["mlm"] = "mlm"
    tokenizer: str = "bytes"  # or a folder holding a Hugging Face tokenizer with a mask token
    mask_probability: Float = Field(default=0.15, gt=0, lt=1)


def chunk(tokens: np.ndarray, tokenizer: Tokenizer, seq_len: int, where: str) -> list[np.ndarray]:
    """Non-overlapping ``[CLS] body [SEP]`` examples of ``seq_len`` tokens from ``tokens``."""
    body = seq_len - 1 - (tokenizer.sep_id is not None)
    count = len(tokens) // body if body > 0 else 0
    if count < 1:
        raise DataError(where, None, f"{len(tokens)} tokens cannot make one example of seq_len "
                                     f"{seq_len}")
    tail = [tokenizer.sep_id] if tokenizer.sep_id is not None else []
    return [np.concatenate([[tokenizer.cls_id], tokens[s:s + body], tail]).astype(np.int64)
            for s in range(0, count * body, body)]


def load(task: MLMTask, seed: int) -> TaskData:
    tokenizer = load_tokenizer(task.tokenizer, with_mask=True)
    assert tokenizer.mask_id is not None  # load_tokenizer(with_mask=True) ensures it
    parts, where, source = corpus_parts(task)
    masking = Masking(task.mask_probability, tokenizer.mask_id, tokenizer.special_ids,
                      tokenizer.vocab_size, seed)
    splits = {name: MaskedSplit(chunk(tokenizer.encode(data), tokenizer, task.seq_len,
                                      where[name]), masking)
              for name, data in parts.items()}
    return TaskData.from_splits(splits, vocab_size=tokenizer.vocab_size,
                                num_labels=tokenizer.vocab_size, head="mlm",
                                decode=tokenizer.decode, source=source, pad_id=tokenizer.pad_id,
                                unit=tokenizer.unit)
