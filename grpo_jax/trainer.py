"""The GRPO loop: rollout -> rewards -> advantages -> reference / old log-probs -> mu clipped updates.

One iteration (`Trainer.step`), as named stages:

  1. prompts   N prompts from the dataset at the current position (a resumable integer)
  2. sample    G completions each with the jit-compiled group sampler (prompt prefilled once), on the
               training mesh or on a `rollout_mesh` of its own
  3. rewards   plain Python reward function on the host; DAPO soft overlong penalty in tokens
  4. filter    DAPO dynamic sampling: drop groups whose rewards are all equal, sample more prompts until N
               groups carry signal (bounded number of extra rounds)
  5. advantages  group-relative (any estimator/scale of `group_advantages`)
  6. reference   log pi_ref once per batch, only when beta != 0 (no reference params exist at beta == 0)
  7. old         log pi_old once per batch, only when mu > 1 (at mu == 1 the ratio is exp(logp - sg(logp)))
  8. update      mu epochs x num_minibatches optimizer steps, each one jitted `train_step(state, batch)`
                 with gradient accumulation over microbatches (strided over the prompts, so each data
                 shard holds its share of every one), global-norm clipping and AdamW; a non-finite
                 loss or gradient skips the update (counted) and leaves the parameters untouched
  9. reference reset  DeepSeekMath iterative GRPO: pi_ref <- pi_theta every `ref_update_every` steps

With algo="ppo" the same loop is PPO with a learned critic, the baseline GRPO is measured against: a value
model (a copy of the policy's backbone with a scalar head, initialised from the policy) gives per-token
values, stage 5 becomes GAE over them (with the KL to the reference in the reward or in the loss), and stage
8 also fits the critic with the clipped value loss, with its own optimizer.

Every forward over completions runs the prompt once per group: the prompt's keys/values are a shared prefix
for its G completions (`completion_logprobs`), so gradients reach the prompt positions through the broadcast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from grpo_jax import advantages as advantages_lib
from grpo_jax import losses, sharding
from grpo_jax._validation import check_option
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.logprobs import token_logprobs
from grpo_jax.metrics import MetricsWriter
from grpo_jax.models.transformer import Prefix, Transformer, causal_mask, positions_from_mask
from grpo_jax.sampling import DEFAULT_BUCKETS, SamplingConfig, pad_prompts, prompt_sharding, sample

ALGOS = ("grpo", "ppo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Everything one GRPO run needs besides the model, data and reward function."""

    # Batch: N prompts x G completions per step.
    num_prompts: int = 8
    group_size: int = 8
    # Sampling.
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0
    prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    vocab_limit: int = 0  # sample only ids below it (the tokenizer's size), 0 for the whole vocabulary
    # Updates: mu epochs over each batch, num_minibatches optimizer steps per epoch, each accumulating
    # gradients over grad_accum_steps microbatches (all counted in prompts, groups never split).
    mu: int = 1
    num_minibatches: int = 1
    grad_accum_steps: int = 1
    learning_rate: float = 1e-6
    lr_schedule: str = "constant"  # constant | cosine | linear (decay to 0 at total_steps)
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # Loss (see grpo_jax.losses.policy_loss).
    beta: float = 0.0
    kl_estimator: str = "k3"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    dual_clip: float | None = None
    loss_type: str = "grpo"
    aggregation: str = "seq-mean-token-mean"
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * aggregated entropy
    # Algorithm: "grpo" (group-relative advantages, no critic) or "ppo" (a learned critic and GAE).
    algo: str = "grpo"
    # PPO only (see grpo_jax.advantages.gae / token_rewards and grpo_jax.losses.value_loss).
    gamma: float = 1.0
    gae_lambda: float = 0.95
    value_coef: float = 0.5  # weight of the value loss in the reported loss and the critic's gradient
    value_clip: float | None = 0.2
    critic_learning_rate: float = 0.0  # 0: the policy's learning_rate
    kl_in_reward: bool = False  # InstructGPT-style per-token -beta * KL reward instead of beta * KL loss
    whiten_advantages: bool = True
    # Advantages (see grpo_jax.advantages.group_advantages).
    advantage_estimator: str = "grpo"
    advantage_scale: str = "group"
    advantage_eps: float = 1e-6
    # DeepSeekMath iterative GRPO: reset the reference to the policy every K steps (0: never).
    ref_update_every: int = 0
    # DAPO.
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    overlong_buffer: int = 0  # L_cache of DAPO eq. 13, in tokens (0: no soft overlong penalty)
    overlong_penalty: float = 1.0  # scale of that penalty
    mask_truncated: bool = False  # DAPO overlong filtering: truncated completions get no loss
    logprob_chunk_size: int = 1024
    seed: int = 0

    def __post_init__(self):
        per_minibatch, rest = divmod(self.num_prompts, self.num_minibatches)
        problems = [
            (self.num_prompts >= 1 and self.group_size >= 1 and self.mu >= 1, "num_prompts, group_size, mu",
             "must be >= 1"),
            (rest == 0, "num_minibatches", f"must divide num_prompts={self.num_prompts}"),
            (rest == 0 and per_minibatch % self.grad_accum_steps == 0, "grad_accum_steps",
             f"must divide the prompts per minibatch ({per_minibatch})"),
            (0 <= self.overlong_buffer < self.max_new_tokens, "overlong_buffer",
             f"must be in [0, max_new_tokens={self.max_new_tokens})"),
            (self.lr_schedule in ("constant", "cosine", "linear"), "lr_schedule",
             "must be 'constant', 'cosine' or 'linear'"),
            (self.ref_update_every >= 0 and self.max_resample_rounds >= 0, "ref_update_every",
             "and max_resample_rounds must be >= 0"),
            (0.0 <= self.gamma <= 1.0, "gamma", "must be in [0, 1]"),
            (0.0 <= self.gae_lambda <= 1.0, "gae_lambda", "must be in [0, 1]"),
            (self.value_coef > 0, "value_coef", "must be > 0"),
            (self.value_clip is None or self.value_clip > 0, "value_clip", "must be > 0, or None (no clip)"),
            (self.critic_learning_rate >= 0, "critic_learning_rate", "must be >= 0 (0: learning_rate)"),
            (not (self.kl_in_reward and self.algo != "ppo"), "kl_in_reward", "needs algo='ppo'"),
        ]
        for ok, name, fix in problems:
            if not ok:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name.split(',')[0])!r} {fix}.")
        check_option("GRPOConfig.algo", self.algo, ALGOS)
        check_option("GRPOConfig.loss_type", self.loss_type, losses.LOSS_TYPES)
        check_option("GRPOConfig.aggregation", self.aggregation, losses.AGGREGATIONS)
        check_option("GRPOConfig.kl_estimator", self.kl_estimator, losses.KL_ESTIMATORS)
        check_option("GRPOConfig.advantage_estimator", self.advantage_estimator, ("grpo", "rloo"))
        check_option("GRPOConfig.advantage_scale", self.advantage_scale, ("group", "batch", "none"))

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, group_size=self.group_size, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, stop_tokens=self.stop_tokens,
            pad_id=self.pad_id, buckets=self.prompt_buckets, vocab_limit=self.vocab_limit)

    def loss_options(self) -> dict[str, Any]:
        constant_normaliser = self.aggregation == "seq-mean-token-sum-norm"
        beta = 0.0 if self.kl_in_reward else self.beta  # in the reward instead
        return dict(beta=beta, kl_estimator=self.kl_estimator, epsilon=self.epsilon,
                    epsilon_high=self.epsilon_high, dual_clip=self.dual_clip, loss_type=self.loss_type,
                    aggregation=self.aggregation,
                    max_completion_length=self.max_new_tokens if constant_normaliser else None)


# ----------------------------------------------------------------------------- pure pieces


def completion_logprobs(
    model: Transformer,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
):
    """log pi(completion tokens | prompt) `[B, T]` with each prompt computed once for its G completions.

    The N prompts `[N, P]` (left-padded) run once; their keys/values are the shared prefix of the
    B = N * G completion rows `[B, T]` (right-padded), whose hidden states predict the next token. Equal
    to the plain forward over [prompt ; completion] rows, at a fraction of the prompt cost.
    """
    hidden = completion_hidden(model, prompt_tokens, prompt_mask, completion_tokens, completion_mask)
    return token_logprobs(hidden, model.unembedding(), completion_tokens, temperature=temperature,
                          chunk_size=chunk_size, return_entropy=return_entropy)


def completion_hidden(model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      completion_tokens: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """`[B, T, D]` final hidden states at the positions that predict each completion token (the state
    before token t is chosen), the shared-prefix forward of `completion_logprobs`."""
    num_prompts = prompt_tokens.shape[0]
    group = completion_tokens.shape[0] // num_prompts
    prompt_positions = positions_from_mask(prompt_mask)
    hidden_prompt, prompt_kv = model(prompt_tokens, prompt_positions, causal_mask(prompt_mask))
    inputs, input_mask = completion_tokens[:, :-1], completion_mask[:, :-1]
    start = jnp.repeat(prompt_mask.sum(axis=1), group)[:, None]  # [B, 1]
    positions = start + jnp.arange(inputs.shape[1])[None]
    hidden, _ = model(inputs, positions, causal_mask(input_mask), prefix=Prefix(prompt_kv, prompt_mask))
    # The prompt's last hidden state predicts the first completion token.
    return jnp.concatenate([jnp.repeat(hidden_prompt[:, -1:], group, axis=0), hidden], axis=1)


def init_critic(policy_params: nnx.State, hidden_size: int) -> dict:
    """PPO's value model: a copy of the policy's params (its backbone) and a scalar head `hidden @ w + b`,
    zero-initialised so the first values are 0."""
    return {"backbone": jax.tree.map(jnp.copy, policy_params),
            "head": {"kernel": jnp.zeros((hidden_size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}}


def critic_values(critic: dict, graphdef, batch: dict[str, jax.Array]) -> jax.Array:
    """`[B, T]` float32 values V_t of the state before each completion token."""
    model = nnx.merge(graphdef, critic["backbone"])
    hidden = completion_hidden(model, batch["prompt_tokens"], batch["prompt_mask"],
                               batch["completion_tokens"], batch["completion_mask"])
    head = critic["head"]
    return jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), head["kernel"]) + head["bias"]


def overlong_penalty(lengths: np.ndarray, max_length: int, buffer: int) -> np.ndarray:
    """DAPO (arXiv 2503.14476) eq. 13, in tokens: 0 up to L_max - L_cache, then falling linearly to -1 at
    L_max, and -1 beyond (a truncated completion counts as longer than L_max)."""
    lengths = np.asarray(lengths, np.float64)
    soft_start = max_length - buffer
    penalty = np.where(lengths <= soft_start, 0.0, (soft_start - lengths) / max(buffer, 1))
    return np.where(lengths > max_length, -1.0, penalty).astype(np.float32)


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    critic: dict | None = None  # PPO's value model ({"backbone", "head"}); None for GRPO
    critic_opt_state: optax.OptState | None = None


def make_optimizer(cfg: GRPOConfig, learning_rate: float | None = None) -> optax.GradientTransformation:
    """Global-norm clipping and AdamW on cfg's schedule, peaking at `learning_rate` (default
    cfg.learning_rate; PPO's critic uses its own)."""
    cfg = cfg if learning_rate is None else dataclasses.replace(cfg, learning_rate=learning_rate)
    warmup = max(cfg.warmup_steps, 0)
    steps_per_iteration = cfg.mu * cfg.num_minibatches
    decay_steps = max(cfg.total_steps * steps_per_iteration - warmup, 1)
    if cfg.lr_schedule == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
             optax.constant_schedule(cfg.learning_rate)], [warmup]) if warmup else cfg.learning_rate
    elif cfg.lr_schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, warmup + decay_steps)
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
             optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)], [warmup])
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay),
    )
    # A non-finite gradient leaves params and moments untouched and is counted in the state.
    return optax.apply_if_finite(inner, max_consecutive_errors=1_000_000)


def _loss_fn(params, graphdef, batch, cfg: GRPOConfig):
    params, critic = params if cfg.algo == "ppo" else (params, None)
    model = nnx.merge(graphdef, params)
    temperature = cfg.temperature or 1.0
    out = completion_logprobs(model, batch["prompt_tokens"], batch["prompt_mask"], batch["completion_tokens"],
                              batch["completion_mask"], temperature=temperature,
                              chunk_size=cfg.logprob_chunk_size, return_entropy=cfg.entropy_coef > 0)
    logprobs, entropy = out if cfg.entropy_coef > 0 else (out, None)
    old = batch["old_logprobs"] if cfg.mu > 1 else jax.lax.stop_gradient(logprobs)
    loss, metrics = losses.policy_loss(logprobs, old, batch["advantages"], batch["completion_mask"],
                                       ref_logprobs=batch.get("ref_logprobs"), **cfg.loss_options())
    if entropy is not None:
        mean_entropy = losses.aggregate_loss(entropy, batch["completion_mask"], cfg.aggregation,
                                             cfg.loss_options()["max_completion_length"])
        loss = loss - cfg.entropy_coef * mean_entropy
        metrics["entropy"] = jax.lax.stop_gradient(mean_entropy)
        metrics["loss"] = jax.lax.stop_gradient(loss)
    if critic is not None:  # the policy and the critic share no params: one loss, two disjoint gradients
        values = critic_values(critic, graphdef, batch)
        v_loss, value_metrics = losses.value_loss(values, batch["old_values"], batch["returns"],
                                                  batch["completion_mask"], clip_range=cfg.value_clip,
                                                  aggregation=cfg.aggregation)
        loss = loss + cfg.value_coef * v_loss
        metrics.update(value_metrics, loss=jax.lax.stop_gradient(loss))
    return loss, metrics


def split_groups(x: jax.Array, parts: int, rows_per_prompt: int) -> jax.Array:
    """`[n * rows_per_prompt, ...]` -> `[parts, n / parts * rows_per_prompt, ...]`, whole groups per part.

    Part j holds prompts j, parts + j, 2 * parts + j, ... (with their rows): strided, not contiguous, so that
    each data shard of the batch (a contiguous block of prompts) holds its equal share of every part and
    splitting moves nothing between devices. `merge_groups` puts the rows back in order.
    """
    prompts = x.shape[0] // rows_per_prompt
    x = x.reshape(prompts // parts, parts, rows_per_prompt, *x.shape[1:])
    return x.swapaxes(0, 1).reshape(parts, (prompts // parts) * rows_per_prompt, *x.shape[3:])


def split_batch(batch: dict[str, jax.Array], parts: int, group_size: int) -> dict[str, jax.Array]:
    """`split_groups` of every field: prompt fields have one row per prompt, the others `group_size`."""
    return {k: split_groups(v, parts, 1 if k.startswith("prompt_") else group_size) for k, v in batch.items()}


def merge_groups(x: jax.Array, rows_per_prompt: int) -> jax.Array:
    """The inverse of `split_groups`: `[parts, rows, ...]` -> `[parts * rows, ...]` in the batch's order."""
    parts, rows = x.shape[:2]
    x = x.reshape(parts, rows // rows_per_prompt, rows_per_prompt, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(parts * rows, *x.shape[3:])


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef, optimizer, cfg: GRPOConfig,
               critic_optimizer=None):
    """One optimizer update on a minibatch: `(state, batch) -> (state, metrics)`, pure, jitted by Trainer.

    The minibatch holds `n` prompts and their n * G completions; it is split into `grad_accum_steps`
    microbatches of whole groups. Each microbatch's gradient is weighted by its share of the aggregation's
    denominator (tokens for token-mean, non-empty rows otherwise), so the update is that of the whole
    minibatch at once, whatever the split. With PPO the critic is fitted in the same pass, by
    `critic_optimizer`.
    """
    steps = cfg.grad_accum_steps
    trained = (state.params, state.critic) if cfg.algo == "ppo" else state.params
    grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)

    micro = split_batch(batch, steps, cfg.group_size)
    denominators = jax.vmap(functools.partial(losses.aggregation_denominator, mode=cfg.aggregation))(
        micro["completion_mask"])  # [steps]
    weights = denominators / jnp.maximum(denominators.sum(), 1.0)

    def accumulate(grads_sum, inputs):
        microbatch, weight = inputs
        (_, metrics), grads = grad_fn(trained, graphdef, microbatch, cfg)
        return jax.tree.map(lambda a, g: a + weight * g, grads_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, trained)
    grads, metrics = jax.lax.scan(accumulate, zeros, (micro, weights))
    metrics = jax.tree.map(lambda m: jnp.sum(m * weights), metrics)
    grads, critic_grads = grads if cfg.algo == "ppo" else (grads, None)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["skipped_updates"] = opt_state.total_notfinite.astype(jnp.float32)
    critic, critic_opt_state = state.critic, state.critic_opt_state
    if critic_grads is not None:
        updates, critic_opt_state = critic_optimizer.update(critic_grads, critic_opt_state, critic)
        critic = optax.apply_updates(critic, updates)
        metrics["critic_grad_norm"] = optax.global_norm(critic_grads)
    return TrainState(params, opt_state, critic, critic_opt_state), metrics


def ppo_targets(critic: dict, batch: dict[str, jax.Array], *, graphdef, cfg: GRPOConfig) -> dict:
    """PPO's stage 5, in jit: the rollout's values, per-token rewards (the score on the last token, with
    -beta * KL per token when cfg.kl_in_reward), GAE advantages (whitened over the batch unless
    cfg.whiten_advantages is off) and the critic's regression targets."""
    mask = batch["completion_mask"]
    old_values = critic_values(critic, graphdef, batch)
    kl = None
    if cfg.kl_in_reward and cfg.beta:
        kl = losses.kl_divergence(batch["old_logprobs"], batch["ref_logprobs"], cfg.kl_estimator)
    rewards = advantages_lib.token_rewards(batch["scores"], mask, kl=kl,
                                           beta=cfg.beta if kl is not None else 0.0)
    advantages, returns = advantages_lib.gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.gae_lambda)
    if cfg.whiten_advantages:
        advantages = advantages_lib.whiten(advantages, mask)
    return dict(old_values=jnp.where(mask, old_values, 0.0), advantages=advantages, returns=returns)


# ----------------------------------------------------------------------------- the loop


RewardFn = Callable[[Sequence[Any], Sequence[Sequence[int]]], Any]
_ROW_FIELDS = ("tokens", "mask", "truncated", "rewards", "task_rewards", "lengths")  # per completion row


class Trainer:
    """Runs GRPO iterations on a model. The dataset is indexable (`len`, `[i]` -> example with a
    `prompt_tokens` list); `reward_fn(examples, completions)` gets one example per completion row (each
    prompt's example repeated G times) and the completion token lists, and returns rewards `[B]` or
    `(rewards [B], {metric name: value})`.

    `mesh` lays out training (default: every device on "data"). `rollout_mesh`, when given, is where
    sampling runs instead, with the policy copied onto it each iteration: e.g. data-parallel with whole
    params for decoding while training shards them FSDP-style, or on a CPU one device per core (sampling, all
    small per-token matmuls, ran about 25% faster on a 2-core CPU as two devices than as one).
    """

    def __init__(self, model: Transformer, cfg: GRPOConfig, dataset, reward_fn: RewardFn, *,
                 mesh: Mesh | None = None, rollout_mesh: Mesh | None = None):
        self.cfg = cfg
        self.dataset = dataset
        self.reward_fn = reward_fn
        self.mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
        self.rollout_mesh = rollout_mesh
        if rollout_mesh is not None:
            prompt_sharding(rollout_mesh, cfg.num_prompts)  # num_prompts must split over it
        self.sampling = cfg.sampling()
        self.optimizer = make_optimizer(cfg)
        self.graphdef, params = nnx.split(model)
        self.model_config = model.config
        shardings = sharding.param_shardings(params, self.mesh)
        # Every process built the same params from the same seed; each places the shards it holds.
        params = jax.tree.map(lambda x, s: sharding.put_global(np.asarray(x), s), params, shardings)
        # Optimizer moments are sharded like their parameters; counters are replicated.
        opt_shardings = optax.tree_map_params(
            self.optimizer, lambda _, s: s, jax.eval_shape(self.optimizer.init, params), shardings,
            transform_non_params=lambda _: sharding.replicated(self.mesh))
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(params)
        self.critic_optimizer = critic = critic_opt_state = None
        if cfg.algo == "ppo":
            self.critic_optimizer = make_optimizer(cfg, cfg.critic_learning_rate or cfg.learning_rate)
            critic = init_critic(params, model.config.hidden_size)
            head_shardings = jax.tree.map(lambda _: sharding.replicated(self.mesh), critic["head"])
            critic_shardings = {"backbone": shardings, "head": head_shardings}
            critic = jax.device_put(critic, critic_shardings)
            critic_opt_state = jax.jit(self.critic_optimizer.init, out_shardings=optax.tree_map_params(
                self.critic_optimizer, lambda _, s: s, jax.eval_shape(self.critic_optimizer.init, critic),
                critic_shardings, transform_non_params=lambda _: sharding.replicated(self.mesh)))(critic)
        self.state = TrainState(params, opt_state, critic, critic_opt_state)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        # Sampling may use its own layout (e.g. data-parallel over every device with whole params, where
        # training shards them): the policy is copied onto it once per iteration, not gathered every step.
        self._rollout_shardings = (None if rollout_mesh is None
                                   else sharding.param_shardings(params, rollout_mesh))
        # No reference params at all when beta == 0; a copy otherwise (the train step donates the policy's).
        self.ref_params = jax.tree.map(jnp.copy, params) if cfg.beta else None
        self.step = 0
        self.data_position = 0
        self.key = jax.random.key(cfg.seed)
        self.counters = {"policy_forward": 0, "reference_forward": 0}
        self._timings = {"time_sampling": 0.0, "time_rewards": 0.0}
        self._train_step = jax.jit(
            functools.partial(train_step, graphdef=self.graphdef, optimizer=self.optimizer, cfg=cfg,
                              critic_optimizer=self.critic_optimizer),
            in_shardings=(self.state_shardings, None), out_shardings=(self.state_shardings, None),
            donate_argnums=0)
        self._logprobs = jax.jit(self._batch_logprobs)
        self._ppo_targets = jax.jit(functools.partial(ppo_targets, graphdef=self.graphdef, cfg=cfg))

    # -- stages ---------------------------------------------------------------------------------------

    def _batch_logprobs(self, params, batch):
        """Reference / old log-probs of the whole batch, in the update's microbatches of whole groups."""
        model = nnx.merge(self.graphdef, params)
        keys = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")

        def logprobs(part):
            return completion_logprobs(model, *(part[k] for k in keys),
                                       temperature=self.cfg.temperature or 1.0,
                                       chunk_size=self.cfg.logprob_chunk_size)

        parts = self.cfg.num_minibatches * self.cfg.grad_accum_steps
        if parts == 1:
            return logprobs(batch)
        split = split_batch({k: batch[k] for k in keys}, parts, self.cfg.group_size)
        return merge_groups(jax.lax.map(logprobs, split), self.cfg.group_size)  # [parts, rows, T] -> [B, T]

    def _next_examples(self, count: int) -> list:
        examples = [self.dataset[(self.data_position + i) % len(self.dataset)] for i in range(count)]
        self.data_position += count
        return examples

    def _rollout(self, model: Transformer, examples, key):
        """Sample G completions per example and score them on the host."""
        cfg = self.cfg
        start = time.perf_counter()
        out = sample(model, [e["prompt_tokens"] for e in examples], key, self.sampling,
                     mesh=self.mesh if self.rollout_mesh is None else self.rollout_mesh)
        tokens, mask = sharding.to_host(out.tokens), sharding.to_host(out.mask)
        truncated = sharding.to_host(out.truncated)
        self._timings["time_sampling"] += time.perf_counter() - start
        start = time.perf_counter()
        completions = [row[m].tolist() for row, m in zip(tokens, mask, strict=True)]
        repeated = [e for e in examples for _ in range(cfg.group_size)]
        result = self.reward_fn(repeated, completions)
        rewards, reward_metrics = result if isinstance(result, tuple) else (result, {})
        rewards = np.asarray(rewards, np.float32)
        if rewards.shape != (len(completions),):
            raise ValueError(f"reward_fn returned shape {rewards.shape}; expected ({len(completions)},), "
                             "one reward per completion.")
        lengths = mask.sum(axis=1)
        task_rewards = rewards.copy()
        if cfg.overlong_buffer:
            lengths_for_penalty = np.where(truncated, cfg.max_new_tokens + 1, lengths)
            rewards = rewards + cfg.overlong_penalty * overlong_penalty(
                lengths_for_penalty, cfg.max_new_tokens, cfg.overlong_buffer)
        self._timings["time_rewards"] += time.perf_counter() - start
        return dict(examples=examples, tokens=tokens, mask=mask, truncated=truncated, rewards=rewards,
                    task_rewards=task_rewards, reward_metrics=reward_metrics, lengths=lengths)

    def _collect(self, key) -> tuple[dict, dict]:
        """Stages 1-4: a batch of N groups (with DAPO dynamic sampling, only groups that carry signal)."""
        cfg, groups, rounds, sampled, call_metrics = self.cfg, [], 0, 0, {}
        model = self.rollout_model()  # placed once, for every round of dynamic sampling
        while True:
            examples = self._next_examples(cfg.num_prompts)
            rollout = self._rollout(model, examples, jax.random.fold_in(key, rounds))
            sampled += cfg.num_prompts
            # Per-completion reward metrics travel with their group; per-call ones (error counts) add up.
            per_row = {k: np.asarray(v) for k, v in rollout["reward_metrics"].items()
                       if np.shape(v) == rollout["rewards"].shape}
            for k, v in rollout["reward_metrics"].items():
                if k not in per_row:
                    call_metrics[k] = call_metrics.get(k, 0.0) + float(np.sum(v))
            has_signal = np.asarray(advantages_lib.group_has_signal(rollout["rewards"], cfg.group_size))
            for i, example in enumerate(rollout["examples"]):
                rows = slice(i * cfg.group_size, (i + 1) * cfg.group_size)
                group = {k: rollout[k][rows] for k in _ROW_FIELDS}
                group["reward_metrics"] = {k: v[rows] for k, v in per_row.items()}
                group["example"] = example
                group["informative"] = bool(has_signal[i])
                groups.append(group)
            if not cfg.dynamic_sampling:
                break
            informative = [g for g in groups if g["informative"]]
            if len(informative) >= cfg.num_prompts or rounds >= cfg.max_resample_rounds:
                # Fill any remaining places with degenerate groups: they get advantage 0 (no gradient).
                rest = [g for g in groups if not g["informative"]]
                groups = (informative + rest)[: cfg.num_prompts]
                break
            rounds += 1
        groups = groups[: cfg.num_prompts]
        batch = {k: np.concatenate([g[k] for g in groups]) for k in _ROW_FIELDS}
        batch["examples"] = [g["example"] for g in groups]
        reward_metrics = {k: float(np.mean(np.concatenate([g["reward_metrics"][k] for g in groups])))
                          for k in groups[0]["reward_metrics"]}
        info = dict(resample_rounds=rounds, prompts_sampled=sampled,
                    reward_metrics={**reward_metrics, **call_metrics})
        return batch, info

    def current_model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.state.params)

    def rollout_model(self) -> Transformer:
        """The current policy laid out on the rollout mesh (the training mesh unless one was given)."""
        if self._rollout_shardings is None:
            return self.current_model()
        return nnx.merge(self.graphdef, jax.device_put(self.state.params, self._rollout_shardings))

    def _device_batch(self, host: dict) -> dict[str, jax.Array]:
        cfg = self.cfg
        prompt_tokens, prompt_mask = pad_prompts([e["prompt_tokens"] for e in host["examples"]],
                                                 cfg.prompt_buckets, cfg.pad_id)
        completion_mask = host["mask"] & ~host["truncated"][:, None] if cfg.mask_truncated else host["mask"]
        arrays = dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, completion_tokens=host["tokens"],
                      completion_mask=completion_mask)
        if cfg.algo == "ppo":  # GAE needs the critic: ppo_targets turns the scores into advantages
            arrays["scores"] = host["rewards"]
        else:
            arrays["advantages"] = np.asarray(advantages_lib.group_advantages(
                jnp.asarray(host["rewards"]), cfg.group_size, estimator=cfg.advantage_estimator,
                scale=cfg.advantage_scale, eps=cfg.advantage_eps))
        return {k: sharding.put_global(v, sharding.batch_sharding(self.mesh, np.ndim(v)))
                for k, v in arrays.items()}

    def _minibatches(self, batch: dict[str, jax.Array], key) -> list[dict[str, jax.Array]]:
        """mu epochs of num_minibatches minibatches of whole groups, shuffled per epoch."""
        cfg = self.cfg
        per = cfg.num_prompts // cfg.num_minibatches
        if cfg.num_minibatches == 1:  # each epoch sees the whole batch: nothing to shuffle or gather
            return [batch] * cfg.mu
        out = []
        for epoch in range(cfg.mu):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), cfg.num_prompts))
            for m in range(cfg.num_minibatches):
                prompts = np.sort(order[m * per:(m + 1) * per])
                rows = (prompts[:, None] * cfg.group_size + np.arange(cfg.group_size)).reshape(-1)
                out.append({k: v[prompts] if k.startswith("prompt") else v[rows] for k, v in batch.items()})
        return out

    # -- one iteration ----------------------------------------------------------------------------------

    def iteration(self) -> dict[str, float]:
        """Run one GRPO iteration and return its metrics."""
        cfg = self.cfg
        # Keys derive from (seed, step): a resumed run draws exactly the keys the straight run drew.
        step_key = jax.random.fold_in(self.key, self.step)
        sample_key, shuffle_key = jax.random.split(step_key)
        self._timings = timings = {"time_sampling": 0.0, "time_rewards": 0.0}
        host, info = self._collect(sample_key)
        self.last_rollout = host

        start = time.perf_counter()
        batch = self._device_batch(host)
        if cfg.beta:
            batch["ref_logprobs"] = self._logprobs(self.ref_params, batch)
            self.counters["reference_forward"] += 1
        if cfg.mu > 1 or (cfg.kl_in_reward and cfg.beta):
            batch["old_logprobs"] = self._logprobs(self.state.params, batch)
            self.counters["policy_forward"] += 1
        if cfg.algo == "ppo":
            batch.update(self._ppo_targets(self.state.critic, batch))
            del batch["scores"]
            self.counters["critic_forward"] = self.counters.get("critic_forward", 0) + 1
        jax.block_until_ready(batch)
        timings["time_reference"] = time.perf_counter() - start

        start = time.perf_counter()
        update_metrics = []
        for minibatch in self._minibatches(batch, shuffle_key):
            self._minibatch_shapes = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), minibatch)
            self.state, metrics = self._train_step(self.state, minibatch)
            update_metrics.append(metrics)
        update_metrics = jax.device_get(update_metrics)
        timings["time_update"] = time.perf_counter() - start

        self.step += 1
        if cfg.ref_update_every and cfg.beta and self.step % cfg.ref_update_every == 0:
            self.ref_params = jax.tree.map(jnp.copy, self.state.params)
        return self._metrics(host, info, update_metrics, timings)

    def state_bytes(self) -> dict[str, int]:
        """Bytes held between iterations: policy params, optimizer state, critic (+ its optimizer state)
        and reference params."""
        def size(tree):
            return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))

        return dict(params=size(self.state.params), opt_state=size(self.state.opt_state),
                    critic=size(self.state.critic), critic_opt_state=size(self.state.critic_opt_state),
                    ref_params=size(self.ref_params))

    def train_step_memory(self) -> dict[str, int]:
        """XLA's compiled memory of one train step (`memory_analysis()`) on the last iteration's minibatch
        shapes, in bytes: arguments, outputs, temporaries, and peak = arguments + outputs + temporaries -
        the donated (aliased) state."""
        if not hasattr(self, "_minibatch_shapes"):
            raise ValueError("train_step_memory() needs one iteration() first (it uses its batch shapes).")
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                             self.state)
        analysis = self._train_step.lower(state, self._minibatch_shapes).compile().memory_analysis()
        out = dict(arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
                   temporaries=analysis.temp_size_in_bytes, aliased=analysis.alias_size_in_bytes)
        out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
        return out

    # -- checkpoints --------------------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict:
        state = {"params": self.state.params, "opt_state": self.state.opt_state, "rng": self.key}
        if self.state.critic is not None:
            state.update(critic=self.state.critic, critic_opt_state=self.state.critic_opt_state)
        if self.ref_params is not None:
            state["ref_params"] = self.ref_params
        return state

    def save(self, checkpointer: Checkpointer) -> None:
        """Save params, optimizer state, reference, PRNG key, step, data position and config."""
        metadata = {"step": self.step, "data_position": self.data_position,
                    "config": dataclasses.asdict(self.cfg), "model_config": repr(self.model_config)}
        checkpointer.save(self.step, self._checkpoint_state(), metadata, force=True)

    def restore(self, checkpointer: Checkpointer) -> bool:
        """Resume from the latest checkpoint, if any; False when there is none."""
        if checkpointer.latest_step() is None:
            return False
        state, metadata, _ = checkpointer.restore(self._checkpoint_state())
        saved = metadata["config"]
        current = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        changed = sorted(k for k in current if saved.get(k) != current[k])
        if changed:
            raise ValueError(f"{checkpointer.directory}: the checkpoint was written with a different "
                             f"GRPOConfig (fields {changed}); use a new workdir or the original config.")
        self.state = TrainState(state["params"], state["opt_state"], state.get("critic"),
                                state.get("critic_opt_state"))
        # Back to an uncommitted host-made key, like a fresh run's, so it can meet arrays on any mesh.
        self.key = jax.random.wrap_key_data(sharding.to_host(jax.random.key_data(state["rng"])))
        self.ref_params = state.get("ref_params")
        self.step, self.data_position = metadata["step"], metadata["data_position"]
        return True

    def _metrics(self, host, info, update_metrics, timings) -> dict[str, float]:
        cfg = self.cfg
        rewards, lengths = host["rewards"], host["lengths"]
        metrics = {
            "step": self.step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "task_reward_mean": float(host["task_rewards"].mean()),
            "zero_variance_groups": float(advantages_lib.zero_variance_fraction(rewards, cfg.group_size)),
            "completion_length_mean": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated_fraction": float(host["truncated"].mean()),
            "resample_rounds": float(info["resample_rounds"]),
            "prompts_sampled": float(info["prompts_sampled"]),
            **{f"reward/{k}": v for k, v in info["reward_metrics"].items()},
            **timings,
        }
        for name in update_metrics[0]:
            values = [float(m[name]) for m in update_metrics]
            metrics[name] = values[-1] if name == "skipped_updates" else float(np.mean(values))
        # Per-epoch clipping: the first epoch has ratio 1 when mu == 1; later epochs show the policy moving.
        metrics["clip_fraction_last_epoch"] = float(np.mean(
            [float(m["clip_fraction"]) for m in update_metrics[-cfg.num_minibatches:]]))
        if "reward/accuracy" in metrics:  # the progress line's "acc"
            metrics["accuracy"] = metrics["reward/accuracy"]
        total = sum(timings.values())
        metrics["tokens_per_second"] = float(lengths.sum()) / max(total, 1e-9)
        return metrics


def sample_records(trainer: Trainer, decode: Callable[[Sequence[int]], str], *, num_prompts: int = 2,
                   per_prompt: int = 2) -> list[dict[str, Any]]:
    """A few completions of the latest iteration as `{step, prompt, completion, reward}` records: the first
    `per_prompt` completions of each of its first `num_prompts` groups."""
    host, g = trainer.last_rollout, trainer.cfg.group_size
    records = []
    for i, example in enumerate(host["examples"][:num_prompts]):
        for row in range(i * g, i * g + min(per_prompt, g)):
            completion = decode(host["tokens"][row][host["mask"][row]].tolist())
            prompt = example.get("prompt_text") or decode(example["prompt_tokens"])
            records.append(dict(step=trainer.step, prompt=prompt, completion=completion,
                                reward=float(host["rewards"][row])))
    return records


def train(trainer: Trainer, workdir: str | pathlib.Path, num_steps: int, *, checkpoint_every: int = 10,
          log_every: int = 1, sample_every: int = 0, decode: Callable[[Sequence[int]], str] | None = None,
          print_fn: Callable[[str], object] = print) -> list[dict[str, float]]:
    """Run `trainer` to `num_steps`, resuming from `workdir`'s latest checkpoint: running the same command
    again after a crash continues where the last checkpoint left off. Writes `workdir/checkpoints/`,
    `workdir/metrics.jsonl` and TensorBoard events (from process 0); with `sample_every`, also a few
    completions every that many steps (and at the first) to `workdir/samples.jsonl` and the console,
    decoded by `decode` (default: the dataset's tokenizer). Returns this call's step metrics."""
    workdir = pathlib.Path(workdir)
    if sample_every and decode is None:
        tokenizer = getattr(trainer.dataset, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("train(sample_every=...) needs decode= (the dataset has no .tokenizer).")
        decode = tokenizer.decode
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=2)
    if trainer.restore(checkpointer):
        print_fn(f"resumed from {workdir / 'checkpoints'} at step {trainer.step}")
    writer = MetricsWriter(workdir, total_steps=num_steps, log_every=log_every,
                           print_fn=print_fn) if jax.process_index() == 0 else None
    history = []
    try:
        while trainer.step < num_steps:
            metrics = trainer.iteration()
            history.append(metrics)
            if writer is not None:
                writer.write(trainer.step, metrics)
                if sample_every and (trainer.step % sample_every == 0 or trainer.step == 1):
                    records = sample_records(trainer, decode)
                    with open(workdir / "samples.jsonl", "a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in records)
                    first = records[0]
                    prompt = first["prompt"] if len(first["prompt"]) <= 80 else "..." + first["prompt"][-77:]
                    print_fn(f"sample at step {trainer.step}: {prompt!r} -> {first['completion']!r} "
                             f"(reward {first['reward']:.3g})")
            if trainer.step % checkpoint_every == 0 or trainer.step == num_steps:
                trainer.save(checkpointer)
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()
    return history
