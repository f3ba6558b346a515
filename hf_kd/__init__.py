"""hf_kd: knowledge distillation as a drop-in for ``transformers.Trainer``."""

from .arguments import DistillationArguments
from .callbacks import DistillationCallback, ScheduleCallback
from .capture import ModelView, Requirements
from .distillers import (
    ATSCDistiller,
    AttentionDistiller,
    BDKDDistiller,
    DualDEDistiller,
    MutualLearningDistiller,
    OKDDistiller,
    PeerToPeerDistiller,
    BlockSwapDistiller,
    CompositeDistiller,
    DKDDistiller,
    Distiller,
    FeatureDistiller,
    FeatureMixingDistiller,
    HiddenStatesDistiller,
    InstanceFeatureDistiller,
    JSDDistiller,
    KLDistiller,
    LogitDistiller,
    LogitMSEDistiller,
    MiniLMRelationDistiller,
    ReverseKLDistiller,
    SOKDDistiller,
    SkewKLDistiller,
    SkewReverseKLDistiller,
    TVDDistiller,
    TinyBERTDistiller,
    build_distiller,
    list_distillers,
    register_distiller,
)
from .distillers.atsc import load_atsc_student
from .progressive import ProgressiveLayerCallback, ProgressiveLayers
from .schedules import Schedule
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "ATSCDistiller",
    "AttentionDistiller",
    "BDKDDistiller",
    "DualDEDistiller",
    "MutualLearningDistiller",
    "OKDDistiller",
    "PeerToPeerDistiller",
    "BlockSwapDistiller",
    "CompositeDistiller",
    "DKDDistiller",
    "DistillationArguments",
    "DistillationCallback",
    "DistillationTrainer",
    "Distiller",
    "FeatureDistiller",
    "FeatureMixingDistiller",
    "HiddenStatesDistiller",
    "InstanceFeatureDistiller",
    "JSDDistiller",
    "KLDistiller",
    "LogitDistiller",
    "LogitMSEDistiller",
    "MiniLMRelationDistiller",
    "ModelView",
    "ProgressiveLayerCallback",
    "ProgressiveLayers",
    "Requirements",
    "ReverseKLDistiller",
    "Schedule",
    "SOKDDistiller",
    "ScheduleCallback",
    "SkewKLDistiller",
    "SkewReverseKLDistiller",
    "TVDDistiller",
    "TinyBERTDistiller",
    "build_distiller",
    "list_distillers",
    "load_atsc_student",
    "register_distiller",
]
