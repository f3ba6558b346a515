"""Distillers: the registry and every built-in method (importing this package registers them).

A method lives in the file of its registry name (``sokd`` in ``sokd.py``); plain per-row logit losses share
``logit.py`` and plain representation matches ``representation.py``; a subclass may sit beside its parent (``p2p`` in
``mutual.py``). ``Distiller.family`` places each in the taxonomy of ``docs/distillers.md``.
"""

from .anchor_relation import AnchorRelationDistiller
from .atsc import ATSCDistiller
from .base import Distiller, build_distiller, list_distillers, register_distiller
from .bdkd import BDKDDistiller, register_bdkd_weighting
from .block_swap import BlockSwapDistiller
from .ces_kd import CESKDDistiller, register_ces_selection
from .composite import CompositeDistiller
from .crd import CRDDistiller
from .deit import DeiTDistiller
from .dgkd import DGKDDistiller
from .dualde import DualDEDistiller
from .feature_mixing import FeatureMixingDistiller
from .fsp import FSPDistiller
from .instance_feature import InstanceFeatureDistiller
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
from .minilm_relation import MiniLMRelationDistiller
from .mutual import MutualLearningDistiller, PeerToPeerDistiller
from .okd import OKDDistiller
from .relation import PKTDistiller, RelationDistiller, RKDDistiller, SPDistiller
from .representation import AttentionDistiller, FeatureDistiller, HiddenStatesDistiller, LayerMappedDistiller
from .sokd import SOKDDistiller
from .tinybert import TinyBERTDistiller
from .topology import TopologyDistiller
from .virtual_teacher import VirtualTeacherDistiller

__all__ = [
    "ATSCDistiller",
    "AnchorRelationDistiller",
    "AttentionDistiller",
    "BDKDDistiller",
    "BlockSwapDistiller",
    "CESKDDistiller",
    "CRDDistiller",
    "CompositeDistiller",
    "DGKDDistiller",
    "DKDDistiller",
    "DeiTDistiller",
    "Distiller",
    "DualDEDistiller",
    "FeatureDistiller",
    "FSPDistiller",
    "FeatureMixingDistiller",
    "HiddenStatesDistiller",
    "InstanceFeatureDistiller",
    "JSDDistiller",
    "KLDistiller",
    "LayerMappedDistiller",
    "LogitDistiller",
    "LogitMSEDistiller",
    "MiniLMRelationDistiller",
    "MutualLearningDistiller",
    "OKDDistiller",
    "PKTDistiller",
    "PeerToPeerDistiller",
    "RKDDistiller",
    "RelationDistiller",
    "ReverseKLDistiller",
    "SOKDDistiller",
    "SPDistiller",
    "SkewKLDistiller",
    "SkewReverseKLDistiller",
    "TVDDistiller",
    "TinyBERTDistiller",
    "TopologyDistiller",
    "VirtualTeacherDistiller",
    "build_distiller",
    "list_distillers",
    "register_bdkd_weighting",
    "register_ces_selection",
    "register_distiller",
]
