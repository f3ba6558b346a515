"""What the teacher-assistant distillers (``dgkd``, ``ces_kd``) share: the student's tempered KL against one guide (the
teacher or an assistant) over some of a batch's logit rows, through the same chunked row pass as every logit
distiller (:func:`hf_kd.row_loss.row_losses`), normalised by the rows of the optimizer step's global batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..normalization import denominator
from ..row_loss import RowBatch, RowTerm, row_losses
from .divergences import tempered_kl


def kl_to_guide(rows: RowBatch, batch: Mapping[str, Any], temperature: float,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * sum_{r in keep} KL(p_g^T(r) || p_s^T(r)) / N``: ``rows`` from :func:`~hf_kd.row_loss.rows_from_views`
    of the student and the guide ``g``, ``keep`` a ``[n]`` bool mask over them (``None``: all), ``N`` the rows of
    the step's global batch (all of them, kept or not), so that losses over disjoint masks add up to one mean over
    the rows."""
    picked = rows.rows if keep is None else rows.rows[keep]
    total, _ = row_losses(
        [RowTerm("kl", lambda student, guide, _targets: tempered_kl(student, guide, temperature), 1.0)],
        rows.student, rows.teacher, picked, None, rows.vocab_size,
        normalizer=denominator(batch, "rows", rows.rows.numel()),
    )
    return total
