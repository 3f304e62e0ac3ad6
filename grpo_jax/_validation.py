"""Argument checks shared by the pure functions and the config sections: errors name the field, the value
and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {allowed}.")


def check_fields(section: str, checks: Iterable[tuple[str, Any, bool, str]]) -> None:
    """Raise ValueError for the first `(field, value, ok, fix)` that is not ok, as
    `{section}.{field}={value!r} {fix}.` (section: the config path the user types, e.g. "config.loss")."""
    for field, value, ok, fix in checks:
        if not ok:
            raise ValueError(f"{section}.{field}={value!r} {fix}.")


def finite(*values: Any) -> bool:
    """Every value is a finite number (None counts as finite: an option that is off)."""
    return all(v is None or (isinstance(v, int | float) and math.isfinite(v)) for v in values)
