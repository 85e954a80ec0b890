"""Token ids: the special tokens, the byte codec, subword tokenizers and the loss-free label.

Byte level (the default of every text task): ids ``0`` (``<pad>``) and ``1`` (``<cls>``), then
byte ``b`` as id ``b + NUM_SPECIAL``; masked-language modelling adds ``<mask>`` after the 256
bytes. Image tasks map grey level ``g`` the same way. A text task can instead take a
Hugging Face tokenizer from a local folder (``task.tokenizer: PATH``): its ids and its special
tokens (CLS, SEP, PAD, MASK) are used as they are, so a converted RoBERTa or BERT checkpoint
reads the ids it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..io import DataError

PAD_ID = 0
CLS_ID = 1
NUM_SPECIAL = 2  # ids below this are special tokens; a task's first own id
IGNORE_INDEX = -100  # target of positions without loss (padding), F.cross_entropy's default
BYTE_VOCAB_SIZE = 256 + NUM_SPECIAL
BYTE_MASK_ID = BYTE_VOCAB_SIZE  # <mask>, only in the masked-LM byte vocabulary


def encode_bytes(data: bytes | str) -> np.ndarray:
    """UTF-8 bytes (a ``str`` is encoded first) -> int64 ids ``byte + NUM_SPECIAL``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + NUM_SPECIAL


def decode_bytes(ids: Iterable[int]) -> str:
    """Ids -> text; special tokens are dropped and invalid UTF-8 becomes U+FFFD."""
    data = bytes(int(i) - NUM_SPECIAL for i in ids if NUM_SPECIAL <= int(i) < BYTE_VOCAB_SIZE)
    return data.decode("utf-8", errors="replace")


class ByteTokenizer:
    """UTF-8 bytes as tokens; ``with_mask`` adds ``<mask>`` (id 258) for masked-LM training."""

    name = "bytes"
    unit = "char"  # a byte is a character of ASCII text: losses are bits per character
    pad_id, cls_id, sep_id = PAD_ID, CLS_ID, None

    def __init__(self, with_mask: bool = False) -> None:
        self.mask_id = BYTE_MASK_ID if with_mask else None
        self.vocab_size = BYTE_VOCAB_SIZE + int(with_mask)
        self.special_ids = (PAD_ID, CLS_ID) + ((BYTE_MASK_ID,) if with_mask else ())

    def encode(self, text: str | bytes) -> np.ndarray:
        return encode_bytes(text)

    def decode(self, ids: Iterable[int]) -> str:
        return decode_bytes(ids)


class HFTokenizer:
    """A Hugging Face tokenizer saved in a local folder (``save_pretrained`` layout)."""

    unit = "token"

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise DataError(folder, None, "task.tokenizer must be 'bytes' or a folder holding a "
                                          "tokenizer; this folder does not exist")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(folder, None, "a tokenizer folder needs the hf extra: "
                                          "pip install 'diffuser-graph[hf]'") from None
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise DataError(folder, None, f"no usable tokenizer here (expected "
                                          f"tokenizer.json, vocab.json + merges.txt or "
                                          f"vocab.txt): {str(err).splitlines()[0]}") from None
        self.name, self._tokenizer = str(folder), tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else (
            tokenizer.bos_token_id)
        self.sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else (
            tokenizer.eos_token_id)
        self.mask_id = tokenizer.mask_token_id
        self.special_ids = tuple(sorted(set(tokenizer.all_special_ids)))
        missing = [name for name, value in (("pad", self.pad_id), ("cls", self.cls_id))
                   if value is None]
        if missing:
            raise DataError(folder, None, f"the tokenizer has no {' or '.join(missing)} token")

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))


Tokenizer = ByteTokenizer | HFTokenizer
BYTES = ByteTokenizer()


@lru_cache(maxsize=8)
def load_tokenizer(setting: str, with_mask: bool = False) -> Tokenizer:
    """``"bytes"`` or a tokenizer folder; ``with_mask``: the task needs a ``<mask>`` token."""
    if setting == "bytes":
        return ByteTokenizer(with_mask)
    tokenizer = HFTokenizer(setting)
    if with_mask and tokenizer.mask_id is None:
        raise DataError(setting, None, "the tokenizer has no mask token, which masked-LM "
                                       "training needs")
    return tokenizer


def encode_document(tokenizer: Tokenizer, text: str, max_length: int) -> np.ndarray:
    """``[CLS] tokens [SEP]`` (``[SEP]`` where the tokenizer has one), truncated to
    ``max_length`` ids in all."""
    room = max_length - 1 - (tokenizer.sep_id is not None)
    body = tokenizer.encode(text)[:max(room, 0)]
    tail = [tokenizer.sep_id] if tokenizer.sep_id is not None else []
    return np.concatenate([[tokenizer.cls_id], body, tail]).astype(np.int64)
