"""hf_kd: knowledge distillation as a drop-in for ``transformers.Trainer``.

The public API: the trainer and its arguments, the contract a distiller implements (:class:`Distiller`,
:class:`Requirements`, :class:`ModelView`, :class:`FeatureSpec`), schedules, callbacks, the registry, and
:func:`distill_chain` (teacher -> assistants -> student, TAKD), :func:`make_self_teacher` (a teacher of the
student's own architecture, for teacher-free KD), :func:`cache_teacher_outputs` (a teacher's outputs saved once,
to train from with ``teacher_cache=``). Distillers are picked by registry name (``{"name": "kl", "temperature":
2.0}``); their classes are importable from :mod:`hf_kd.distillers`.
"""

from importlib.metadata import PackageNotFoundError, version

from .arguments import DistillationArguments
from .cache import cache_teacher_outputs
from .callbacks import DistillationCallback
from .capture import FeatureSpec, ModelView, Requirements
from .chain import distill_chain
from .distillers import Distiller, build_distiller, list_distillers, register_distiller
from .distillers.atsc import load_atsc_student
from .progressive import ProgressiveLayerCallback, ProgressiveLayers
from .prompts import PromptCompletionCollator, tokenize_prompts
from .schedules import Schedule
from .self_teacher import make_self_teacher
from .trainer import DistillationTrainer

try:
    __version__ = version("hf_kd")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "DistillationArguments",
    "DistillationCallback",
    "DistillationTrainer",
    "Distiller",
    "FeatureSpec",
    "ModelView",
    "ProgressiveLayerCallback",
    "ProgressiveLayers",
    "PromptCompletionCollator",
    "Requirements",
    "Schedule",
    "build_distiller",
    "cache_teacher_outputs",
    "distill_chain",
    "list_distillers",
    "load_atsc_student",
    "make_self_teacher",
    "register_distiller",
    "tokenize_prompts",
]
