"""What a distillation checkpoint holds beside Trainer's files, written so that nothing trained is lost.

A checkpoint folder ``checkpoint-N`` gets, next to the student's weights and before Trainer writes
``trainer_state.json`` (the file that makes it count) and rotates older checkpoints away:

- ``distillers.pt``: the distillers' state (projectors, branches, peers, memory, learned mixing, ...);
- ``teacher_trained.pt``: the teacher-side parameters online distillers train (adapters, adapted heads, ...);
- ``distillers.json``: which distillers wrote them (keys, registry names, classes, the specs given) and which
  files they hold.

Each file is written to a temporary name and renamed into place, so a file under its final name is always whole.
A checkpoint is *complete* when ``trainer_state.json`` parses and every state file the run needs is there;
``resume_from_checkpoint=True`` takes the newest complete one, and resuming from an incomplete one, or with other
distillers than the checkpoint's, is refused with a message naming what is missing or different.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

DISTILLER_STATE_NAME = "distillers.pt"
TEACHER_STATE_NAME = "teacher_trained.pt"
MANIFEST_NAME = "distillers.json"
TRAINER_STATE_NAME = "trainer_state.json"  # Trainer's own; written after the files above

WHAT_THEY_HOLD = {
    DISTILLER_STATE_NAME: "the distillers' state (projectors, branches, peers, learned weights)",
    TEACHER_STATE_NAME: "the teacher-side parameters the online distillers train (adapters, adapted weights)",
}


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: a reader never sees a partly written ``path``."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_distillation_state(
    folder: str, manifest: dict[str, Any], states: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Write the state files that are not empty, then the manifest naming them."""
    written = []
    for name, state in states.items():
        if state:
            atomic_write(os.path.join(folder, name), lambda tmp, state=state: torch.save(state, tmp))
            written.append(name)
    manifest = {**manifest, "state_files": written}
    atomic_write(os.path.join(folder, MANIFEST_NAME), lambda tmp: _write_json(tmp, manifest))


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def describe(keys: Sequence[str], distillers: Sequence[torch.nn.Module], specs: Sequence[Any] = ()) -> list[dict]:
    """The distillers as a checkpoint records them: trainer key, registry name, class, and the spec they were built
    from (the dict given, for the record; only keys and names must match on resume, so options may change)."""
    specs = list(specs) + [None] * (len(keys) - len(specs))
    return [{"key": key, "name": d.name, "class": f"{type(d).__module__}.{type(d).__qualname__}",
             "spec": json.loads(json.dumps(spec, default=repr)) if isinstance(spec, Mapping) else None}
            for key, d, spec in zip(keys, distillers, specs)]


def missing_files(folder: str, needed: Sequence[str]) -> list[str]:
    """The files a complete checkpoint of this run needs that ``folder`` lacks (``trainer_state.json`` included)."""
    missing = [name for name in needed if not os.path.isfile(os.path.join(folder, name))]
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except (OSError, ValueError):
        missing.insert(0, TRAINER_STATE_NAME)
    return missing


def last_complete_checkpoint(output_dir: str, needed: Sequence[str]) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` with every file in ``needed``; incomplete newer ones (an
    interrupted save) are skipped with a warning."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name)))
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        missing = missing_files(folder, needed)
        if not missing:
            return folder
        logger.warning("Skipping %s: its save did not finish (missing %s).", folder, ", ".join(missing))
    return None


def check_resumable(folder: str, needed: Sequence[str], current: list[dict[str, str]]) -> None:
    """Refuse a checkpoint that cannot restore this run: other distillers, or a state file missing."""
    path = os.path.join(folder, MANIFEST_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f).get("distillers", [])
        strip = [[{k: d[k] for k in ("key", "name")} for d in ds] for ds in (saved, current)]
        if strip[0] != strip[1]:
            raise ValueError(
                f"The distillers differ from the checkpoint's, so {folder} cannot be resumed: it was written by "
                f"{_listing(saved)}, this trainer has {_listing(current)}. Resume with the checkpoint's distillers, "
                f"or start a new run (a new output_dir, or resume_from_checkpoint=None)."
            )
    for name in needed:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(
                f"{folder} has no {name}, which holds {WHAT_THEY_HOLD[name]}; resuming would silently restart them "
                f"from scratch. The checkpoint comes from an interrupted save or a run with other distillers: resume "
                f"from a complete checkpoint (resume_from_checkpoint=True picks the newest one) or start over."
            )


def needed_state_files(distillers: torch.nn.Module, teacher_trained: bool) -> list[str]:
    """The distillation state files a checkpoint of this run must hold to be resumed."""
    return ([DISTILLER_STATE_NAME] if distillers.state_dict() else []) + ([TEACHER_STATE_NAME] if teacher_trained
                                                                          else [])


def load_distillation_state(
    folder: str, distillers: torch.nn.Module, trained_teacher: Mapping[str, torch.Tensor], device: Any
) -> None:
    """Restore the distillers' state and the trained teacher-side parameters (``trained_teacher``: the live
    tensors by name, empty when nothing of the teacher trains) from checkpoint ``folder``."""
    path = os.path.join(folder, DISTILLER_STATE_NAME)
    if os.path.isfile(path):
        saved = torch.load(path, map_location=device, weights_only=True)
        try:
            distillers.load_state_dict(saved)
        except RuntimeError as error:
            raise ValueError(
                f"{path} does not fit the distillers' current options (their state changed shape or names): "
                f"{error}. Resume with the options the checkpoint was trained with."
            ) from None
    path = os.path.join(folder, TEACHER_STATE_NAME)
    if os.path.isfile(path) and trained_teacher:
        saved = torch.load(path, map_location=device, weights_only=True)
        if saved.keys() != trained_teacher.keys():
            raise ValueError(
                f"{path} holds teacher parameters {sorted(saved)}, but the distillers now train "
                f"{sorted(trained_teacher)}; resume with the same distillers."
            )
        with torch.no_grad():
            for name, value in saved.items():
                trained_teacher[name].copy_(value)


def _listing(distillers: list[dict[str, str]]) -> str:
    return "[" + ", ".join(f"{d['key']} ({d['name']})" for d in distillers) + "]"
