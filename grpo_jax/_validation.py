"""Argument checks shared by the pure functions: errors name the field, the value and the fix."""

from __future__ import annotations


def check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {allowed}.")
