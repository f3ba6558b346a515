"""A model card (``README.md``) for a distilled student: Hub front matter, how it was made, results, how to load."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData
from transformers.models.auto import modeling_auto

from .report import ModelResult, results_table

AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                "AutoModelForQuestionAnswering", "AutoModelForImageClassification", "AutoModelForMaskedLM",
                "AutoModelForSeq2SeqLM", "AutoModelForAudioClassification")


def auto_class_name(output_dir: Path) -> str:
    """The ``AutoModel*`` class that loads the saved model in ``output_dir`` (``AutoModel`` when none matches)."""
    config = output_dir / "config.json"
    architectures = (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []
    for name in AUTO_CLASSES:
        if set(architectures) & set(getattr(modeling_auto, name)._model_mapping._model_mapping.values()):
            return name
    return "AutoModel"


def write_model_card(
    output_dir: str | Path,
    *,
    recipe: str,
    teacher: str,
    dataset: str,
    distillers: Sequence[Mapping[str, Any]],
    results: Mapping[str, ModelResult],
    base_model: str | None = None,
) -> Path:
    """Write ``output_dir/README.md`` for the student saved there; returns its path."""
    output_dir = Path(output_dir)
    metrics = list(dict.fromkeys(name for result in results.values() for name in result.metrics))
    card_data = ModelCardData(library_name="transformers", tags=["hf-kd", "knowledge-distillation", recipe],
                              datasets=[dataset], metrics=metrics, base_model=base_model)
    auto_class = auto_class_name(output_dir)
    body = f"""# {output_dir.name}

Distilled with the hf_kd recipe `{recipe}` from the teacher `{teacher}` on `{dataset}`.

Distillers: `{json.dumps(list(distillers))}`

Reproduce:

```bash
hf-kd run recipes/{recipe}.yaml    # or: python recipes/{recipe}.py
```

## Results

{results_table(results)}

## Use

```python
from transformers import {auto_class}

model = {auto_class}.from_pretrained("path/to/{output_dir.name}")
```
"""
    path = output_dir / "README.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    return path
