"""Distillers: the registry and every built-in method (importing this package registers them)."""

from .atsc import ATSCDistiller
from .base import Distiller, build_distiller, list_distillers, register_distiller
from .logit import (
    DKDDistiller,
    JSDDistiller,
    KLDistiller,
    LogitDistiller,
    LogitMSEDistiller,
    ReverseKLDistiller,
    SkewKLDistiller,
    SkewReverseKLDistiller,
    TVDDistiller,
)
from .okd import OKDDistiller
from .bdkd import BDKDDistiller, register_bdkd_weighting
from .deit import DeiTDistiller
from .dualde import DualDEDistiller
from .peers import MutualLearningDistiller, PeerToPeerDistiller
from .presets import CompositeDistiller, TinyBERTDistiller
from .relation import MiniLMRelationDistiller
from .sokd import SOKDDistiller
from .teacher_guided import BlockSwapDistiller, FeatureMixingDistiller, InstanceFeatureDistiller
from .representation import AttentionDistiller, FeatureDistiller, HiddenStatesDistiller, LayerMappedDistiller

__all__ = [
    "ATSCDistiller",
    "BDKDDistiller",
    "DualDEDistiller",
    "MutualLearningDistiller",
    "OKDDistiller",
    "PeerToPeerDistiller",
    "register_bdkd_weighting",
    "AttentionDistiller",
    "BlockSwapDistiller",
    "CompositeDistiller",
    "DeiTDistiller",
    "FeatureDistiller",
    "FeatureMixingDistiller",
    "HiddenStatesDistiller",
    "InstanceFeatureDistiller",
    "LayerMappedDistiller",
    "DKDDistiller",
    "Distiller",
    "JSDDistiller",
    "KLDistiller",
    "LogitDistiller",
    "LogitMSEDistiller",
    "MiniLMRelationDistiller",
    "ReverseKLDistiller",
    "SOKDDistiller",
    "SkewKLDistiller",
    "SkewReverseKLDistiller",
    "TVDDistiller",
    "TinyBERTDistiller",
    "build_distiller",
    "list_distillers",
    "register_distiller",
]
