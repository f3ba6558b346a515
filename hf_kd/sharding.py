"""A frozen teacher sharded over all processes with FSDP2 (``teacher_sharding="fsdp2"``), inference only.

Each transformer block is one FSDP2 unit (``fully_shard(block, reshard_after_forward=True)``): its parameters are
gathered for its forward and freed after it, so a process holds ``1 / world_size`` of the blocks plus one gathered
block at a time. Everything else (embeddings, final norm, output head: tied weights stay in one unit) is the root
unit, which stays gathered from the teacher's forward until :func:`release` after the step's loss: the fused
causal-LM path multiplies the head's input by the head's full weight chunk by chunk after the forward. Every
process must run the teacher the same number of times (its forward is collective); the trainer runs a teacher on
every micro-batch some distiller reads it, on every process alike.

No optimizer, no gradients: teachers whose parameters a distiller trains (online methods) are refused before
training. The student keeps whatever engine ``Trainer`` chose (DDP here). When that engine shards the student, the
teachers follow it (:func:`teacher_engine`): FSDP students get FSDP2 teachers, DeepSpeed ZeRO-3 students ZeRO-3
inference engines (Accelerate's ``prepare_model(evaluation_mode=True)`` would leave them whole on every device).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from .architecture import hidden_size, layers_path

logger = logging.getLogger(__name__)

TeacherSharding = Literal["none", "fsdp2"]
Engine = Literal["none", "fsdp2", "deepspeed"]


def teacher_engine(sharding: TeacherSharding, accelerator: Accelerator) -> Engine:
    """How the teachers are placed: as the student's engine when it shards (FSDP: ``fsdp2``; DeepSpeed ZeRO-3:
    ``deepspeed``), else ``fsdp2`` when asked for with several processes, else ``none`` (replicated)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp2"
    if sharding == "fsdp2" and accelerator.num_processes > 1:
        return "fsdp2"
    if sharding == "fsdp2":
        logger.info("teacher_sharding='fsdp2' with one process: the teacher is whole on it (nothing to shard).")
    return "none"


def check_shardable(engine: Engine, trained: Sequence[nn.Parameter]) -> None:
    """Sharded teachers run for inference only: refuse distillers that train teacher-side parameters."""
    if engine != "none" and trained:
        raise ValueError(
            f"A distiller trains teacher-side parameters ({len(trained)} tensors: an online method), and the teachers "
            f"are sharded ({engine}: teacher_sharding, or the student's FSDP / ZeRO-3 engine), which runs them for "
            "inference only. Set teacher_sharding='none' and train the student under DDP, or drop the online method."
        )


def place_teachers(teachers: Sequence[nn.Module], engine: Engine, accelerator: Accelerator,
                   class_names: Sequence[str] | None = None) -> list[nn.Module]:
    """``teachers`` sharded by ``engine`` (``none``: returned as they are)."""
    if engine == "fsdp2":
        return [shard_teacher(t, accelerator.device, class_names) for t in teachers]
    if engine == "deepspeed":
        return [deepspeed_teacher(t, accelerator) for t in teachers]
    return list(teachers)


def block_modules(model: nn.Module, class_names: Sequence[str] | None = None) -> list[nn.Module]:
    """The modules sharded as one unit each, innermost first: those of the classes ``class_names`` (by default the
    model's ``_no_split_modules``, e.g. ``LlamaDecoderLayer``), else the entries of its list of transformer layers."""
    names = set(class_names or getattr(model, "_no_split_modules", None) or ())
    if names:
        blocks = [m for m in reversed(list(model.modules())) if type(m).__name__ in names and m is not model]
        if blocks:
            return blocks
        if class_names:
            found = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(f"`teacher_shard_modules`={list(class_names)} matches no module of the teacher "
                             f"{type(model).__name__}; its module classes are: {', '.join(found)}.")
    return list(model.get_submodule(layers_path(model)))


def shard_teacher(teacher: nn.Module, device: torch.device, class_names: Sequence[str] | None = None) -> nn.Module:
    """``teacher`` (frozen, wherever it was loaded) sharded in place over the default process group (module
    docstring); ``fully_shard`` moves each process's shards to ``device``, so the whole teacher never lands there."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in block_modules(teacher, class_names):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=False)
    return teacher


def is_sharded(model: nn.Module) -> bool:
    """An FSDP2-sharded module or a DeepSpeed engine (:func:`deepspeed_teacher`): both gather parameters into
    buffers they reuse, so such a teacher runs under ``no_grad``, never ``inference_mode``."""
    return _is_fsdp2(model) or type(model).__module__.startswith("deepspeed")


def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def release(model: nn.Module) -> None:
    """Free the gathered root parameters of an FSDP2-sharded teacher (no-op for any other model)."""
    if _is_fsdp2(model):
        model.reshard()


def local_parameter_share(model: nn.Module) -> float:
    """The share of ``model``'s parameters this process holds (1.0 unsharded, ~1 / world_size sharded)."""
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def deepspeed_teacher(teacher: nn.Module, accelerator: Accelerator) -> Any:
    """``teacher`` in a DeepSpeed ZeRO-3 inference engine built from the student's DeepSpeed config without its
    optimizer and scheduler (parameters partitioned over the processes, gathered per module in the forward).
    ``"auto"`` values that depend on the model are resolved from the teacher's hidden size."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    width = hidden_size(teacher)
    for key, value in (("reduce_bucket_size", width * width), ("stage3_prefetch_bucket_size", int(0.9 * width * width)),
                       ("stage3_param_persistence_threshold", 10 * width)):
        if zero.get(key) == "auto":
            zero[key] = value
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
