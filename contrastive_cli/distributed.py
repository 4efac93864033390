"""How losses see embeddings from other processes.

Losses take a ``gather`` function so that multi-process training can hand them every
process's embeddings (for negatives) without changing their signatures. A gather returns
the rows of all processes, concatenated in rank order, and the offset of this process's
rows inside that tensor. In a single process it is the identity.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Gather(Protocol):
    def __call__(self, x: Tensor) -> tuple[Tensor, int]:
        """x: (N, D) local rows -> ((M, D) rows of all processes, offset of the local rows)."""
        ...


def local_only(x: Tensor) -> tuple[Tensor, int]:
    """The single-process gather: this process's rows are all there is."""
    return x, 0
