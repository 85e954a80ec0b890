"""The layout of engines that propagate packed tokens as they are."""

from __future__ import annotations

import torch


class PackedLayout:
    """``enter`` and ``leave`` for a plan whose ``propagate`` takes packed ``z: (N, H, Dv)``."""

    @staticmethod
    def enter(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def leave(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x
