"""What a recipe reports about each model: size, speed, metrics; written as JSON, a Markdown table and a plot."""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class ModelResult:
    """One model's row in the results: ``metrics`` are the eval metrics without the ``eval_`` prefix; ``extra`` are
    more fields of its ``results.json`` entry (e.g. a causal LM's generated ``sample``), not in the table;
    ``retention`` is ``metric / teacher's metric`` of a trained model (:func:`hf_kd.model_card.retention`), None for
    a teacher (then not in its entry)."""

    name: str
    params: int
    size_on_disk_bytes: int
    latency_ms: float
    metrics: dict[str, float]
    train_seconds: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    latency_spread_ms: float | None = None  # the interquartile range of the latency's repeats (table: median ± it)
    retention: dict[str, float] | None = None


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def size_on_disk(path: str | Path) -> int:
    """Bytes of a file, or of a saved model folder's weight files (all its files when it has no weight files)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    weights = [f for pattern in WEIGHT_PATTERNS for f in path.rglob(pattern)]
    files = weights or [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files)


def saved_size(model: nn.Module, path: str | Path) -> int:
    """Bytes of ``model``'s weights: those saved at ``path`` when it is a local folder, else (a Hub id) a fresh save."""
    if Path(path).is_dir():
        return size_on_disk(path)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return size_on_disk(folder)


def measure_latency(model: nn.Module, batch: Mapping[str, Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of one forward of ``batch`` in eval mode under ``torch.inference_mode``."""
    return measure_latencies({"model": model}, batch, repeats=repeats, warmup=warmup)["model"].median_ms


@dataclass(frozen=True)
class Latency:
    """Milliseconds of one forward: the median of the repeats, their interquartile range (``spread_ms``), min, max."""

    median_ms: float
    spread_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    threads: int


def measure_latencies(models: Mapping[str, nn.Module], batch: Mapping[str, Any], repeats: int = 50,
                      warmup: int = 5, threads: int | None = None) -> dict[str, Latency]:
    """The latency of one forward of ``batch`` through each model, measured so models can be compared.

    Each model runs ``warmup`` forwards first, then the models take turns, one forward each per round, for
    ``repeats`` rounds (so a slow spell of the machine hits all of them alike), in eval mode under
    ``torch.inference_mode`` with ``torch.get_num_threads()`` fixed to ``threads`` (None: the current count) for
    the whole measurement; each model's training mode and the thread count are restored afterwards.
    """
    previous = torch.get_num_threads()
    threads = threads or previous
    states = {name: model.training for name, model in models.items()}
    inputs = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        inputs[name] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        model.eval()
    timings: dict[str, list[float]] = {name: [] for name in models}

    def forward(name: str) -> float:
        start = time.perf_counter()
        models[name](**inputs[name])
        device = next(models[name].parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1000 * (time.perf_counter() - start)

    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for name in models:
                for _ in range(warmup):
                    forward(name)
            for _ in range(repeats):
                for name in models:
                    timings[name].append(forward(name))
    finally:
        torch.set_num_threads(previous)
        for name, model in models.items():
            model.train(states[name])
    return {name: _latency(values, threads) for name, values in timings.items()}


def _latency(values: list[float], threads: int) -> Latency:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return Latency(statistics.median(values), quartiles[2] - quartiles[0], min(values), max(values), len(values),
                   threads)


def results_table(results: Mapping[str, ModelResult]) -> str:
    """A Markdown table: model | params | size (MB) | latency (ms) | one column per metric."""
    metrics = list(dict.fromkeys(name for result in results.values() for name in result.metrics))
    lines = ["| " + " | ".join(["model", "params", "size (MB)", "latency (ms)", *metrics]) + " |",
             "|" + "---|" * (4 + len(metrics))]
    for result in results.values():
        values = [f"{result.metrics[m]:.4g}" if m in result.metrics else "–" for m in metrics]
        cells = [result.name, f"{result.params:,}", f"{result.size_on_disk_bytes / 1e6:.2f}",
                 _latency_cell(result), *values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _latency_cell(result: ModelResult) -> str:
    spread = "" if result.latency_spread_ms is None else f" ± {result.latency_spread_ms:.2f}"
    return f"{result.latency_ms:.2f}{spread}"


def write_results(
    output_dir: str | Path, results: Mapping[str, ModelResult], notes: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write ``results.json`` (``{role: fields}``, a result's ``extra`` among them) and ``results.md`` (the table,
    then ``notes``) to ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    json_path.write_text(json.dumps({role: _entry(r) for role, r in results.items()}, indent=2))
    md_path.write_text("\n\n".join([results_table(results), *notes]) + "\n")
    return json_path, md_path


def _entry(result: ModelResult) -> dict[str, Any]:
    fields = dataclasses.asdict(result)
    extra = fields.pop("extra")
    if fields["retention"] is None:
        fields.pop("retention")
    return {**fields, **extra}


def plot_history(histories: Mapping[str, list[dict]], path: str | Path, metric: str) -> Path:
    """Plot each phase's training loss components and ``eval_<metric>`` over steps (two panels) to a PNG.

    ``histories`` maps a phase name to its ``trainer.state.log_history``; the losses are ``loss`` and every
    ``loss/<distiller>`` key.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, evals) = plt.subplots(1, 2, figsize=(11, 4))
    for phase, history in histories.items():
        keys = dict.fromkeys(k for entry in history for k in entry if k == "loss" or k.startswith("loss/"))
        for key in [*keys, f"eval_{metric}"]:
            points = [(entry["step"], entry[key]) for entry in history if key in entry]
            if points:
                axes = evals if key.startswith("eval_") else losses
                axes.plot(*zip(*points), marker=".", label=f"{phase}: {key}")
    for axes, title in ((losses, "training loss"), (evals, f"eval {metric}")):
        axes.set(title=title, xlabel="step")
        if axes.has_data():
            axes.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
