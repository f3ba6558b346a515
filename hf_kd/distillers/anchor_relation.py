"""``anchor_relation``: each sample's similarity distribution over a set of anchors, the teacher's taught to the
student (ReKD-style relation KD)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import classifier_head
from ..capture import ModelView
from ..choices import check_choice
from ..projectors import build_projector, project
from ..schedules import Knob
from .base import register_distiller
from .divergences import forward_kl
from .relation import RelationDistiller

Anchors = Literal["batch", "classifier", "learned"]


@register_distiller("anchor_relation")
class AnchorRelationDistiller(RelationDistiller):
    """Relation KD over anchors (ReKD, Zheng et al., AAAI 2022, https://huggingface.co/papers/2112.04174): with
    cosine similarities to a set of anchors ``A``::

        r(x) = softmax(cos(x, A) / tau),        L = mean_samples KL(r_t(e_t) || r_s(e_s))

    ``anchors``:

    - ``batch`` (default): the other samples of the micro-batch, each model in its own space (widths may differ; a
      sample is never its own anchor);
    - ``classifier``: the teacher classifier's weight rows (its class directions); the student's embedding is mapped
      to the teacher's width by a projector, and the teacher's embedding must be what its classifier reads (e.g.
      ``embedding="pooler"`` for BERT, ``"cls"`` for ViT — checked in ``setup``);
    - ``learned``: ``num_anchors`` vectors in the teacher's space, trained with the student (they get gradients
      through the student's distribution only; the teacher's is computed with them detached). The student is
      projected as for ``classifier``.

    ReKD's exact anchors and temperature are unverified (known from the abstract): ``temperature=0.1`` and the
    choices above are this library's. The term is batch-level for ``batch`` anchors (relations within a micro-batch,
    weighted by its share) and per sample otherwise.
    """

    def __init__(
        self,
        weight: Knob = 1.0,
        embedding: str | Mapping[str, str] = "cls",
        layer: int = -1,
        anchors: Anchors = "batch",
        temperature: Knob = 0.1,
        num_anchors: int = 16,
    ) -> None:
        super().__init__(weight, embedding, layer)
        self.anchors = check_choice("anchor_relation", "anchors", anchors, Anchors)
        if num_anchors < 1:
            raise ValueError(f"anchor_relation: `num_anchors` must be >= 1, got {num_anchors}.")
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        self.num_anchors = num_anchors
        self.batch_level = anchors == "batch"  # fixed anchors: a term per sample
        self.projector: nn.Module = nn.Identity()
        self.learned = nn.Parameter(torch.empty(0))
        self._class_rows: list[nn.Linear] = []  # a list: the teacher's head is not a submodule of the distiller

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        if self.anchors == "batch":
            return
        t_width = self.width(teacher, "teacher")
        if self.anchors == "classifier":
            head = classifier_head(teacher)
            linear = None if head is None else next(m for k, m in head[1].items() if k in ("classifier", "score"))
            if linear is None or linear.in_features != t_width:
                raise ValueError(
                    f"anchor_relation: anchors='classifier' compares the teacher's embedding with its classifier's "
                    f"rows, so the embedding must be what the classifier reads (width "
                    f"{None if linear is None else linear.in_features}); embedding={self.embedding!r} gives {t_width}. "
                    f"Use embedding='pooler' (BERT) or 'cls' (ViT), or anchors='batch'."
                )
            self._class_rows = [linear]
        else:
            generator = torch.Generator().manual_seed(0)
            self.learned = nn.Parameter(F.normalize(torch.randn(self.num_anchors, t_width, generator=generator), dim=1))
        self.projector = build_projector(self.width(student, "student"), t_width, "auto")

    def anchor_rows(self) -> torch.Tensor:
        return self._class_rows[0].weight if self.anchors == "classifier" else self.learned

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        e_s = self.embeddings(student, batch, "student")
        with torch.no_grad():
            e_t = self.embeddings(teacher, batch, "teacher")
        if self.anchors == "batch":
            return self.relation_loss(e_s, e_t)
        anchors = self.anchor_rows().float()
        e_s = project(self.projector, e_s)
        return forward_kl(self.similarities(e_s, anchors), self.similarities(e_t, anchors.detach())).mean()

    def similarities(self, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """``cos(x, A) / tau``, ``[B, K]``."""
        return F.normalize(x, dim=-1) @ F.normalize(anchors, dim=-1).t() / self.temperature

    def relation_loss(self, student, teacher):
        """``batch`` anchors: every other sample of the micro-batch (the diagonal is left out)."""
        if student.shape[0] < 2:
            return student.sum() * 0.0
        s, t = (self.similarities(x, x) for x in (student, teacher))
        others = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
        return forward_kl(s[others].view(len(s), -1), t[others].view(len(t), -1)).mean()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", anchors={self.anchors!r}, temperature={self.temperature}"
