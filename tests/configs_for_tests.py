"""The shipped default config with fields overridden by dotted path, for the tests of the entry points."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from configs import arithmetic_tiny  # noqa: E402


def default_config(**overrides):
    """arithmetic_tiny.get_config() with `overrides` set: {"loss.beta": 0.04, "task": "jsonl", ...}."""
    cfg = arithmetic_tiny.get_config()
    cfg.unlock()
    set_fields(cfg, overrides)
    return cfg


def set_fields(cfg, overrides):
    """Set each dotted path of `overrides` on the ConfigDict `cfg`."""
    for key, value in overrides.items():
        target = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return cfg
