"""Random draws that a resumed run repeats exactly, with no generator state in the checkpoint."""

from __future__ import annotations

import torch

from .processes import rank_and_count


class StepRandom:
    """Random generators that are a pure function of ``(seed, optimizer step, micro-batch of the step)``.

    ``seed=None`` takes ``torch.initial_seed()`` at the first draw: ``TrainingArguments.seed`` under the trainer,
    which seeds torch when it is built. The draws do not depend on dropout, data order or other distillers, and a
    run resumed from a checkpoint makes exactly the draws of the uninterrupted run. The micro-batch is counted over
    the whole step's global batch (:mod:`hf_kd.processes`): the ``d``-th draw of a step on process ``rank`` of
    ``world_size`` is micro-batch ``(d - 1) * world_size + rank + 1``, so two processes draw what one process with
    twice the gradient accumulation draws on the same micro-batches, and no two processes draw alike.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.step: int | None = None
        self.draws = 0

    def _seed(self) -> int:
        if self.seed is None:
            self.seed = torch.initial_seed()
        return self.seed

    def generator(self, step: int | None) -> torch.Generator:
        """The next draw of optimizer step ``step``; ``step=None`` (evaluation): a generator seeded from the seed alone,
        so every evaluation draws the same."""
        if step is None:
            return torch.Generator().manual_seed(self._seed())
        if step != self.step:
            self.step, self.draws = step, 0
        self.draws += 1
        rank, world_size = rank_and_count()
        return self.keyed(step, (self.draws - 1) * world_size + rank + 1)

    def keyed(self, step: int, key: int) -> torch.Generator:
        """A generator of ``(seed, step, key)`` alone, whatever was drawn before: e.g. one per sample, keyed by its
        dataset index, so that a sample draws the same wherever it sits in the step's batches."""
        return torch.Generator().manual_seed(hash((self._seed(), step, key)) % 2**63)
