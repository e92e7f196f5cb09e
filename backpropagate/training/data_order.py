"""The order in which training examples are seen, as a position that a checkpoint can store.

Each epoch is a permutation seeded by ``(seed, epoch)``, so the position ``(epoch, index)`` is
all a resumed run needs to continue with exactly the examples the uninterrupted run would see.
An optimizer step takes a fixed list of examples (the effective batch); how that list is split
into micro-batches never changes which examples the step sees (OOM recovery relies on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # into the epoch's shuffled order


class DataOrder:
    def __init__(self, n_examples: int, seed: int) -> None:
        self.n = n_examples
        self.seed = seed
        self._cache: tuple[int, Any] | None = None

    def permutation(self, epoch: int) -> Any:
        import numpy as np

        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cache[1]

    def take(self, pos: DataPosition, count: int) -> tuple[list[int], DataPosition]:
        """The next ``count`` example indices after ``pos`` (running into the next epoch if needed)."""
        out: list[int] = []
        epoch, index = pos.epoch, pos.index
        while len(out) < count:
            if index >= self.n:
                epoch, index = epoch + 1, 0
            order = self.permutation(epoch)
            chunk = order[index : index + count - len(out)]
            out.extend(int(i) for i in chunk)
            index += len(chunk)
        return out, DataPosition(epoch, index)

    def epoch_progress(self, pos: DataPosition) -> float:
        return pos.epoch + pos.index / self.n


def label_tokens(example: dict[str, Sequence[int]]) -> int:
    """Tokens that carry loss: labels after the causal shift (the first label is never predicted)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def split_micro_batches(examples: list[Any], micro_batch: int) -> list[list[Any]]:
    return [examples[i : i + micro_batch] for i in range(0, len(examples), micro_batch)]
