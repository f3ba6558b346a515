"""Options whose value is one of a fixed set, spelled once: as the ``Literal`` type of the option.

    Query = Literal["cls", "mean", "last"]
    self.query = check_choice("instance_feature", "query", query, Query)
"""

from __future__ import annotations

from typing import Any, TypeVar, get_args

T = TypeVar("T")


def choices_of(literal: Any) -> tuple:
    """The values of a ``Literal[...]`` type, in order."""
    values = get_args(literal)
    if not values:
        raise TypeError(f"{literal!r} is not a Literal type with values.")
    return values


def check_choice(owner: str, option: str, value: T, literal: Any) -> T:
    """``value`` when it is one of ``literal``'s values, else a ``ValueError`` that names the owner, the option and
    every valid value: ``"deit: unknown `distillation_type` 'smooth'; `distillation_type` must be one of 'hard',
    'soft'."``"""
    valid = choices_of(literal)
    if value not in valid:
        raise ValueError(f"{owner}: unknown `{option}` {value!r}; `{option}` must be one of "
                         f"{', '.join(map(repr, valid))}.")
    return value
