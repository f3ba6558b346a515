"""Which teacher layer each student layer learns from, for models of different depth.

Layers are numbered as in ``outputs.hidden_states``: ``0`` is the embedding output and ``l`` (1..depth) the output of
transformer layer ``l``. For attention maps, layer ``l`` is ``outputs.attentions[l - 1]`` (``0`` is not a layer).

Strategies for a student of ``M`` layers and a teacher of ``N``:

- ``uniform``: ``m -> m * N // M`` for ``m = 1..M`` (TinyBERT, Jiao et al., 2020: ``g(m) = m * N / M``);
- ``skip``: the same for ``m = 1..M-1`` (PKD-Skip, Sun et al., 2019: 12 -> 6 maps to teacher 2, 4, 6, 8, 10; the last
  layer is left to the prediction loss);
- ``last``: ``m -> N - M + m`` for ``m = 1..M-1`` (PKD-Last: 12 -> 6 maps to teacher 7..11);
- ``last_k``: the last ``k`` layers of each, in order (``M - k + i -> N - k + i``);
- a dict ``{student_layer: teacher_layer}`` (keys may be strings, as YAML/JSON give them).

``include_embeddings`` adds ``0 -> 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from .choices import choices_of

Strategy = Literal["uniform", "skip", "last", "last_k"]
LayerMapSpec = Strategy | Mapping[int, int] | Mapping[str, int]
STRATEGIES = choices_of(Strategy)


def resolve_layer_map(
    spec: LayerMapSpec, student_layers: int, teacher_layers: int, *, last_k: int = 1, include_embeddings: bool = False
) -> dict[int, int]:
    """The explicit ``{student_layer: teacher_layer}`` map for ``spec``; raises on indices out of range."""
    m, n = student_layers, teacher_layers
    if isinstance(spec, Mapping):
        mapping = {int(s): int(t) for s, t in spec.items()}
    elif spec == "uniform":
        mapping = {s: s * n // m for s in range(1, m + 1)}
    elif spec == "skip":
        mapping = {s: s * n // m for s in range(1, m)}
    elif spec == "last":
        mapping = {s: n - m + s for s in range(1, m)}
    elif spec == "last_k":
        if not 1 <= last_k <= min(m, n):
            raise ValueError(
                f"`last_k` must lie in 1..{min(m, n)} (student depth {m}, teacher depth {n}), got {last_k}."
            )
        mapping = {m - last_k + i: n - last_k + i for i in range(1, last_k + 1)}
    else:
        raise ValueError(
            f"Unknown `layer_map` {spec!r}: use one of {', '.join(STRATEGIES)} or a dict {{student: teacher}}."
        )
    if include_embeddings:
        mapping = {0: 0, **mapping}
    for s, t in mapping.items():
        if not (0 <= s <= m and 0 <= t <= n):
            raise ValueError(
                f"`layer_map` entry {s} -> {t} is out of range: the student has {m} layers (0..{m}, 0 = embeddings) "
                f"and the teacher has {n} (0..{n})."
            )
    if not mapping:
        raise ValueError(f"`layer_map` {spec!r} maps no layer for a {m}-layer student and a {n}-layer teacher.")
    return dict(sorted(mapping.items()))
