"""Building config dataclasses from dicts (YAML, JSON, command line) with errors that list the valid keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], spec: Mapping[str, Any], what: str) -> T:
    """``cls(**spec)``, refusing unknown keys with a message naming ``what`` and every valid option."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"Unknown {what} option(s) {unknown}; valid options are {sorted(known)}.")
    return cls(**spec)
