"""PPO's advantage source: a learned critic and GAE, the baseline GRPO is measured against.

The value model is a copy of the policy's params (its backbone) with a scalar head, zero-initialised so the
first values are 0; it gives V_t for the state before each completion token. `ppo_targets` turns a batch's
scores into per-token rewards (the score on the last token, with -beta * KL per token when the KL goes in the
reward, as in InstructGPT), then GAE advantages and the critic's regression targets, all in jit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax import advantages as advantages_lib
from grpo_jax import losses
from grpo_jax._validation import check_fields, finite
from grpo_jax.policy import completion_hidden, merge_groups, split_batch


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """`config.ppo`: the critic and GAE of algo="ppo" (see `advantages.gae`, `losses.value_loss`)."""

    gamma: float = 1.0
    gae_lambda: float = 0.95
    value_coef: float = 0.5  # weight of the value loss in the reported loss and the critic's gradient
    value_clip: float | None = 0.2
    critic_learning_rate: float = 0.0  # 0: the policy's config.optimizer.learning_rate
    kl_in_reward: bool = False  # InstructGPT-style per-token -beta * KL reward instead of beta * KL loss
    whiten_advantages: bool = True

    def __post_init__(self):
        check_fields("config.ppo", [
            ("gamma", self.gamma, finite(self.gamma) and 0.0 <= self.gamma <= 1.0, "must be in [0, 1]"),
            ("gae_lambda", self.gae_lambda, finite(self.gae_lambda) and 0.0 <= self.gae_lambda <= 1.0,
             "must be in [0, 1] (1: Monte-Carlo returns, 0: one-step TD)"),
            ("value_coef", self.value_coef, finite(self.value_coef) and self.value_coef > 0, "must be > 0"),
            ("value_clip", self.value_clip, self.value_clip is None or (finite(self.value_clip)
                                                                        and self.value_clip > 0),
             "must be > 0, or None (no clip)"),
            ("critic_learning_rate", self.critic_learning_rate,
             finite(self.critic_learning_rate) and self.critic_learning_rate >= 0,
             "must be >= 0 (0: the policy's learning rate)"),
        ])


def init_critic(policy_params: nnx.State, hidden_size: int) -> dict:
    """The value model's params: a copy of the policy's and a zero scalar head `hidden @ w + b` (pure; the
    copy is a buffer of its own also in jit, where the policy's may be donated)."""
    head = {"kernel": jnp.zeros((hidden_size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}
    return {"backbone": jax.tree.map(jnp.copy, policy_params), "head": head}


def critic_shardings(policy_shardings, mesh: Mesh) -> dict:
    """`init_critic`'s layout: the backbone like the policy, the head replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return {"backbone": policy_shardings, "head": {"kernel": replicated, "bias": replicated}}


def critic_values(critic: dict, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]) -> jax.Array:
    """`[B, T]` float32 values V_t of the state before each completion token."""
    model = nnx.merge(graphdef, critic["backbone"])
    hidden = completion_hidden(model, batch["prompt_tokens"], batch["prompt_mask"],
                               batch["completion_tokens"], batch["completion_mask"])
    head = critic["head"]
    return jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), head["kernel"]) + head["bias"]


def batch_values(critic: dict, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], *, group_size: int,
                 parts: int = 1) -> jax.Array:
    """`critic_values` of a whole batch in `parts` sequential parts of whole groups (`lax.map`), so memory is
    that of one part, as the policy's log-probs are computed (`policy.batch_logprobs`)."""
    fields = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")
    if parts == 1:
        return critic_values(critic, graphdef, batch)
    split = split_batch({k: batch[k] for k in fields}, parts, group_size)
    return merge_groups(jax.lax.map(lambda part: critic_values(critic, graphdef, part), split), group_size)


def ppo_targets(critic: dict, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], cfg: PPOConfig, *,
                beta: float, kl_estimator: str, group_size: int = 1, parts: int = 1) -> dict[str, jax.Array]:
    """The rollout's values, GAE advantages (whitened over the batch with cfg.whiten_advantages) and the
    critic's regression targets, from `batch["scores"]` `[B]`; with cfg.kl_in_reward and beta > 0 the
    rewards pay beta * KL(old || ref) per token (`batch["old_logprobs"]`, `batch["ref_logprobs"]`). The
    values are computed in `parts` parts of whole groups of `group_size` rows (`batch_values`)."""
    mask = batch["completion_mask"]
    old_values = batch_values(critic, graphdef, batch, group_size=group_size, parts=parts)
    kl = None
    if cfg.kl_in_reward and beta:
        kl = losses.kl_divergence(batch["old_logprobs"], batch["ref_logprobs"], kl_estimator)
    rewards = advantages_lib.token_rewards(batch["scores"], mask, kl=kl, beta=beta if kl is not None else 0.0)
    advantages, returns = advantages_lib.gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.gae_lambda)
    if cfg.whiten_advantages:
        advantages = advantages_lib.whiten(advantages, mask)
    return dict(old_values=jnp.where(mask, old_values, 0.0), advantages=advantages, returns=returns)


def critic_loss(critic: dict, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], cfg: PPOConfig, *,
                aggregation: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """value_coef * PPO's clipped value loss of the critic on a batch (with `ppo_targets`' fields)."""
    values = critic_values(critic, graphdef, batch)
    loss, metrics = losses.value_loss(values, batch["old_values"], batch["returns"], batch["completion_mask"],
                                      clip_range=cfg.value_clip, aggregation=aggregation)
    return cfg.value_coef * loss, metrics
