"""The shipped experiment configs (loaded from their files, as --config= loads them) with fields overridden by
dotted path, for the tests of the entry points."""

from pathlib import Path

from grpo_jax import experiment

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def shipped_config(name: str, **overrides):
    """experiments/configs/<name>.py's config with `overrides` set: {"loss.beta": 0.04, ...}."""
    return set_fields(experiment.load_config(CONFIGS / f"{name}.py"), overrides)


def default_config(**overrides):
    """The default experiment's config (arithmetic_tiny) with `overrides` set."""
    return shipped_config("arithmetic_tiny", **overrides)


def set_fields(cfg, overrides):
    """Set each dotted path of `overrides` on the ConfigDict `cfg` (new fields too)."""
    for key, value in overrides.items():
        target = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return cfg
