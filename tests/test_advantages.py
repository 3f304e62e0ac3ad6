"""group_advantages / process_advantages against NumPy references written from the papers' formulas."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from grpo_jax import group_advantages, process_advantages, zero_variance_fraction


def ref_group_advantages(rewards, group_size, estimator="grpo", scale="group", eps=1e-6):
    """Group by group, in float64: A_i = (r_i - baseline_i) / std; NaN rewards and flat groups get 0."""
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    all_valid = rewards[np.isfinite(rewards)]
    batch_std = all_valid.std() if all_valid.size else 0.0
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        valid = [i for i in range(group_size) if np.isfinite(group[i])]
        values = group[valid]
        if len(values) < 2 or values.max() == values.min():
            continue
        for i in valid:
            if estimator == "grpo":
                baseline = values.mean()
            else:
                others = [group[j] for j in valid if j != i]
                baseline = np.mean(others)
            advantage = group[i] - baseline
            if scale == "group":
                advantage /= values.std() + eps
            elif scale == "batch":
                advantage /= batch_std + eps
            out[start + i] = advantage
    return out


def random_rewards(rng, num_groups=6, group_size=4):
    """Mixed rewards: continuous, binary, a flat group, a group with NaNs, a group with one valid value."""
    rewards = rng.normal(size=(num_groups, group_size))
    rewards[1] = rng.integers(0, 2, size=group_size)
    rewards[2] = 0.7
    rewards[3, 1] = np.nan
    rewards[4, :-1] = np.nan
    return rewards.reshape(-1).astype(np.float32)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference(estimator, scale):
    rng = np.random.default_rng(0)
    for group_size in (2, 4, 5):
        rewards = random_rewards(rng, group_size=group_size)
        got = group_advantages(jnp.asarray(rewards), group_size, estimator=estimator, scale=scale)
        want = ref_group_advantages(rewards, group_size, estimator, scale)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(np.asarray(got)))


def test_known_values():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean 0.25, population std sqrt(3)/4.
    np.testing.assert_allclose(
        group_advantages(rewards, 4)[:4], np.array([3, -1, -1, -1]) / np.sqrt(3), rtol=1e-5)
    np.testing.assert_allclose(group_advantages(rewards, 4, scale="none")[:4], [0.75, -0.25, -0.25, -0.25])
    np.testing.assert_allclose(
        group_advantages(rewards, 4, estimator="rloo", scale="none")[:4], [1.0, -1 / 3, -1 / 3, -1 / 3],
        rtol=1e-6)
    np.testing.assert_array_equal(group_advantages(rewards, 4)[4:], 0.0)


def test_nan_rewards_are_excluded_and_get_zero():
    rewards = jnp.array([1.0, jnp.nan, 0.0, 1.0])
    got = np.asarray(group_advantages(rewards, 4, scale="none"))
    np.testing.assert_allclose(got, [1 / 3, 0.0, -2 / 3, 1 / 3], rtol=1e-6)
    got = np.asarray(group_advantages(jnp.array([jnp.nan, jnp.inf, 1.0, 1.0]), 4))
    np.testing.assert_array_equal(got, 0.0)


def test_each_option_changes_the_result():
    rewards = jnp.asarray(random_rewards(np.random.default_rng(1)))
    results = {
        (estimator, scale): np.asarray(group_advantages(rewards, 4, estimator=estimator, scale=scale))
        for estimator in ("grpo", "rloo") for scale in ("group", "batch", "none")
    }
    keys = list(results)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not np.allclose(results[a], results[b]), (a, b)
    small = jnp.array([0.0, 1e-3, 0.0, 1e-3])
    assert not np.allclose(group_advantages(small, 4, eps=1e-6), group_advantages(small, 4, eps=1e-2))


group_rewards = st.lists(st.integers(-5, 5), min_size=2, max_size=8).map(
    lambda xs: np.asarray(xs, np.float32))


@given(group_rewards, st.floats(-50, 50), st.floats(0.05, 20))
def test_grpo_invariant_to_shift_and_positive_scale(rewards, shift, factor):
    base = np.asarray(group_advantages(jnp.asarray(rewards), len(rewards)))
    moved = np.asarray(group_advantages(jnp.asarray(rewards * np.float32(factor) + np.float32(shift)),
                                        len(rewards)))
    np.testing.assert_allclose(moved, base, rtol=2e-3, atol=2e-3)


@given(group_rewards, st.floats(-20, 20))
def test_dr_grpo_scales_linearly(rewards, factor):
    for estimator in ("grpo", "rloo"):
        base = np.asarray(group_advantages(jnp.asarray(rewards), len(rewards), estimator=estimator,
                                           scale="none"))
        scaled = np.asarray(group_advantages(jnp.asarray(rewards * np.float32(factor)), len(rewards),
                                             estimator=estimator, scale="none"))
        np.testing.assert_allclose(scaled, factor * base, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@given(st.floats(-1e6, 1e6, allow_subnormal=False), st.integers(1, 8), st.integers(1, 4),
       st.sampled_from(["grpo", "rloo"]), st.sampled_from(["group", "batch", "none"]))
def test_zero_variance_groups_give_exact_zero(value, group_size, num_groups, estimator, scale):
    rewards = jnp.full((group_size * num_groups,), value, jnp.float32)
    got = np.asarray(group_advantages(rewards, group_size, estimator=estimator, scale=scale))
    np.testing.assert_array_equal(got, 0.0)
    assert float(zero_variance_fraction(rewards, group_size)) == 1.0


def test_zero_variance_fraction():
    rewards = jnp.array([1.0, 1.0, 0.0, 1.0, 0.3, 0.3, jnp.nan, 2.0])
    assert float(zero_variance_fraction(rewards, 2)) == pytest.approx(0.75)


def ref_process_advantages(step_rewards, step_mask, group_size, scale="group", eps=1e-6):
    """DeepSeekMath 4.1.3 literally: normalise all step rewards of the group, then for each token sum the
    normalised rewards of the steps whose end index is >= t."""
    step_rewards = np.asarray(step_rewards, np.float64)
    valid_all = step_mask & np.isfinite(step_rewards)
    batch_values = step_rewards[valid_all]
    out = np.zeros_like(step_rewards)
    for start in range(0, len(step_rewards), group_size):
        rows = range(start, start + group_size)
        steps = [(i, t) for i in rows for t in range(step_rewards.shape[1]) if valid_all[i, t]]
        values = np.array([step_rewards[i, t] for i, t in steps])
        if len(values) < 2 or values.max() == values.min():
            continue
        normalised = {}
        for (i, t), v in zip(steps, values, strict=True):
            normalised[(i, t)] = v - values.mean()
            if scale == "group":
                normalised[(i, t)] /= values.std() + eps
            elif scale == "batch":
                normalised[(i, t)] /= batch_values.std() + eps
        for i in rows:
            for t in range(step_rewards.shape[1]):
                out[i, t] = sum(v for (j, end), v in normalised.items() if j == i and end >= t)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_process_advantages_match_reference(scale):
    rng = np.random.default_rng(2)
    group_size, num_groups, length = 3, 3, 10
    batch = group_size * num_groups
    step_rewards = rng.normal(size=(batch, length)).astype(np.float32)
    step_mask = rng.random((batch, length)) < 0.3
    step_mask[0] = False  # a completion with no steps
    step_rewards[1, 2] = np.nan  # a failed step reward
    step_mask[1, 2] = True
    step_mask[3:6] = False  # a group with a single step: no signal
    step_mask[4, 5] = True
    got = process_advantages(jnp.asarray(step_rewards), jnp.asarray(step_mask), group_size, scale=scale)
    want = ref_process_advantages(step_rewards, step_mask, group_size, scale)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[3:6], 0.0)


def test_process_advantages_worked_example():
    # One group of 2 completions; steps end at t=1 and t=3 (row 0) and t=2 (row 1). Rewards 1, 0 and 0.5
    # have mean 0.5 and std sqrt(1/6): normalised +-sqrt(1.5) and 0.
    step_rewards = jnp.array([[0, 1.0, 0, 0.0, 0], [0, 0, 0.5, 0, 0]])
    step_mask = jnp.array([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]], bool)
    got = np.asarray(process_advantages(step_rewards, step_mask, 2))
    s = np.sqrt(1.5)
    np.testing.assert_allclose(got, [[0, 0, -s, -s, 0], [0, 0, 0, 0, 0]], atol=1e-5)


@pytest.mark.slow
def test_under_jit_vmap_and_grad():
    rewards = jnp.asarray(random_rewards(np.random.default_rng(3)))
    eager = group_advantages(rewards, 4)
    jitted = jax.jit(group_advantages, static_argnums=1, static_argnames=("estimator", "scale"))(rewards, 4)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    stacked = jnp.stack([rewards, rewards[::-1]])
    vmapped = jax.vmap(lambda r: group_advantages(r, 4))(stacked)
    np.testing.assert_allclose(vmapped[1], group_advantages(rewards[::-1], 4), rtol=1e-6)
    # d/dr of sum(A * w) exists and is finite (advantages are usually stop-gradiented, but need not be).
    grads = jax.grad(lambda r: jnp.sum(group_advantages(r, 4, scale="none") * jnp.arange(24.0)))(rewards)
    assert np.all(np.isfinite(np.asarray(grads)))
    # Dr. GRPO advantage is linear: dA_i/dr_j = [i == j] - 1/G inside a group of valid rewards.
    jac = jax.jacobian(lambda r: group_advantages(r, 4, scale="none"))(jnp.array([1.0, 2.0, 0.0, 5.0]))
    np.testing.assert_allclose(jac, np.eye(4) - 0.25, atol=1e-6)
    steps = jnp.ones((4, 3))
    mask = jnp.eye(4, 3, dtype=bool)
    np.testing.assert_allclose(
        jax.jit(process_advantages, static_argnums=2)(steps * jnp.arange(4.0)[:, None], mask, 4),
        process_advantages(steps * jnp.arange(4.0)[:, None], mask, 4), rtol=1e-6)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        group_advantages(jnp.zeros(8), 3)
    with pytest.raises(ValueError, match="estimator='ppo'"):
        group_advantages(jnp.zeros(8), 4, estimator="ppo")
    with pytest.raises(ValueError, match="scale='std'"):
        process_advantages(jnp.zeros((4, 2)), jnp.ones((4, 2), bool), 2, scale="std")
    with pytest.raises(AssertionError, match="rewards must be"):
        group_advantages(jnp.zeros((4, 2)), 2)
