"""Data-parallel sharded, resumable example order, and microbatch assembly.

The global order is a permutation of the training indices per epoch (seeded by ``seed`` and the
epoch number; identity when ``shuffle`` is off). Global batch ``k`` is the slice
``[k * G, (k + 1) * G)`` of the concatenated epochs; DP rank ``r`` of ``D`` takes every ``D``-th
example of it starting at ``r``, then splits its share into consecutive microbatches. The whole
state is ``consumed_examples``, so a resumed run sees exactly the examples the uninterrupted run
would have seen, even at a different DP size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerState:
    consumed_examples: int = 0
    """Examples of the global order already trained on (all DP ranks together)."""


class TripletSampler:
    def __init__(self, indices: np.ndarray, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True,
                 state: SamplerState | None = None):
        if len(indices) < global_batch_size:
            raise ValueError(f"{len(indices)} training examples < global_batch_size "
                             f"{global_batch_size}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"data.global_batch_size={global_batch_size} is not divisible by "
                f"data.micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")
        self.indices = np.asarray(indices)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.state = state or SamplerState()
        self._epoch_cache: dict = {}

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._epoch_cache = {epoch: self.indices[rng.permutation(len(self.indices))]}
            else:
                self._epoch_cache = {epoch: self.indices}
        return self._epoch_cache[epoch]

    def global_batch(self, start: int) -> list:
        """The ``global_batch_size`` example indices starting at global position ``start``."""
        n = len(self.indices)
        out = []
        for position in range(start, start + self.global_batch_size):
            out.append(int(self._epoch_order(position // n)[position % n]))
        return out

    def next_step(self) -> list[list[int]]:
        """This DP rank's microbatches (lists of example indices) for the next step."""
        batch = self.global_batch(self.state.consumed_examples)
        self.state.consumed_examples += self.global_batch_size
        mine = batch[self.dp_rank::self.dp_size]
        m = self.micro_batch_size
        return [mine[i:i + m] for i in range(0, len(mine), m)]

    @property
    def epoch(self) -> float:
        return self.state.consumed_examples / len(self.indices)
