"""YAML sections as dataclasses: what the app's config sections (`lora`, `mtp`, `generation`) share.

jsonargparse hands a section over as a dict (from YAML or a checkpoint's hyperparameters) or as the dataclass
itself; an unknown key is an error naming the section and the keys it knows, never a silently ignored setting.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def section_from(cls: type[T], value, section: str) -> T:
    """A `cls` instance from `value` (a `cls` as is, or a mapping of its fields)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown {section} option(s) {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**value)
    raise TypeError(f"{section} must be a mapping or {cls.__name__}, got {type(value).__name__}")
