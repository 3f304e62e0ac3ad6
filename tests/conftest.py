"""Test setup: 8 host CPU devices for sharding tests (must happen before jax is imported), one JAX
compilation cache for the session, and a hypothesis profile that keeps the suite fast and deterministic.

The cache: a program compiled once in the session (a test's Trainer rebuilt to resume, the same run in a
subprocess, the other pytest-xdist worker) is loaded, not compiled again; the same executable, so the
same results. The controller process sets it before the workers start, so they and every subprocess of a
test share it (a script's own --compilation_cache flag still chooses for its process)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="grpo_jax_tests_jax_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"  # not the many tiny programs

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "grpo_jax",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("grpo_jax")


def pytest_collection_modifyitems(config, items):
    """The slow tests first (in their order): the pytest-xdist workers start on the long ones and end on
    the short ones together, instead of one waiting while the other runs a long test last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
