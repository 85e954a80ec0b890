"""Token ids every task shares: the special tokens, the byte codec and the loss-free label.

Ids ``0`` (``<pad>``) and ``1`` (``<cls>``) are the same in every task; a task's own tokens start
at :data:`NUM_SPECIAL`. Byte-level tasks (text, retrieval, language modelling) map byte ``b`` to
id ``b + NUM_SPECIAL``; image tasks map grey level ``g`` the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PAD_ID = 0
CLS_ID = 1
NUM_SPECIAL = 2  # ids below this are special tokens; a task's first own id
IGNORE_INDEX = -100  # target of positions without loss (padding), F.cross_entropy's default
BYTE_VOCAB_SIZE = 256 + NUM_SPECIAL


def encode_bytes(data: bytes | str) -> np.ndarray:
    """UTF-8 bytes (a ``str`` is encoded first) -> int64 ids ``byte + NUM_SPECIAL``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + NUM_SPECIAL


def decode_bytes(ids: Iterable[int]) -> str:
    """Ids -> text; special tokens are dropped and invalid UTF-8 becomes U+FFFD."""
    data = bytes(int(i) - NUM_SPECIAL for i in ids if int(i) >= NUM_SPECIAL)
    return data.decode("utf-8", errors="replace")
