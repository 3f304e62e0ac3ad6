"""grpo_jax: Group Relative Policy Optimization for language models in JAX/Flax.

The GRPO math is a set of pure functions over arrays that know nothing of a model, trainer or config:

  group_advantages, process_advantages    rewards -> advantages        (grpo_jax.advantages)
  policy_loss, kl_divergence, aggregate_loss   log-probs -> loss        (grpo_jax.losses)
  aggregation_denominator                 weights of accumulated parts  (grpo_jax.losses)
  rollout_correction                      stale/mismatched samples -> IS weights (grpo_jax.losses)
  token_logprobs                          hidden states -> log-probs    (grpo_jax.logprobs)

and the learned-critic baseline (PPO) it is measured against:

  token_rewards, gae, whiten              scores, values -> advantages  (grpo_jax.advantages)
  value_loss                              values -> critic loss         (grpo_jax.losses)
"""

from grpo_jax.advantages import (
    gae,
    group_advantages,
    process_advantages,
    token_rewards,
    whiten,
    zero_variance_fraction,
)
from grpo_jax.logprobs import token_logprobs
from grpo_jax.losses import (
    aggregate_loss,
    aggregation_denominator,
    kl_divergence,
    policy_loss,
    rollout_correction,
    value_loss,
)

__version__ = "0.1.0"

__all__ = [
    "aggregate_loss",
    "aggregation_denominator",
    "gae",
    "group_advantages",
    "kl_divergence",
    "policy_loss",
    "process_advantages",
    "rollout_correction",
    "token_logprobs",
    "token_rewards",
    "value_loss",
    "whiten",
    "zero_variance_fraction",
]
