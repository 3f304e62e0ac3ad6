"""GRPO policy losses, KL estimators and loss aggregation: pure functions over `[B, T]` arrays.

Every array is laid out `[B, T]`: B completions (the G completions of each prompt contiguous), T completion
tokens, and a `mask` that is true on real completion tokens. Entries where the mask is false may hold
anything (padding, -inf, NaN): they never reach the loss, its gradient or the metrics.

  kl_divergence   per-token k1 / k2 / k3 estimates of KL(pi_theta || pi_ref)
  aggregate_loss  per-token values -> scalar (seq-mean-token-mean, token-mean, seq-mean-token-sum-norm)
  policy_loss     clipped surrogate (GRPO / DAPO clip-higher / dual clip), GSPO or CISPO, + beta * KL
  rollout_correction  per-token importance weights pi_old / pi_behaviour (truncated or masked) for tokens
                  that another policy sampled: a stale rollout, or a sampler whose numerics differ
  value_loss      PPO's clipped regression of a critic onto its GAE returns (the baseline GRPO drops)
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from grpo_jax._validation import check_option

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
LossType = Literal["grpo", "gspo", "cispo"]

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
LOSS_TYPES = ("grpo", "gspo", "cispo")
GSPO_LOG_RATIO_BOUND = 20.0  # the sequence log-ratio's upper bound (see policy_loss)
Correction = Literal["none", "tis", "mis"]
CORRECTIONS = ("none", "tis", "mis")


def kl_divergence(
    logprobs: chex.Array, ref_logprobs: chex.Array, estimator: KLEstimator = "k3"
) -> chex.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

    With log_r = log pi_ref(o_t) - log pi_theta(o_t) (Schulman 2020, "Approximating KL Divergence"):
      k1 = -log_r                     unbiased, high variance, can be negative
      k2 = log_r^2 / 2                biased, low variance, >= 0
      k3 = exp(log_r) - log_r - 1     unbiased, low variance, >= 0; DeepSeekMath (arXiv 2402.03300) eq. 4

    Args:
      logprobs: `[...]` log pi_theta of the sampled tokens (gradients flow here).
      ref_logprobs: `[...]` log pi_ref of the same tokens (treated as a constant).
      estimator: "k1", "k2" or "k3".

    Returns:
      `[...]` per-token KL estimates, float32.
    """
    check_option("kl_estimator", estimator, KL_ESTIMATORS)
    chex.assert_equal_shape([logprobs, ref_logprobs], custom_message="logprobs vs ref_logprobs")
    log_r = jax.lax.stop_gradient(jnp.asarray(ref_logprobs, jnp.float32)) - jnp.asarray(logprobs, jnp.float32)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    return jnp.exp(log_r) - log_r - 1.0


def aggregate_loss(
    per_token: chex.Array,
    mask: chex.Array,
    mode: Aggregation = "seq-mean-token-mean",
    max_completion_length: int | None = None,
) -> jax.Array:
    """Reduce per-token values `[B, T]` to a scalar over the tokens where `mask` is true.

      seq-mean-token-mean      (1/B') sum_i (1/|o_i|) sum_t x_it     DeepSeekMath (arXiv 2402.03300) eq. 3
      token-mean               sum_i sum_t x_it / sum_i |o_i|        DAPO (arXiv 2503.14476) eq. 8
      seq-mean-token-sum-norm  sum_i sum_t x_it / (B' * L)           Dr. GRPO (arXiv 2503.20783), L constant

    B' counts the rows holding at least one token (fully masked rows are padding and are left out), and L
    is `max_completion_length` (default: T, the padded width, which is also a constant of the run).

    Args:
      per_token: `[B, T]` values, e.g. per-token losses.
      mask: `[B, T]` bool (or 0/1), true on completion tokens.
      mode: one of the three modes above.
      max_completion_length: L of seq-mean-token-sum-norm; only valid with that mode.

    Returns:
      A float32 scalar (0 when the mask is empty).
    """
    check_option("aggregation", mode, AGGREGATIONS)
    chex.assert_rank([per_token, mask], 2, custom_message="per_token and mask must be [B, T]")
    chex.assert_equal_shape([per_token, mask], custom_message="per_token vs mask")
    if max_completion_length is not None and mode != "seq-mean-token-sum-norm":
        raise ValueError(
            f"max_completion_length={max_completion_length} only applies to "
            f"aggregation='seq-mean-token-sum-norm', not {mode!r}; drop it or change the aggregation.")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length={max_completion_length} must be a positive int.")
    mask = jnp.asarray(mask).astype(bool)
    values = jnp.where(mask, jnp.asarray(per_token, jnp.float32), 0.0)  # [B, T]
    lengths = mask.sum(axis=-1)  # [B]
    num_seqs = jnp.maximum((lengths > 0).sum(), 1)
    if mode == "token-mean":
        return values.sum() / jnp.maximum(lengths.sum(), 1)
    if mode == "seq-mean-token-mean":
        return (values.sum(axis=-1) / jnp.maximum(lengths, 1)).sum() / num_seqs
    normaliser = per_token.shape[-1] if max_completion_length is None else max_completion_length
    return values.sum() / (num_seqs * normaliser)


def aggregation_denominator(mask: chex.Array, mode: Aggregation = "seq-mean-token-mean") -> jax.Array:
    """What `aggregate_loss` divides by, up to the run's constant L: the number of masked tokens for
    "token-mean", the number of rows holding a token (B') for the other two modes.

    A batch split into parts (gradient accumulation) has the aggregate of the whole batch when each part's
    aggregate is weighted by its share of the summed denominators, not averaged with equal weights.
    """
    check_option("aggregation", mode, AGGREGATIONS)
    mask = jnp.asarray(mask).astype(bool)
    if mode == "token-mean":
        return mask.sum().astype(jnp.float32)
    return (mask.sum(axis=-1) > 0).sum().astype(jnp.float32)


def _masked_mean(x: chex.Array, mask: chex.Array) -> jax.Array:
    return jnp.where(mask, x, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    *,
    ref_logprobs: chex.Array | None = None,
    beta: float | chex.Array = 0.0,
    kl_estimator: KLEstimator = "k3",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    loss_type: LossType = "grpo",
    aggregation: Aggregation = "seq-mean-token-mean",
    max_completion_length: int | None = None,
    token_weights: chex.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO objective as a loss: L = agg_t(-surrogate_t + beta * KL_t), with r_t = pi_theta / pi_old.

    loss_type="grpo": surrogate_t = min(r_t A_t, clip(r_t, 1 - eps, 1 + eps_high) A_t)
        (DeepSeekMath, arXiv 2402.03300, eq. 3). eps_high = `epsilon_high` (DAPO clip-higher, arXiv
        2503.14476 eq. 10) or `epsilon`. With `dual_clip` = c > 1, for A_t < 0 the surrogate is further
        bounded below by c A_t (dual-clip PPO, arXiv 1912.09729).
    loss_type="gspo": as "grpo" but with the sequence ratio s_i = exp(mean_t log r_it) (GSPO, arXiv
        2507.18071 eq. 7) in place of r_t. It is computed in the GSPO-token form
        s_it = sg[s_i] * pi_theta(o_it) / sg[pi_theta(o_it)], which equals GSPO exactly for `[B]` advantages
        and aggregation="seq-mean-token-mean", and is GSPO-token for `[B, T]` advantages.
    loss_type="cispo": surrogate_t = sg[clip(r_t, 1 - eps, 1 + eps_high)] A_t log pi_theta(o_t) (CISPO,
        MiniMax-M1, arXiv 2506.13585 eq. 4): every token keeps a gradient, only its IS weight is clipped.
        MiniMax-M1 does not bound the weight from below; epsilon=1.0 reproduces that.

    The KL term (`kl_divergence`) is added only when `ref_logprobs` is given and `beta` is not the
    Python number 0; with beta=0 the reference may be None and nothing about it is computed.

    Args:
      logprobs: `[B, T]` log pi_theta of the completion tokens; the gradient flows through these.
      old_logprobs: `[B, T]` log pi_old (the sampling policy); constant. At mu=1 pass
        `jax.lax.stop_gradient(logprobs)`.
      advantages: `[B]` (one per completion) or `[B, T]` (per token); constant.
      mask: `[B, T]` bool, true on completion tokens.
      ref_logprobs: `[B, T]` log pi_ref, needed when beta != 0.
      beta: KL coefficient; a Python float, or a traced scalar for a schedule.
      kl_estimator: "k1", "k2" or "k3".
      epsilon: lower clip range (and upper when `epsilon_high` is None).
      epsilon_high: upper clip range (DAPO clip-higher), e.g. 0.28.
      dual_clip: c > 1 for dual clip; grpo and gspo only.
      loss_type: "grpo", "gspo" or "cispo".
      aggregation: see `aggregate_loss`.
      max_completion_length: L of aggregation="seq-mean-token-sum-norm".
      token_weights: `[B, T]` constant weights of each token's policy-gradient term (not of its KL term),
        e.g. `rollout_correction`'s importance weights; None: all 1.

    Returns:
      (loss, metrics): a float32 scalar and a dict of float32 scalars: pg_loss, kl (with a reference),
      clip_fraction_low / _high / clip_fraction (share of tokens whose ratio was clipped: for grpo/gspo where
      clipping zeroes the gradient, for cispo where the IS weight was clipped), dual_clip_fraction, ratio
      mean/min/max, approx_kl (k3 estimate of KL(pi_old || pi_theta) on the batch), num_tokens.
    """
    check_option("loss_type", loss_type, LOSS_TYPES)
    check_option("aggregation", aggregation, AGGREGATIONS)
    check_option("kl_estimator", kl_estimator, KL_ESTIMATORS)
    chex.assert_rank([logprobs, old_logprobs, mask], 2, custom_message="logprobs/old_logprobs/mask: [B, T]")
    chex.assert_equal_shape([logprobs, old_logprobs, mask], custom_message="logprobs/old_logprobs/mask")
    chex.assert_rank(advantages, {1, 2}, custom_message="advantages must be [B] or [B, T]")
    if advantages.shape != logprobs.shape[: advantages.ndim]:
        raise ValueError(
            f"advantages has shape {advantages.shape}; it must be [B]={logprobs.shape[:1]} or "
            f"[B, T]={logprobs.shape} to match logprobs.")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if epsilon < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon={epsilon} and epsilon_high={epsilon_high} must be >= 0.")
    if dual_clip is not None and (loss_type == "cispo" or dual_clip <= 1.0):
        raise ValueError(
            f"dual_clip={dual_clip} needs a value > 1 (e.g. 3.0) and loss_type 'grpo' or 'gspo', "
            f"not {loss_type!r}; set dual_clip=None otherwise.")
    static_zero_beta = isinstance(beta, (int, float)) and beta == 0
    if ref_logprobs is None and not static_zero_beta:
        raise ValueError(f"beta={beta} needs ref_logprobs; pass them or set beta=0.0.")

    mask = jnp.asarray(mask).astype(bool)
    # Double-where: masked entries are replaced before any arithmetic, so even NaN/inf there cannot leak
    # into the loss or, through a 0 * NaN, into the gradient.
    logprobs = jnp.where(mask, jnp.asarray(logprobs, jnp.float32), 0.0)  # [B, T]
    old_logprobs = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(old_logprobs, jnp.float32), 0.0))
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], logprobs.shape)
    advantages = jax.lax.stop_gradient(jnp.where(mask, advantages, 0.0))  # [B, T]

    log_ratio = logprobs - old_logprobs  # [B, T]
    if loss_type == "gspo":
        lengths = jnp.maximum(mask.sum(axis=-1, keepdims=True), 1)  # [B, 1]
        seq_log_ratio = log_ratio.sum(axis=-1, keepdims=True) / lengths  # [B, 1]
        # Bounded above (a constant, so no gradient changes): e^88 overflows float32, and a stale batch can
        # reach it; at e^20 the ratio is far outside any clip range already.
        seq_log_ratio = jnp.minimum(seq_log_ratio, GSPO_LOG_RATIO_BOUND)
        log_ratio = jax.lax.stop_gradient(seq_log_ratio) + logprobs - jax.lax.stop_gradient(logprobs)
    ratio = jnp.exp(log_ratio)  # [B, T]
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    below, above = ratio < 1.0 - epsilon, ratio > 1.0 + epsilon_high

    metrics = {}
    if loss_type == "cispo":
        per_token = -jax.lax.stop_gradient(clipped_ratio) * advantages * logprobs
        clipped_low, clipped_high = below & mask, above & mask
    else:
        surrogate = jnp.minimum(ratio * advantages, clipped_ratio * advantages)
        if dual_clip is not None:
            dual_active = (advantages < 0) & (ratio > dual_clip) & mask
            surrogate = jnp.where(advantages < 0, jnp.maximum(surrogate, dual_clip * advantages), surrogate)
            metrics["dual_clip_fraction"] = _masked_mean(dual_active, mask)
        per_token = -surrogate
        clipped_low, clipped_high = below & (advantages < 0) & mask, above & (advantages > 0) & mask

    if token_weights is not None:
        chex.assert_equal_shape([logprobs, token_weights], custom_message="logprobs vs token_weights")
        per_token = per_token * jax.lax.stop_gradient(jnp.where(mask, token_weights, 0.0))
    pg_loss = aggregate_loss(per_token, mask, aggregation, max_completion_length)
    if ref_logprobs is not None:
        chex.assert_equal_shape([logprobs, ref_logprobs], custom_message="logprobs vs ref_logprobs")
        ref_logprobs = jnp.where(mask, jnp.asarray(ref_logprobs, jnp.float32), 0.0)
        kl = kl_divergence(logprobs, ref_logprobs, kl_estimator)  # [B, T]
        metrics["kl"] = _masked_mean(kl, mask)
        if not static_zero_beta:
            per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, mask, aggregation, max_completion_length)

    has_tokens = mask.any()
    metrics.update(
        loss=loss,
        pg_loss=pg_loss,
        clip_fraction_low=_masked_mean(clipped_low, mask),
        clip_fraction_high=_masked_mean(clipped_high, mask),
        clip_fraction=_masked_mean(clipped_low | clipped_high, mask),
        ratio_mean=_masked_mean(ratio, mask),
        ratio_min=jnp.where(has_tokens, jnp.where(mask, ratio, jnp.inf).min(), 1.0),
        ratio_max=jnp.where(has_tokens, jnp.where(mask, ratio, -jnp.inf).max(), 1.0),
        approx_kl=_masked_mean(kl_divergence(old_logprobs, logprobs, "k3"), mask),
        num_tokens=mask.sum().astype(jnp.float32),
    )
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def rollout_correction(
    old_logprobs: chex.Array,
    behaviour_logprobs: chex.Array,
    mask: chex.Array,
    *,
    mode: Correction = "tis",
    cap: float = 2.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Importance weights for tokens sampled by a behaviour policy mu that is not pi_old.

    The policy loss's ratio pi_theta / pi_old assumes the tokens came from pi_old. When they came from mu (a
    rollout sampled one step earlier while the previous update ran, or a sampler whose numerics differ from
    the training forward's), each token's policy-gradient term is weighted by w_t = pi_old(o_t) / mu(o_t)
    (decoupled PPO, arXiv 2110.00641): truncated at `cap` ("tis": min(w_t, cap), as verl's and TRL's
    truncated importance sampling) or dropped above it ("mis": w_t if w_t <= cap else 0, masked importance
    sampling), so a token the sampler drew far more often than pi_old would cannot dominate the update.

    Args:
      old_logprobs: `[B, T]` log pi_old (the policy the update starts from); constant.
      behaviour_logprobs: `[B, T]` log mu, the sampler's own log-probs of its tokens; constant.
      mask: `[B, T]` bool, true on completion tokens.
      mode: "tis", "mis", or "none" (weights 1).
      cap: C > 0, the largest weight kept.

    Returns:
      (weights `[B, T]`, 0 off the mask, for `policy_loss(token_weights=)`; metrics: is_weight_mean (of
      the weights used), is_ratio_max (of the raw w_t, log-ratio bounded at 80 so it stays finite) and
      is_capped_fraction (share of tokens with w_t > cap)).
    """
    check_option("rollout correction mode", mode, CORRECTIONS)
    chex.assert_equal_shape([old_logprobs, behaviour_logprobs, mask],
                            custom_message="old_logprobs/behaviour_logprobs/mask")
    if not cap > 0:
        raise ValueError(f"rollout correction cap={cap} must be > 0 (e.g. 2.0).")
    mask = jnp.asarray(mask).astype(bool)
    log_ratio = jnp.where(mask, jnp.asarray(old_logprobs, jnp.float32)
                          - jnp.asarray(behaviour_logprobs, jnp.float32), 0.0)
    ratio = jnp.exp(jnp.minimum(log_ratio, 80.0))  # e^80 is finite in float32 and far above any cap
    capped = (ratio > cap) & mask
    if mode == "tis":
        weights = jnp.minimum(ratio, cap)
    elif mode == "mis":
        weights = jnp.where(capped, 0.0, ratio)
    else:
        weights = jnp.ones_like(ratio)
    weights = jax.lax.stop_gradient(jnp.where(mask, weights, 0.0))
    has_tokens = mask.any()
    metrics = dict(is_weight_mean=_masked_mean(weights, mask),
                   is_ratio_max=jnp.where(has_tokens, jnp.where(mask, ratio, 0.0).max(), 1.0),
                   is_capped_fraction=_masked_mean(capped, mask))
    return weights, metrics


def value_loss(
    values: chex.Array,
    old_values: chex.Array,
    returns: chex.Array,
    mask: chex.Array,
    *,
    clip_range: float | None = 0.2,
    aggregation: Aggregation = "token-mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's critic loss: L = agg_t 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2).

    The clipped value objective of the PPO reference implementation (OpenAI baselines ppo2; Ouyang et al.
    2022 and Ziegler et al. 2019 for language models): the new value may not move the loss below what a
    step of more than `clip_range` from the rollout's value would give. clip_range=None: the plain squared
    error 0.5 * (V_t - R_t)^2.

    Args:
      values: `[B, T]` the critic's current values; the gradient flows through these.
      old_values: `[B, T]` the values when the rollout was collected; constant.
      returns: `[B, T]` regression targets (`advantages.gae`'s returns); constant.
      mask: `[B, T]` bool, true on completion tokens.
      clip_range: c > 0, or None for no clipping.
      aggregation: see `aggregate_loss` (token-mean by default, as PPO implementations average over tokens).

    Returns:
      (loss, metrics): the scalar loss and float32 scalars value_loss, value_clip_fraction (share of tokens
      whose clipped error was the larger one, so their gradient is zero), value_mean, return_mean and
      explained_variance = 1 - Var(R - V) / Var(R) over the masked tokens (1: perfect, <= 0: no better
      than predicting the mean), bounded below at -1: when the returns hardly vary the ratio explodes
      (-199 for a residual variance 200 times theirs) and says nothing more than -1 does.
    """
    check_option("aggregation", aggregation, AGGREGATIONS)
    chex.assert_rank([values, old_values, returns, mask], 2, custom_message="values/old_values/returns/mask")
    chex.assert_equal_shape([values, old_values, returns, mask],
                            custom_message="values/old_values/returns/mask")
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range={clip_range} must be > 0 (e.g. 0.2), or None for an unclipped loss.")
    mask = jnp.asarray(mask).astype(bool)
    values = jnp.where(mask, jnp.asarray(values, jnp.float32), 0.0)
    old_values = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(old_values, jnp.float32), 0.0))
    returns = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(returns, jnp.float32), 0.0))
    error = jnp.square(values - returns)
    if clip_range is None:
        per_token, clipped = 0.5 * error, jnp.zeros_like(mask)
    else:
        # Clipped as values, not as a step added back to old_values: inside the range the clipped value is
        # then exactly V (old + (V - old) differs from V in float32 and would count as clipped).
        clipped_values = jnp.clip(values, old_values - clip_range, old_values + clip_range)
        clipped_error = jnp.square(clipped_values - returns)
        per_token, clipped = 0.5 * jnp.maximum(error, clipped_error), (clipped_error > error) & mask
    loss = aggregate_loss(per_token, mask, aggregation)
    residual_mean = _masked_mean(returns - values, mask)
    residual_var = _masked_mean(jnp.square(returns - values - residual_mean), mask)
    return_mean = _masked_mean(returns, mask)
    return_var = _masked_mean(jnp.square(returns - return_mean), mask)
    metrics = dict(value_loss=loss, value_clip_fraction=_masked_mean(clipped, mask),
                   value_mean=_masked_mean(values, mask), return_mean=return_mean,
                   explained_variance=jnp.maximum(1.0 - residual_var / jnp.maximum(return_var, 1e-8), -1.0))
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
