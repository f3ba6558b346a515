"""Random draws that a resumed run repeats exactly, with no generator state in the checkpoint."""

from __future__ import annotations

import torch


class StepRandom:
    """Random generators that are a pure function of ``(seed, optimizer step, index of the draw within the step)``.

    ``seed=None`` takes ``torch.initial_seed()`` at the first draw: ``TrainingArguments.seed`` under the trainer,
    which seeds torch when it is built. The draws do not depend on dropout, data order or other distillers, and a
    run resumed from a checkpoint makes exactly the draws of the uninterrupted run (gradient-accumulation
    micro-batches of a step are draws 1, 2, ...).
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.step: int | None = None
        self.draws = 0

    def generator(self, step: int | None) -> torch.Generator:
        """The next draw of optimizer step ``step``; ``step=None`` (evaluation): a generator seeded from the seed alone,
        so every evaluation draws the same."""
        if self.seed is None:
            self.seed = torch.initial_seed()
        if step is None:
            return torch.Generator().manual_seed(self.seed)
        if step != self.step:
            self.step, self.draws = step, 0
        self.draws += 1
        return torch.Generator().manual_seed(hash((self.seed, step, self.draws)) % 2**63)
