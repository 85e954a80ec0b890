"""Diffusion for engines that propagate packed tokens as they are, differentiated by autograd."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from ..diffusion import Diffusion


class PackedLayout(ABC):
    """``enter``, ``leave`` and ``diffuse`` for a plan whose ``propagate`` takes packed
    ``z: (N, H, Dv)``."""

    @abstractmethod
    def propagate(self, attention: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor:
        """``A z``."""

    @staticmethod
    def enter(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def leave(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x

    def diffuse(self, attention: tuple[torch.Tensor, ...], v: torch.Tensor, diffusion: Diffusion,
                hop_dropout: float, after_mix: bool = False) -> torch.Tensor:
        """``sum_k theta_k A^k v`` with dropout ``hop_dropout`` on every ``A z`` (or, with
        ``after_mix``, on every iterate after ``theta_k v`` is added)."""
        def drop(z: torch.Tensor) -> torch.Tensor:
            return F.dropout(z, hop_dropout, hop_dropout > 0)

        if after_mix:
            return diffusion.apply(lambda z: self.propagate(attention, z), v, drop)
        return diffusion.apply(lambda z: drop(self.propagate(attention, z)), v)
