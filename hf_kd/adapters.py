"""peft adapters injected in place into a teacher, for online methods that adapt a frozen teacher (OKD, ATSC).

The adapters are added to the teacher module itself (``peft.inject_adapter_in_model``), so the trainer's teacher
forward, hooks and checkpoints keep working on the same object; the teacher's own weights are never touched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def build_peft_config(peft_config: Any, model: nn.Module):
    """A peft config from a ``PeftConfig`` instance or a dict of ``LoraConfig`` options (defaults ``r=8``,
    ``lora_alpha=16``, no dropout; ``target_modules`` defaults to peft's choice for the architecture, else every
    linear layer)."""
    try:
        from peft import LoraConfig, PeftConfig
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError as error:  # pragma: no cover - peft is a dependency
        raise ImportError("Teacher adapters need peft: `pip install peft`.") from error
    if isinstance(peft_config, PeftConfig):
        return peft_config
    options = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **dict(peft_config or {})}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if options.get("target_modules") is None:
        known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        options["target_modules"] = list(known) if known else "all-linear"
    if model_type == "gpt2":  # Conv1D layers store their weight transposed
        options.setdefault("fan_in_fan_out", True)
    return LoraConfig(**options)


def inject_adapters(model: nn.Module, peft_config: Any, adapter_name: str, method: str) -> list[nn.Parameter]:
    """Inject the adapter ``adapter_name`` into ``model`` in place (once: a second call returns the existing one) and
    return its parameters (fp32 even in a low-precision model; peft casts the input to them)."""
    from peft import inject_adapter_in_model

    existing = getattr(model, "peft_config", None) or {}
    if adapter_name in existing:  # already injected (e.g. the same teacher given to a second trainer)
        return [p for n, p in model.named_parameters() if is_adapter_parameter(n, adapter_name)]
    before = {id(p) for p in model.parameters()}
    inject_adapter_in_model(build_peft_config(peft_config, model), model, adapter_name)
    params = [p for p in model.parameters() if id(p) not in before]
    for p in params:
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if not params:
        raise ValueError(
            f"{method}: the peft config matched no module of {type(model).__name__}; set "
            "`peft_config={'target_modules': [...]}` (or 'all-linear')."
        )
    return params


def is_adapter_parameter(name: str, adapter_name: str) -> bool:
    return f".{adapter_name}." in name or name.endswith(f".{adapter_name}")


def lora_delta_norm(model: nn.Module, adapter_name: str) -> torch.Tensor:
    """``sum_layers ||s * B A||_F^2``: the squared distance of the adapted weights from the base weights, for LoRA
    adapters, computed from the ``r x r`` Gram matrices (``||BA||^2 = sum((B^T B) * (A A^T))``) without forming
    ``B A``."""
    total = None
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        a, b = lora_a[adapter_name].weight.float(), lora_b[adapter_name].weight.float()
        scale = float(module.scaling[adapter_name])
        term = scale * scale * ((b.T @ b) * (a @ a.T)).sum()
        total = term if total is None else total + term.to(total.device)
    if total is None:
        raise ValueError(f"No LoRA adapter named {adapter_name!r} in {type(model).__name__}.")
    return total
