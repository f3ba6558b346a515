"""hf_kd: knowledge distillation as a drop-in for ``transformers.Trainer``."""

from .arguments import DistillationArguments
from .callbacks import DistillationCallback, ScheduleCallback
from .capture import ModelView, Requirements
from .distillers import (
    DKDDistiller,
    Distiller,
    JSDDistiller,
    KLDistiller,
    LogitDistiller,
    LogitMSEDistiller,
    ReverseKLDistiller,
    SkewKLDistiller,
    SkewReverseKLDistiller,
    TVDDistiller,
    build_distiller,
    list_distillers,
    register_distiller,
)
from .schedules import Schedule
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "DKDDistiller",
    "DistillationArguments",
    "DistillationCallback",
    "DistillationTrainer",
    "Distiller",
    "JSDDistiller",
    "KLDistiller",
    "LogitDistiller",
    "LogitMSEDistiller",
    "ModelView",
    "Requirements",
    "ReverseKLDistiller",
    "Schedule",
    "ScheduleCallback",
    "SkewKLDistiller",
    "SkewReverseKLDistiller",
    "TVDDistiller",
    "build_distiller",
    "list_distillers",
    "register_distiller",
]
