"""Input checks at the public boundary: each names the argument and says what is allowed.

Two kinds live here: pydantic field types that refuse what Python would silently coerce (a bool
is not a count, ``True`` is not a window of 1) while accepting numpy scalars, and plain checks of
tensors handed to the attention functions.
"""

from __future__ import annotations

import numbers
import os
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import AfterValidator, BeforeValidator, Field, Strict


def _integer(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, np.integer):
        return int(value)
    return value


def _number(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, (np.floating, np.integer)):
        return float(value)
    return value


# ``Int`` accepts Python and numpy integers only (no bools, floats or strings); ``Float`` any real
# number but a bool. Both are used with ``Field(ge=..., le=...)`` for ranges.
Int = Annotated[int, BeforeValidator(_integer), Strict()]
Float = Annotated[float, BeforeValidator(_number)]
# A file or folder the user names: not empty, ``~`` expanded.
UserPath = Annotated[str, Field(min_length=1), AfterValidator(os.path.expanduser)]


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers accepted), else ``ValueError`` naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_flag(name: str, value: Any) -> bool:
    """A bool (numpy's accepted); anything else (``1``, ``"yes"``) is refused, not coerced."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_probability(name: str, p: Any) -> float:
    """A dropout probability in ``[0, 1)`` (numpy scalars accepted)."""
    if (isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real)
            or not 0.0 <= float(p) < 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_qkv(q: Any, k: Any, v: Any, num_tokens: int, device: torch.device | None = None,
              where: str = "the batch has") -> None:
    """``q, k: (N, H, D)``, ``v: (N, H, Dv)``, one float dtype and device, ``N = num_tokens``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a (N, H, D) tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float64, float32, bfloat16 or float16 tensor, "
                             f"got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if device is not None and q.device != device:
        raise ValueError(f"q, k, v are on {q.device} but the batch was planned for {device}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (N, H, D), got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have the same N and H as q, got {tuple(v.shape)} vs "
                         f"{tuple(q.shape)}")
    if q.shape[0] != num_tokens:
        raise ValueError(f"q, k, v have N={q.shape[0]} rows but {where} {num_tokens} tokens")
