"""Advantage estimators: the group-relative ones of GRPO (no critic) and PPO's GAE over a learned critic.

Rewards arrive flat, `[num_prompts * G]`, with the G completions of each prompt contiguous (the layout
the sampler produces). Every group estimator here is an option of one of two functions:

    group_advantages    one scalar reward per completion (outcome supervision)
    process_advantages  one reward per reasoning step (process supervision, DeepSeekMath 4.1.3)

and the critic side, the baseline GRPO is measured against:

    token_rewards       a completion's score on its last token, minus beta * KL on every token (PPO-RLHF)
    gae                 generalised advantage estimation over per-token values, with the value targets

Non-finite rewards (a reward function that failed) are left out of every statistic and get advantage 0,
as do groups that carry no signal (all valid rewards equal, or fewer than two of them).
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from grpo_jax._validation import check_option

Estimator = Literal["grpo", "rloo"]
Scale = Literal["group", "batch", "none"]

_ESTIMATORS = ("grpo", "rloo")
_SCALES = ("group", "batch", "none")


def _split_groups(values: chex.Array, group_size: int, name: str) -> chex.Array:
    """`[N * G, ...]` -> `[N, G * ...]` with a clear error when G does not divide the batch."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive Python int.")
    if values.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the number of {name} rows ({values.shape[0]}); "
            "lay rewards out as [num_prompts * group_size] with each group contiguous.")
    return values.reshape(values.shape[0] // group_size, -1)


def _has_signal(values: chex.Array, valid: chex.Array) -> chex.Array:
    """`[N, 1]` bool: the row holds >= 2 valid values that are not all equal.

    Testing max > min is exact, whereas a floating-point mean of equal values may differ from them in the
    last bit and leave a tiny non-zero advantage.
    """
    big = jnp.finfo(values.dtype).max
    spread = (jnp.where(valid, values, -big).max(axis=1, keepdims=True)
              > jnp.where(valid, values, big).min(axis=1, keepdims=True))
    return spread & (valid.sum(axis=1, keepdims=True) >= 2)


def _normalise(
    values: chex.Array, valid: chex.Array, baseline: chex.Array, scale: Scale, eps: float
) -> chex.Array:
    """(values - baseline) / std, with std per group (rows), over the batch, or 1. Zero where invalid."""
    values = jnp.where(valid, values, 0.0)  # [N, M]
    count = valid.sum(axis=1, keepdims=True)  # [N, 1]
    informative = valid & _has_signal(values, valid)  # [N, M]
    centred = values - baseline
    if scale == "group":
        mean = values.sum(axis=1, keepdims=True) / jnp.maximum(count, 1)
        var = (jnp.where(valid, values - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / jnp.maximum(count, 1)
        centred = centred / (jnp.sqrt(var) + eps)
    elif scale == "batch":
        total = jnp.maximum(valid.sum(), 1)
        mean = values.sum() / total
        std = jnp.sqrt((jnp.where(valid, values - mean, 0.0) ** 2).sum() / total)
        centred = centred / (std + eps)
    return jnp.where(informative, centred, 0.0)


def group_advantages(
    rewards: chex.Array,
    group_size: int,
    *,
    estimator: Estimator = "grpo",
    scale: Scale = "group",
    eps: float = 1e-6,
) -> chex.Array:
    """Outcome advantages relative to the group: A_i = (r_i - b_i) / s.

    estimator="grpo": b_i = mean(r) over the group; with scale="group" this is
        A_i = (r_i - mean(r)) / (std(r) + eps), DeepSeekMath (arXiv 2402.03300) section 4.1.2, with std the
        population std (ddof=0) of the group.
    estimator="rloo": b_i = mean of the other G-1 rewards of the group, the leave-one-out baseline of
        Ahmadian et al. 2024 (arXiv 2402.14740). Plain RLOO is estimator="rloo", scale="none".
    scale="group": divide by the group's reward std (GRPO).
    scale="batch": divide by the std of all rewards in the batch (group mean, batch std; arXiv 2508.08221).
    scale="none": no division (Dr. GRPO, arXiv 2503.20783): advantages scale linearly with rewards.

    Groups whose valid rewards are all equal get advantage 0 exactly; non-finite rewards are excluded from
    the statistics and get advantage 0.

    Args:
        rewards: `[num_prompts * group_size]` float rewards, each group of `group_size` contiguous.
        group_size: G, the number of completions sampled per prompt (a Python int).
        estimator: the baseline, "grpo" (group mean) or "rloo" (leave-one-out mean).
        scale: "group", "batch" or "none", see above.
        eps: added to the std before dividing.

    Returns:
        `[num_prompts * group_size]` float32 advantages.
    """
    check_option("estimator", estimator, _ESTIMATORS)
    check_option("scale", scale, _SCALES)
    chex.assert_rank(rewards, 1, custom_message="rewards must be [num_prompts * group_size]")
    rewards = jnp.asarray(rewards, jnp.float32)
    grouped = _split_groups(rewards, group_size, "rewards")  # [N, G]
    valid = jnp.isfinite(grouped)
    safe = jnp.where(valid, grouped, 0.0)
    count = valid.sum(axis=1, keepdims=True)  # [N, 1]
    total = safe.sum(axis=1, keepdims=True)  # [N, 1]
    if estimator == "grpo":
        baseline = total / jnp.maximum(count, 1)
    else:  # leave-one-out: mean of the other valid rewards in the group
        baseline = (total - safe) / jnp.maximum(count - 1, 1)
    return _normalise(grouped, valid, baseline, scale, eps).reshape(rewards.shape)


def process_advantages(
    step_rewards: chex.Array,
    step_mask: chex.Array,
    group_size: int,
    *,
    scale: Scale = "group",
    eps: float = 1e-6,
) -> chex.Array:
    """Process-supervision advantages: A_{i,t} = sum_{j : index(j) >= t} (r_i^j - mean(R)) / std(R).

    DeepSeekMath (arXiv 2402.03300) section 4.1.3: R holds the rewards of every step of every completion in
    the group; each step reward is normalised with R's mean and std, and a token's advantage is the sum of the
    normalised rewards of the steps that end at or after it. Tokens after the last step get 0.

    A step's reward sits at the token that ends the step: `step_mask[b, t]` is true there and
    `step_rewards[b, t]` holds its reward (other entries are ignored). `scale` has the meaning of
    `group_advantages` ("batch" uses the std over all steps of the batch; "none" only subtracts the mean).

    Args:
        step_rewards: `[num_prompts * group_size, T]` float, the reward of each step at its last token.
        step_mask: `[num_prompts * group_size, T]` bool, true at tokens that end a step.
        group_size: G, completions per prompt.
        scale: "group", "batch" or "none".
        eps: added to the std before dividing.

    Returns:
        `[num_prompts * group_size, T]` float32 per-token advantages.
    """
    check_option("scale", scale, _SCALES)
    chex.assert_rank([step_rewards, step_mask], 2, custom_message="step_rewards/step_mask must be [B, T]")
    chex.assert_equal_shape([step_rewards, step_mask], custom_message="step_rewards vs step_mask")
    step_rewards = jnp.asarray(step_rewards, jnp.float32)
    grouped = _split_groups(step_rewards, group_size, "step_rewards")  # [N, G * T]
    valid = _split_groups(step_mask.astype(bool), group_size, "step_mask") & jnp.isfinite(grouped)
    safe = jnp.where(valid, grouped, 0.0)
    mean = safe.sum(axis=1, keepdims=True) / jnp.maximum(valid.sum(axis=1, keepdims=True), 1)
    normalised = _normalise(grouped, valid, mean, scale, eps).reshape(step_rewards.shape)  # [B, T]
    # Sum over the steps that end at or after t: a reversed cumulative sum along time.
    return jnp.flip(jnp.cumsum(jnp.flip(normalised, axis=1), axis=1), axis=1)


def group_has_signal(rewards: chex.Array, group_size: int) -> jax.Array:
    """`[num_prompts]` bool: the group has >= 2 finite rewards that differ, so it carries a gradient."""
    grouped = _split_groups(jnp.asarray(rewards, jnp.float32), group_size, "rewards")
    return _has_signal(grouped, jnp.isfinite(grouped))[:, 0]


def zero_variance_fraction(rewards: chex.Array, group_size: int) -> jax.Array:
    """Fraction of groups whose valid rewards are all equal (they contribute no gradient)."""
    return 1.0 - group_has_signal(rewards, group_size).mean()


def _next(x: jax.Array) -> jax.Array:
    """`[B, T]` -> x[:, t + 1] at t, 0 (False) after the last position."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def _last_token(mask: jax.Array) -> jax.Array:
    """`[B, T]` bool: true at the last true entry of each row of a prefix mask."""
    return mask & ~_next(mask)


def token_rewards(
    scores: chex.Array,
    mask: chex.Array,
    *,
    kl: chex.Array | None = None,
    beta: float | chex.Array = 0.0,
) -> chex.Array:
    """Per-token rewards of PPO for language models: r_t = score * [t is the last token] - beta * KL_t.

    The reward model's (or rule's) score of the whole completion lands on its last token, and a per-token
    KL penalty against the reference policy is paid on every token (InstructGPT, arXiv 2203.02155 eq. 2;
    Stiennon et al. 2020, arXiv 2009.01325 eq. 1). GRPO instead adds the KL to the loss (DeepSeekMath
    eq. 3); a PPO run may do either.

    Args:
        scores: `[B]` one score per completion; non-finite scores (a failed reward function) count as 0.
        mask: `[B, T]` bool prefix mask, true on completion tokens.
        kl: `[B, T]` per-token KL estimates (e.g. `losses.kl_divergence`), needed when beta != 0.
        beta: the KL coefficient.

    Returns:
        `[B, T]` float32 rewards, 0 where the mask is false.
    """
    chex.assert_rank([scores, mask], [1, 2], custom_message="scores must be [B] and mask [B, T]")
    if scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows but mask has {mask.shape[0]}; one score per "
                         "completion.")
    mask = jnp.asarray(mask).astype(bool)
    scores = jnp.asarray(scores, jnp.float32)
    scores = jnp.where(jnp.isfinite(scores), scores, 0.0)
    rewards = jnp.where(_last_token(mask), scores[:, None], 0.0)
    if kl is not None:
        chex.assert_equal_shape([kl, mask], custom_message="kl vs mask")
        rewards = rewards - beta * jnp.where(mask, jnp.asarray(kl, jnp.float32), 0.0)
    elif not (isinstance(beta, (int, float)) and beta == 0):
        raise ValueError(f"beta={beta} needs kl (per-token estimates); pass kl= or set beta=0.0.")
    return jax.lax.stop_gradient(rewards)


def gae(
    rewards: chex.Array,
    values: chex.Array,
    mask: chex.Array,
    *,
    gamma: float | chex.Array = 1.0,
    lam: float | chex.Array = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438 eq. 16) over tokens.

      delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
      A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}
      R_t     = A_t + V_t                       (the critic's regression target)

    where m_{t+1} is 0 after a completion's last token, so the episode ends there (the value after it is
    0). lam=1 gives the Monte-Carlo return minus V_t, lam=0 the one-step TD error.

    Args:
        rewards: `[B, T]` per-token rewards (`token_rewards`).
        values: `[B, T]` V_t, the critic's value of the state before token t is chosen (the same positions
            as the token's log-prob).
        mask: `[B, T]` bool prefix mask, true on completion tokens.
        gamma: discount, in [0, 1].
        lam: GAE lambda, in [0, 1].

    Returns:
        (advantages, returns): `[B, T]` float32 each, 0 where the mask is false; both are constants (no
        gradient flows through them).
    """
    chex.assert_rank([rewards, values, mask], 2, custom_message="rewards/values/mask must be [B, T]")
    chex.assert_equal_shape([rewards, values, mask], custom_message="rewards/values/mask")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be in [0, 1] (1.0: no discount / Monte-Carlo).")
    mask = jnp.asarray(mask).astype(bool)
    rewards = jnp.where(mask, jnp.asarray(rewards, jnp.float32), 0.0)
    values = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(values, jnp.float32), 0.0))
    following = _next(mask).astype(jnp.float32)
    next_values = _next(values) * following
    deltas = rewards + gamma * next_values - values  # [B, T]

    def step(carry, inputs):  # one token, from the last to the first
        delta, cont = inputs
        advantage = delta + gamma * lam * cont * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(step, jnp.zeros(deltas.shape[0], jnp.float32),
                                 (deltas.T, following.T), reverse=True)
    advantages = jnp.where(mask, advantages.T, 0.0)
    returns = jnp.where(mask, advantages + values, 0.0)
    return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


def whiten(values: chex.Array, mask: chex.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / (std + eps) over the true entries of `mask` (PPO's advantage normalisation over the
    batch); 0 where the mask is false."""
    chex.assert_equal_shape([values, mask], custom_message="values vs mask")
    mask = jnp.asarray(mask).astype(bool)
    values = jnp.asarray(values, jnp.float32)
    count = jnp.maximum(mask.sum(), 1)
    mean = jnp.where(mask, values, 0.0).sum() / count
    std = jnp.sqrt(jnp.where(mask, jnp.square(values - mean), 0.0).sum() / count)
    return jnp.where(mask, (values - mean) / (std + eps), 0.0)
