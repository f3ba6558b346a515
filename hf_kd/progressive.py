"""Progressive layer-wise distillation (Aguilar et al., "Knowledge Distillation from Internal Representations",
AAAI 2020) as a callback over the generic layer-mapped distillers.

The student layers that the scheduled distillers map are trained in phases of ``n`` optimizer steps, bottom-up:

- ``progressive`` (PID): phase ``k`` trains layer ``l_k`` alone;
- ``stacked`` (SID): phase ``k`` trains layers ``l_1 .. l_k`` together;

and after the last phase the layer losses stop and the ``final_distillers`` (soft-label KD on the classifier)
take over: their weight is 0 during the phases. With the paper's losses::

    distillers = [{"name": "attention", "loss": "kl"},
                  {"name": "hidden_states", "loss": "cosine", "tokens": "cls"},
                  {"name": "kl", "temperature": 2.0}]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, distillers=distillers, ...)
    trainer.add_callback(ProgressiveLayerCallback(
        trainer.distillers, trainer.distiller_keys, layer_distillers=["attention", "hidden_states"],
        mode="progressive", epochs_per_layer=1, final_distillers=["kl"]))

Everything is a pure function of ``state.global_step``, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainerCallback

from .choices import check_choice
from .configs import from_dict
from .distillers.base import Distiller
from .distillers.representation import LayerMappedDistiller
from .schedules import Schedule

Mode = Literal["progressive", "stacked"]

logger = logging.getLogger(__name__)


@dataclass
class ProgressiveLayers:
    """What a :class:`ProgressiveLayerCallback` schedules; the fields are its keyword options.

    Args:
        layer_distillers: Trainer keys (``trainer.distiller_keys``) of the layer-mapped distillers to schedule.
        mode: ``progressive`` (one layer per phase) or ``stacked`` (cumulative layers).
        steps_per_layer: Optimizer steps per phase.
        epochs_per_layer: Or epochs per phase (rounded up to whole steps); give exactly one of the two.
        final_distillers: Trainer keys of the distillers switched on after the last phase (weight 0 before).
    """

    layer_distillers: list[str]
    mode: Mode = "progressive"
    steps_per_layer: int | None = None
    epochs_per_layer: float | None = None
    final_distillers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # One name alone is a list of one (list("kl") would be ["k", "l"]).
        self.layer_distillers, self.final_distillers = (
            [names] if isinstance(names, str) else list(names)
            for names in (self.layer_distillers, self.final_distillers)
        )
        if not self.layer_distillers:
            raise ValueError("progressive layers: `layer_distillers` is empty; name the distillers to schedule.")
        check_choice("progressive layers", "mode", self.mode, Mode)
        if (self.steps_per_layer is None) == (self.epochs_per_layer is None):
            raise ValueError("progressive layers: give exactly one of `steps_per_layer` and `epochs_per_layer`.")
        if (self.steps_per_layer if self.epochs_per_layer is None else self.epochs_per_layer) <= 0:
            raise ValueError("progressive layers: `steps_per_layer` / `epochs_per_layer` must be > 0.")
        both = sorted(set(self.layer_distillers) & set(self.final_distillers))
        if both:
            raise ValueError(f"progressive layers: {both} are both layer-scheduled and final; keep each in one list.")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ProgressiveLayers:
        return from_dict(cls, spec, "progressive layers")

    def active_layers(self, layers: Sequence[int], step: int, steps_per_layer: int) -> set[int]:
        """The student layers trained at optimizer ``step``: phase ``k = step // steps_per_layer`` of ``layers``
        (bottom-up); none once every phase is done."""
        phase = step // steps_per_layer
        if phase >= len(layers):
            return set()
        return {layers[phase]} if self.mode == "progressive" else set(layers[: phase + 1])


class ProgressiveLayerCallback(TrainerCallback):
    """Sets ``active_layers`` of the scheduled distillers at the start of every optimizer step, and switches the
    final distillers on after the last phase (see the module docstring).

    ``TrainerCallback`` events do not receive the trainer, so the callback takes the trainer's distillers and keys;
    build it once the ``DistillationTrainer`` exists (its distillers are then set up and their layer maps known)
    and add it with ``trainer.add_callback``. The phases run over the sorted union of the student layers the
    scheduled distillers map. The final distillers' weight becomes a jump schedule ``0 -> weight`` at the end of
    the phases (applied like any schedule), so their weight must be a number, not a schedule.

    Args:
        distillers: ``trainer.distillers``.
        keys: ``trainer.distiller_keys``.
        **options: The fields of :class:`ProgressiveLayers`.
    """

    def __init__(self, distillers: Sequence[Distiller], keys: Sequence[str], **options: Any) -> None:
        self.config = ProgressiveLayers.from_dict(options)
        by_key = dict(zip(keys, distillers))
        unknown = [k for k in self.config.layer_distillers + self.config.final_distillers if k not in by_key]
        if unknown:
            raise ValueError(
                f"progressive layers: no distiller with key(s) {unknown}; the trainer's keys are {list(keys)}."
            )
        self.layered = [by_key[k] for k in self.config.layer_distillers]
        not_mapped = [
            k for k, d in zip(self.config.layer_distillers, self.layered) if not isinstance(d, LayerMappedDistiller)
        ]
        if not_mapped:
            raise ValueError(
                f"progressive layers: {not_mapped} are not layer-mapped distillers (such as hidden_states or "
                f"attention) and have no layers to schedule; move them to `final_distillers` or leave them out."
            )
        self.layers = sorted(set().union(*(d.layer_map for d in self.layered)))
        if not self.layers:
            raise ValueError(
                "progressive layers: the distillers have no layer map yet; build the callback after the "
                "DistillationTrainer, which sets them up."
            )
        self.final = {k: by_key[k] for k in self.config.final_distillers}
        scheduled = [k for k, d in self.final.items() if "weight" in d.schedules]
        if scheduled:
            raise ValueError(
                f"progressive layers: final distillers {scheduled} have a weight schedule, and the callback schedules "
                f"their weight (0, then their weight after the last phase); give them a number as `weight`."
            )
        self.final_weights = {k: d.weight for k, d in self.final.items()}
        self.steps_per_layer = self.config.steps_per_layer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.config.epochs_per_layer is not None:
            self.steps_per_layer = math.ceil(self.config.epochs_per_layer * _steps_per_epoch(train_dataloader, args))
        end = self.steps_per_layer * len(self.layers)
        if self.final and end >= state.max_steps:
            logger.warning(
                f"progressive layers: the {len(self.layers)} layer phases take {end} steps and training "
                f"{state.max_steps}: the final distillers {list(self.final)} never switch on."
            )
        for key, distiller in self.final.items():
            distiller.schedules["weight"] = Schedule.jump(0.0, self.final_weights[key], end)
            distiller.set_progress(state.global_step, state.max_steps)
        self._set_layers(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set_layers(state.global_step)

    def _set_layers(self, step: int) -> None:
        for distiller in self.layered:
            distiller.active_layers = self.config.active_layers(self.layers, step, self.steps_per_layer)


def _steps_per_epoch(dataloader, args) -> int:
    """Optimizer steps per epoch, as ``Trainer`` counts them."""
    if dataloader is None or not hasattr(dataloader, "__len__"):
        raise ValueError(
            "progressive layers: `epochs_per_layer` needs a training dataset with a length; use `steps_per_layer`."
        )
    batches, accumulation = len(dataloader), args.gradient_accumulation_steps
    return max(batches // accumulation + int(batches % accumulation > 0), 1)
