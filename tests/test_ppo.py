"""PPO's critic side (token_rewards, gae, whiten, value_loss) against NumPy loops written from the papers."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import gae, token_rewards, value_loss, whiten


def ragged_mask(lengths, width):
    return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


def ref_gae(rewards, values, lengths, gamma, lam):
    """Schulman et al. 2016 eq. 16, one completion at a time, in float64, with V = 0 after the last token."""
    advantages, returns = np.zeros_like(rewards, np.float64), np.zeros_like(rewards, np.float64)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
            returns[b, t] = running + values[b, t]
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", list(itertools.product([1.0, 0.9], [1.0, 0.95, 0.5, 0.0])))
def test_gae_equals_the_numpy_reference_on_ragged_completions(gamma, lam):
    rng = np.random.default_rng(0)
    lengths = [5, 1, 3, 0, 5]  # full, one token, partial, empty (padding row), full
    rewards, values = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    mask = ragged_mask(lengths, 5)
    noisy = np.where(mask, values, np.nan)  # what lies beyond a completion must not matter
    advantages, returns = jax.jit(gae)(jnp.asarray(np.where(mask, rewards, 1e9)),
                                                           jnp.asarray(noisy), jnp.asarray(mask),
                                                           gamma=gamma, lam=lam)
    want_adv, want_ret = ref_gae(rewards, values, lengths, gamma, lam)
    np.testing.assert_allclose(advantages, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_limits_are_the_monte_carlo_return_and_the_td_error():
    rewards = np.array([[0.0, 0.0, 1.0, 0.0]])
    values = np.array([[0.2, 0.4, 0.6, 0.8]])
    mask = ragged_mask([3], 4)
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]], atol=1e-6)  # undiscounted return-to-go
    np.testing.assert_allclose(adv, [[0.8, 0.6, 0.4, 0.0]], atol=1e-6)
    adv, _ = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.5, lam=0.0)
    # r_t + 0.5 V_{t+1} - V_t: 0.5 * 0.4 - 0.2, 0.5 * 0.6 - 0.4, 1 - 0.6 (no value after the last token)
    np.testing.assert_allclose(adv, [[0.0, -0.1, 0.4, 0.0]], atol=1e-6)


def test_gae_rejects_out_of_range_coefficients():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match=r"lam=1.5 must be in \[0, 1\]"):
        gae(x, x, x > -1, lam=1.5)
    with pytest.raises(ValueError, match="gamma=-0.1"):
        gae(x, x, x > -1, gamma=-0.1)


def test_token_rewards_put_the_score_on_the_last_token_and_charge_kl_on_every_token():
    mask = ragged_mask([3, 1, 0], 4)
    kl = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    got = token_rewards(jnp.array([2.0, -1.0, 5.0]), jnp.asarray(mask), kl=jnp.asarray(kl), beta=0.5)
    want = np.where(mask, -0.5 * kl, 0.0)
    want[0, 2] += 2.0
    want[1, 0] += -1.0
    np.testing.assert_allclose(got, want, atol=1e-6)
    no_kl = token_rewards(jnp.array([1.0, jnp.nan, 3.0]), jnp.asarray(mask))  # a failed score counts 0
    np.testing.assert_array_equal(no_kl, [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="beta=0.1 needs kl"):
        token_rewards(jnp.ones(3), jnp.asarray(mask), beta=0.1)


def test_whiten_normalises_over_the_masked_entries_only():
    mask = ragged_mask([2, 1], 3)
    x = np.array([[1.0, 3.0, 100.0], [5.0, -7.0, 9.0]])
    got = whiten(jnp.asarray(x), jnp.asarray(mask))
    kept = np.array([1.0, 3.0, 5.0])
    want = (kept - kept.mean()) / kept.std()
    np.testing.assert_allclose(np.asarray(got)[mask], want, rtol=1e-5)
    assert np.all(np.asarray(got)[~mask] == 0)


def ref_value_loss(values, old_values, returns, mask, clip_range):
    v, v_old, r = (np.float64(a)[mask] for a in (values, old_values, returns))
    error = (v - r) ** 2
    if clip_range is None:
        return np.mean(0.5 * error)
    clipped = (np.clip(v, v_old - clip_range, v_old + clip_range) - r) ** 2
    return np.mean(0.5 * np.maximum(error, clipped))


@pytest.mark.slow
@pytest.mark.parametrize("clip_range", [None, 0.2, 1.0])
def test_value_loss_equals_the_clipped_formula_and_its_gradient_stops_where_clipped(clip_range):
    rng = np.random.default_rng(1)
    mask = ragged_mask([4, 2, 3], 4)
    values, old_values, returns = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3))
    loss, metrics = value_loss(jnp.asarray(values), jnp.asarray(old_values), jnp.asarray(returns),
                               jnp.asarray(mask), clip_range=clip_range)
    want = ref_value_loss(values, old_values, returns, mask, clip_range)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    grad = jax.grad(lambda v: value_loss(v, jnp.asarray(old_values), jnp.asarray(returns), jnp.asarray(mask),
                                         clip_range=clip_range)[0])(jnp.asarray(values))
    if clip_range is None:
        clipped = np.zeros_like(mask)
    else:
        moved = np.clip(values, old_values - clip_range, old_values + clip_range)
        clipped = ((moved - returns) ** 2 > (values - returns) ** 2) & mask
    want_grad = np.where(mask & ~clipped, (values - returns) / mask.sum(), 0.0)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert float(metrics["value_clip_fraction"]) == pytest.approx(clipped.sum() / mask.sum())
    residual, target = (returns - values)[mask], returns[mask]
    assert float(metrics["explained_variance"]) == pytest.approx(1 - residual.var() / target.var(), rel=1e-4)


def test_value_clip_counts_only_values_outside_the_range():
    """V inside [V_old - c, V_old + c] is not clipped, to the last bit: V_old + (V - V_old) != V in float32
    for this V (the form clip(V - V_old) + V_old counted it as clipped, and stopped its gradient)."""
    values, old = jnp.float32(-0.08809904754161835), jnp.float32(0.1)
    assert float(old + (values - old)) != float(values)  # the rounding the old form tripped on
    loss, metrics = value_loss(jnp.full((1, 1), values), jnp.full((1, 1), old), jnp.zeros((1, 1)),
                               jnp.ones((1, 1), bool), clip_range=0.2)
    assert float(metrics["value_clip_fraction"]) == 0.0
    assert float(loss) == pytest.approx(0.5 * float(values) ** 2)
    rng = np.random.default_rng(0)  # random data: clipped exactly where V is outside the range
    values, old, returns = (rng.normal(size=(64, 64)).astype(np.float32) * scale for scale in (0.3, 0.3, 1))
    _, metrics = value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns),
                            jnp.ones((64, 64), bool), clip_range=0.2)
    outside = np.abs(values - old) > 0.2
    moved = np.clip(values, old - 0.2, old + 0.2)
    want = (outside & ((moved - returns) ** 2 > (values - returns) ** 2)).mean()
    assert float(metrics["value_clip_fraction"]) == pytest.approx(want)


def test_explained_variance_is_bounded_below_when_the_returns_hardly_vary():
    returns = jnp.array([[1.0, 1.0 + 1e-3, 1.0]])
    values = jnp.array([[0.9, 1.2, 1.1]])
    _, metrics = value_loss(values, values, returns, jnp.ones((1, 3), bool))
    assert float(metrics["explained_variance"]) == -1.0


def test_value_loss_of_a_perfect_critic_is_zero_and_explains_all_variance():
    returns = jnp.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = ragged_mask([2, 1], 3)
    loss, metrics = value_loss(returns, returns + 0.1, returns, jnp.asarray(mask))  # within the clip range
    assert float(loss) == 0 and float(metrics["explained_variance"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clip_range=0"):
        value_loss(returns, returns, returns, jnp.asarray(mask), clip_range=0)


# ----------------------------------------------------------------------------- PPO in the trainer


def ppo_trainer(**overrides):
    from test_trainer import make_trainer

    return make_trainer(**{"algo": "ppo", **overrides})


@pytest.mark.slow
def test_ppo_learns_the_toy_task_and_its_critic_tracks_the_returns():
    trainer = ppo_trainer(learning_rate=1e-2)
    metrics = [trainer.iteration() for _ in range(12)]
    rewards = [m["reward_mean"] for m in metrics]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3
    assert metrics[0]["value_mean"] == 0.0  # the zero-initialised head
    # The critic tracks the returns: the gap between their batch means over the last 4 steps is 0.04-0.13 on
    # model seeds 0-4 (a single step's gap swings by up to 0.25 as the policy moves).
    assert np.mean([abs(m["value_mean"] - m["return_mean"]) for m in metrics[-4:]]) < 0.2
    batch = trainer.batch(trainer.collect(jax.random.key(1)))  # GAE over the critic's values, no reference
    assert {"old_values", "returns", "advantages"} <= set(batch) and "ref_logprobs" not in batch


def test_the_critic_starts_as_a_copy_of_the_policy_with_a_zero_head():
    trainer = ppo_trainer()
    backbone = jax.tree.leaves(trainer.state.critic["backbone"])
    for a, b in zip(jax.tree.leaves(trainer.state.params), backbone, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.any(np.asarray(trainer.state.critic["head"]["kernel"]))
    assert make_grpo().state.critic is None


def test_the_critics_values_are_computed_in_the_updates_microbatches():
    """ppo_targets runs the critic over `parts` parts of whole groups (memory of one part): the same values
    as one pass, and the compiled program holds less temporary memory."""
    from flax import nnx

    from grpo_jax import critic as critic_lib
    from grpo_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    critic = {"backbone": params, "head": {"kernel": jnp.full((256,), 0.1), "bias": jnp.float32(0.5)}}
    rng = np.random.default_rng(0)
    batch = dict(prompt_tokens=jnp.asarray(rng.integers(1, 64, (8, 8)), jnp.int32),
                 prompt_mask=jnp.ones((8, 8), bool),
                 completion_tokens=jnp.asarray(rng.integers(1, 64, (32, 24)), jnp.int32),
                 completion_mask=jnp.asarray(ragged_mask(rng.integers(1, 25, 32), 24)))
    values = {parts: jax.jit(lambda c, b, parts=parts: critic_lib.batch_values(c, graphdef, b, group_size=4,
                                                                               parts=parts))
              for parts in (1, 4)}
    whole, parted = (np.asarray(f(critic, batch)) for f in values.values())
    assert np.abs(whole).max() > 0
    np.testing.assert_allclose(parted, whole, rtol=1e-5, atol=1e-5)
    temp = {parts: f.lower(critic, batch).compile().memory_analysis().temp_size_in_bytes
            for parts, f in values.items()}
    assert temp[4] < 0.6 * temp[1], temp


def make_grpo():
    from test_trainer import make_trainer

    return make_trainer()


@functools.cache
def run_ppo(**overrides):
    """One iteration of two epochs (mu=2: the second epoch sees the values and ratios the first moved);
    the policy's and the critic's params after it, and its metrics."""
    trainer = ppo_trainer(mu=2, beta=0.1, learning_rate=1e-2, **overrides)
    metrics = trainer.iteration()
    leaves = jax.tree.leaves((trainer.state.params, trainer.state.critic))
    return np.concatenate([np.ravel(x) for x in leaves]), metrics


@pytest.mark.slow
@pytest.mark.parametrize("option, value", [
    ("gamma", 0.5), ("gae_lambda", 0.2), ("value_coef", 2.0), ("value_clip", 1e-4),
    ("critic_learning_rate", 1e-1), ("kl_in_reward", True), ("whiten_advantages", False)])
def test_every_ppo_option_changes_what_is_computed(option, value):
    base_params, base_metrics = run_ppo()
    params, metrics = run_ppo(**{option: value})
    if option == "value_coef":  # Adam is scale-free: the weight shows in the loss (and in clipping)
        assert metrics["loss"] != pytest.approx(base_metrics["loss"], rel=1e-4)
    else:
        assert np.abs(params - base_params).max() > 1e-6
    if option == "value_clip":
        assert metrics["value_clip_fraction"] > base_metrics["value_clip_fraction"]


def test_ppo_config_errors_name_the_field():
    from test_trainer import make_config

    for fields, message in [({"algo": "a2c"}, "config.algo"),
                            ({"algo": "ppo", "gamma": 1.5}, "config.ppo.gamma"),
                            ({"algo": "ppo", "gae_lambda": -0.1}, "config.ppo.gae_lambda"),
                            ({"algo": "ppo", "value_clip": 0.0}, "config.ppo.value_clip"),
                            ({"kl_in_reward": True}, "config.ppo.kl_in_reward")]:
        with pytest.raises(ValueError, match=message):
            make_config(max_new_tokens=8, group_size=4, **fields)
