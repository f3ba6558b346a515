"""Run by tests/test_distributed.py, under ``torchrun --nproc_per_node 2`` (gloo, CPU) and in-process as the
1-process reference: 4 optimizer steps of a global batch of 8 for each CONFIG, with default TrainingArguments
(``average_tokens_across_devices=True``), SGD, and a checkpoint at the end. ``main(path)`` runs every config as
2 processes x 4 and as 2 processes x 2 x accumulation 2, and process 0 saves what each run logged and learned.

``REFERENCES[config]`` maps each 2-process layout ``(per_device, accumulation)`` to the 1-process layout that must
give the same results: one micro-batch of the global batch for per-sample losses; for relation distillers, which
relate the samples of a micro-batch, the same micro-batches in one process (``accumulation`` x 2); for CRD, whose
memory banks every process updates with all processes' rows, the processes' micro-batches merged."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import PAD, bert, llama, lm_data, prompt_data, text_classification_data  # noqa: E402
from hf_kd import (  # noqa: E402
    DistillationArguments,
    DistillationTrainer,
    PromptCompletionCollator,
    cache_teacher_outputs,
)
from hf_kd.agreement import METRICS as AGREEMENT  # noqa: E402
from hf_kd.distillers.base import _REGISTRY  # noqa: E402
from hf_kd.processes import close_process_group  # noqa: E402
from hf_kd.sharding import local_parameter_share  # noqa: E402

STEPS, GLOBAL_BATCH = 4, 8

CONFIGS = {
    "kl_classifier": dict(family="text", evaluate=True, distillers=[{"name": "kl", "temperature": 2.0}]),
    "kl_padded_lm": dict(family="lm", evaluate=True, distillers=[{"name": "kl", "temperature": 2.0}]),
    "hidden_states_projector": dict(family="text", distillers=[{"name": "hidden_states", "projector": "linear"}]),
    "atsc_online_teacher": dict(family="text", distillers=[{"name": "atsc"}]),
    # Two teachers: a learned aggregation (its weights trained) and one projector per teacher.
    "two_teachers_classifier": dict(family="text", teachers=2, distillers=[
        {"name": "kl", "teacher_aggregation": "learned"}, {"name": "hidden_states", "teacher": "all"}]),
    # The teacher sharded over the processes (FSDP2), the student under DDP: the same run as replicated.
    "sharded_teacher_classifier": dict(family="text", args={"teacher_sharding": "fsdp2", "teacher_eval_metrics": True},
                                       evaluate=True, distillers=[
        {"name": "kl", "temperature": 2.0}, {"name": "hidden_states", "projector": "linear"}]),
    "sharded_teacher_fused_lm": dict(family="lm", args={"teacher_sharding": "fsdp2"},
                                     distillers=[{"name": "kl", "temperature": 2.0}]),
    # On-policy GKD: each process generates (greedy: the same sequences however prompts are batched) for its own
    # micro-batches, then the one normalisation rule over the step's completion tokens.
    "on_policy_lm": dict(family="prompt", args={"lmbda": 1.0, "generation_temperature": 0.0, "max_new_tokens": 4,
                                                "hard_label_weight": 0.0}, distillers=[{"name": "jsd", "beta": 0.5}]),
    # No teacher run: a top-k offline cache, its rows found by sample index under the distributed sampler.
    "cached_teacher_lm": dict(family="lm", cache_top_k=8, distillers=[{"name": "kl", "temperature": 2.0}]),
}
RELATIONS = sorted(n for n, c in _REGISTRY.items() if c.family == "relation" and c.__module__.startswith("hf_kd."))
CONFIGS.update({f"relation_{name}": dict(family="text", distillers=[{"name": name}]) for name in RELATIONS})
LAYOUTS = ((4, 1), (2, 2))
REFERENCES = {config: {(4, 1): (8, 1), (2, 2): (8, 1)} for config in CONFIGS}
REFERENCES.update({f"relation_{name}": {(4, 1): (4, 2), (2, 2): (2, 4)} for name in RELATIONS})
REFERENCES["relation_crd"] = {(4, 1): (8, 1), (2, 2): (4, 2)}


def run(config: str, per_device: int, accumulation: int, output_dir: str) -> dict:
    spec = CONFIGS[config]
    if spec["family"] == "text":
        student, teacher, data = bert(seed=1), bert(layers=3, hidden=48, seed=2), text_classification_data(n=32)
        if spec.get("teachers") == 2:
            teacher = [teacher, bert(layers=2, hidden=24, seed=3)]
    else:
        student, teacher, data = llama(seed=1), llama(layers=3, hidden=48, seed=2), lm_data(n=32)
    collator = PromptCompletionCollator(PAD) if spec["family"] == "prompt" else None
    if collator is not None:
        data = prompt_data(n=32)
    args = DistillationArguments(
        output_dir=output_dir, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        max_steps=STEPS, logging_steps=1, save_strategy="steps", save_steps=STEPS,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, per_device_eval_batch_size=4,
        **spec.get("args", {}),
    )
    cache = None
    if "cache_top_k" in spec:  # each process builds its own copy (the same rows), as a run reading a shared folder
        cache = os.path.join(output_dir, f"cache-{os.environ.get('RANK', '0')}")
        cache_teacher_outputs(teacher, data, cache, top_k=spec["cache_top_k"])
        teacher = None
    trainer = DistillationTrainer(model=student, teacher_model=teacher, teacher_cache=cache, args=args,
                                  train_dataset=data, distillers=spec["distillers"], data_collator=collator)
    trainer.train()
    # Evaluation runs the (sharded) teacher too: distiller terms, agreement and the teacher's own metrics; over 8 rows
    # (2 x 4 per batch), and the agreement over 11 rows, whose last batch is padded with repeated rows across
    # processes: those must not count (the batch-mean losses of a padded batch cannot drop them, as in Trainer).
    data_of = text_classification_data if spec["family"] == "text" else lm_data
    metrics, padded = {}, {}
    if spec.get("evaluate"):
        metrics = trainer.evaluate(data_of(n=8, seed=7))
        padded = trainer.evaluate(data_of(n=11, seed=8), metric_key_prefix="padded")
    checkpoint = os.path.join(output_dir, f"checkpoint-{STEPS}")
    saved = {name: torch.load(os.path.join(checkpoint, name), weights_only=True)
             for name in ("distillers.pt", "teacher_trained.pt") if os.path.isfile(os.path.join(checkpoint, name))}
    return {
        "logs": [{k: v for k, v in log.items() if k == "loss" or k.startswith("loss/")}
                 for log in trainer.state.log_history if "loss" in log],
        "student": {n: p.detach().clone() for n, p in student.named_parameters()},
        "distillers": {n: p.detach().clone() for n, p in trainer.distillers.named_parameters()},
        "teacher": {n: p.clone() for n, p in trainer._trained_teacher_state().items()},
        "checkpoint": saved,
        "processes": trainer.accelerator.num_processes,
        "state_agrees": state_agrees(trainer.distillers.state_dict()),
        "teacher_shares": every_process(local_parameter_share(trainer.teacher) if trainer.teacher else 0.0),
        "fused": trainer._fused_lm,
        "generate_calls": every_process(float(trainer._completions.generate_calls["student"])
                                        if trainer._completions is not None else 0.0),
        "eval": {k: v for k, v in metrics.items() if "loss" in k or k.endswith(AGREEMENT)},
        "padded_eval": {k: v for k, v in padded.items() if k.endswith(AGREEMENT)},
    }


def every_process(value: float) -> list[float]:
    """``value`` of every process (``[value]`` without a process group)."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def state_agrees(state: dict) -> bool:
    """Whether every process holds the same distiller state (parameters and buffers, e.g. CRD's memory banks)."""
    if not torch.distributed.is_initialized():
        return True
    agrees = True
    for value in state.values():
        copies = [torch.empty_like(value) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(copies, value.contiguous())
        agrees &= all(torch.equal(copy, copies[0]) for copy in copies)
    return agrees


def main(path: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for config in CONFIGS:
        for per_device, accumulation in LAYOUTS:
            out = os.path.join(os.path.dirname(path), f"{config}_{per_device}x{accumulation}")
            results[(config, per_device, accumulation)] = run(config, per_device, accumulation, out)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, path)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
