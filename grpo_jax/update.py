"""The update stage: a rollout's batch -> advantages, reference / old log-probs -> mu epochs of updates.

  prepare_batch  one jitted call per batch: the completion mask (DAPO overlong filtering), log pi_ref (only
                 when beta != 0), log pi_old (only when mu > 1 or PPO pays the KL in the reward) and the
                 advantages: group-relative for GRPO, GAE over a learned critic for PPO
  minibatch      a minibatch of whole groups, shuffled per epoch, gathered in jit
  train_step     one optimizer update `(state, minibatch) -> (state, metrics)`, pure: gradient accumulation
                 over microbatches (strided over the prompts, so each data shard holds its share of every
                 one), global-norm clipping and AdamW; a non-finite gradient skips the update (counted)

The step also measures the rollout/training mismatch: the training forward's log-probs of the sampled tokens
against the sampler's own (k3 KL and max |difference|), ~0 when both run the same params (on-policy).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax import advantages as advantages_lib
from grpo_jax import critic as critic_lib
from grpo_jax import lora as lora_lib
from grpo_jax import losses
from grpo_jax import sharding as sharding_lib
from grpo_jax._validation import check_fields, check_option, finite
from grpo_jax.policy import batch_logprobs, completion_logprobs, sequence_mask, split_batch

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """`config.loss`: the policy loss's options (`losses.policy_loss`) and the entropy bonus."""

    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    dual_clip: float | None = None
    aggregation: str = "seq-mean-token-mean"
    beta: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0  # loss -= entropy_coef * aggregated entropy
    # Tokens sampled by another policy than pi_old (config.rollout.pipeline="one_step_off", or a sampler
    # whose numerics differ): weight each token by pi_old / pi_sampler, truncated ("tis") or masked ("mis")
    # above correction_cap (`losses.rollout_correction`); "none": no weight.
    rollout_correction: str = "none"
    correction_cap: float = 2.0

    def __post_init__(self):
        for name, allowed in (("loss_type", losses.LOSS_TYPES), ("aggregation", losses.AGGREGATIONS),
                              ("kl_estimator", losses.KL_ESTIMATORS),
                              ("rollout_correction", losses.CORRECTIONS)):
            check_option(f"config.loss.{name}", getattr(self, name), allowed)
        check_fields("config.loss", [
            ("epsilon", self.epsilon, finite(self.epsilon) and self.epsilon >= 0, "must be a number >= 0"),
            ("epsilon_high", self.epsilon_high, finite(self.epsilon_high) and (self.epsilon_high or 0) >= 0,
             "must be a number >= 0, or None (= epsilon)"),
            ("dual_clip", self.dual_clip, self.dual_clip is None or (finite(self.dual_clip)
                                                                     and self.dual_clip > 1),
             "must be > 1 (e.g. 3.0), or None (no dual clip)"),
            ("dual_clip", self.dual_clip, self.dual_clip is None or self.loss_type != "cispo",
             "does not apply to loss_type='cispo'; set it to None"),
            ("beta", self.beta, finite(self.beta) and self.beta >= 0, "must be a number >= 0 (0: no KL)"),
            ("entropy_coef", self.entropy_coef, finite(self.entropy_coef), "must be a finite number"),
            ("correction_cap", self.correction_cap, finite(self.correction_cap) and self.correction_cap > 0,
             "must be a number > 0 (e.g. 2.0)"),
        ])

    def policy_loss(self, max_completion_length: int, *, beta: float | None = None) -> LossFn:
        """`losses.policy_loss` with these options: `(logprobs, old, advantages, mask, ref_logprobs=)`."""
        return functools.partial(
            losses.policy_loss, beta=self.beta if beta is None else beta, kl_estimator=self.kl_estimator,
            epsilon=self.epsilon, epsilon_high=self.epsilon_high, dual_clip=self.dual_clip,
            loss_type=self.loss_type, aggregation=self.aggregation,
            max_completion_length=max_completion_length if self.aggregation == "seq-mean-token-sum-norm"
            else None)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`config.optimizer`: global-norm clipping and AdamW on a learning-rate schedule."""

    learning_rate: float = 1e-6
    schedule: str = "constant"  # constant | cosine | linear (the last two decay to 0 at the last update)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_option("config.optimizer.schedule", self.schedule, ("constant", "cosine", "linear"))
        check_fields("config.optimizer", [
            ("learning_rate", self.learning_rate, finite(self.learning_rate) and self.learning_rate > 0,
             "must be a number > 0 (e.g. 1e-6 for a pretrained model)"),
            ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay, finite(self.weight_decay) and self.weight_decay >= 0,
             "must be >= 0"),
            ("adam_b1", self.adam_b1, finite(self.adam_b1) and 0 <= self.adam_b1 < 1, "must be in [0, 1)"),
            ("adam_b2", self.adam_b2, finite(self.adam_b2) and 0 <= self.adam_b2 < 1, "must be in [0, 1)"),
            ("adam_eps", self.adam_eps, finite(self.adam_eps) and self.adam_eps > 0, "must be > 0"),
            ("max_grad_norm", self.max_grad_norm, finite(self.max_grad_norm) and self.max_grad_norm > 0,
             "must be > 0"),
        ])


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """`config.updates`: mu epochs over each batch, num_minibatches optimizer steps per epoch, each
    accumulating gradients over grad_accum_steps microbatches (all counted in prompts: groups never split)."""

    mu: int = 1
    num_minibatches: int = 1
    grad_accum_steps: int = 1
    logprob_chunk_size: int = 1024
    ref_update_every: int = 0  # DeepSeekMath iterative GRPO: pi_ref <- pi_theta every K iterations (0: never)

    def __post_init__(self):
        check_fields("config.updates", [
            (name, getattr(self, name), getattr(self, name) >= 1, "must be >= 1")
            for name in ("mu", "num_minibatches", "grad_accum_steps", "logprob_chunk_size")
        ] + [("ref_update_every", self.ref_update_every, self.ref_update_every >= 0,
              "must be >= 0 (0: never)")])

    def check_divides(self, num_prompts: int) -> None:
        per_minibatch, rest = divmod(num_prompts, self.num_minibatches)
        check_fields("config.updates", [
            ("num_minibatches", self.num_minibatches, rest == 0,
             f"must divide config.rollout.num_prompts={num_prompts}"),
            ("grad_accum_steps", self.grad_accum_steps,
             rest == 0 and per_minibatch % self.grad_accum_steps == 0,
             f"must divide the prompts per minibatch ({per_minibatch})"),
        ])


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """`config.advantages`: the group-relative estimator (`advantages.group_advantages`)."""

    estimator: str = "grpo"  # grpo | rloo
    scale: str = "group"  # group | batch | none (Dr. GRPO)
    eps: float = 1e-6

    def __post_init__(self):
        check_option("config.advantages.estimator", self.estimator, ("grpo", "rloo"))
        check_option("config.advantages.scale", self.scale, ("group", "batch", "none"))
        check_fields("config.advantages", [
            ("eps", self.eps, finite(self.eps) and self.eps >= 0, "must be >= 0")])


class TrainState(NamedTuple):
    params: nnx.State  # the trained params: the policy's, or its LoRA adapters
    opt_state: optax.OptState
    critic: dict | None = None  # PPO's value model ({"backbone", "head"}); None for GRPO
    critic_opt_state: optax.OptState | None = None
    base: nnx.State | None = None  # under LoRA: the frozen base params (and the reference policy)


def policy_params(params: nnx.State, base: nnx.State | None, options: StepOptions) -> nnx.State:
    """The policy's params: the trained `params`, or under LoRA (they are the adapters) `base` with them
    merged in."""
    if options.lora is None:
        return params
    return lora_lib.merge(base, params, options.lora)


def make_optimizer(cfg: OptimizerConfig, num_updates: int, learning_rate: float | None = None
                   ) -> optax.GradientTransformation:
    """Global-norm clipping and AdamW on cfg's schedule over `num_updates` optimizer steps, peaking at
    `learning_rate` (default cfg.learning_rate). A non-finite gradient leaves params and moments untouched
    and is counted in the state (`skipped_updates`)."""
    peak = cfg.learning_rate if learning_rate is None else learning_rate
    warmup = cfg.warmup_steps
    decay_steps = max(num_updates - warmup, 1)
    if cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay_steps)
    else:
        after = (optax.constant_schedule(peak) if cfg.schedule == "constant"
                 else optax.linear_schedule(peak, 0.0, decay_steps))
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), after], [warmup])
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay))
    return optax.apply_if_finite(inner, max_consecutive_errors=1_000_000)


def init_train_state(params: nnx.State, cfg, key: jax.Array, *, optimizer: optax.GradientTransformation,
                     critic_optimizer: optax.GradientTransformation | None = None
                     ) -> tuple[TrainState, nnx.State | None]:
    """The state a run starts from, and its reference params (None at cfg.loss.beta == 0 and under LoRA,
    whose base is the reference). Pure: `jax.eval_shape` gives its shapes (memory reports, restoring a
    checkpoint) and `jax.jit(init_train_state, out_shardings=train_state_shardings(...))` makes it where it
    is laid out.

    `params` (the policy's) train, or under LoRA (cfg.lora.rank > 0) stay frozen as the base (int8 kernels
    under QLoRA) while adapters drawn from `key` train. cfg.algo == "ppo" adds a critic copied from the
    policy with a zero head, and its `critic_optimizer` state. `cfg` is the run's GRPOConfig.
    """
    trained, base = params, None
    if cfg.lora.enabled:
        trained = lora_lib.init_adapters(params, cfg.lora, key)
        base = lora_lib.quantize_base(params, cfg.lora) if cfg.lora.quantize else params
    critic = critic_opt_state = None
    if cfg.algo == "ppo":
        if critic_optimizer is None:
            raise ValueError("init_train_state: config.algo='ppo' needs critic_optimizer=.")
        critic = critic_lib.init_critic(params, params["final_norm"]["scale"].shape[0])
        critic_opt_state = critic_optimizer.init(critic)
    # The reference is a buffer of its own: the train step donates the policy's params.
    reference = jax.tree.map(jnp.copy, params) if cfg.loss.beta and base is None else None
    return TrainState(trained, optimizer.init(trained), critic, critic_opt_state, base), reference


def make_optimizers(cfg) -> tuple[optax.GradientTransformation, optax.GradientTransformation | None]:
    """The run's (optimizer, critic optimizer or None): `make_optimizer` of cfg.optimizer over the run's
    updates; PPO's critic at cfg.ppo.critic_learning_rate (default: the policy's)."""
    optimizer = make_optimizer(cfg.optimizer, cfg.optimizer_updates())
    if cfg.algo != "ppo":
        return optimizer, None
    return optimizer, make_optimizer(cfg.optimizer, cfg.optimizer_updates(),
                                     cfg.ppo.critic_learning_rate or None)


def abstract_train_state(params: nnx.State, cfg, mesh: Mesh, *,
                         optimizer: optax.GradientTransformation | None = None,
                         critic_optimizer: optax.GradientTransformation | None = None
                         ) -> tuple[TrainState, nnx.State | None]:
    """`init_train_state`'s (state, reference) as `jax.ShapeDtypeStruct`s with their shardings on `mesh`,
    nothing allocated or computed: what a checkpoint is restored into and what a memory report counts.
    `params` may be abstract; the optimizers default to the run's (`make_optimizers`)."""
    if optimizer is None:
        optimizer, critic_optimizer = make_optimizers(cfg)
    state, reference = jax.eval_shape(
        lambda p: init_train_state(p, cfg, jax.random.key(0), optimizer=optimizer,
                                   critic_optimizer=critic_optimizer), params)
    param_shardings = sharding_lib.param_shardings(params, mesh)
    shardings = train_state_shardings(state, param_shardings, mesh, optimizer=optimizer,
                                      critic_optimizer=critic_optimizer)

    def spec(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    reference = None if reference is None else jax.tree.map(spec, reference, param_shardings)
    return jax.tree.map(spec, state, shardings), reference


def train_state_shardings(state: TrainState, param_shardings, mesh: Mesh, *,
                          optimizer: optax.GradientTransformation,
                          critic_optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """Where `init_train_state`'s outputs (`state`: its shapes, e.g. from `jax.eval_shape`) live: params,
    the frozen base and the critic's backbone sharded like the policy's params (`param_shardings`, which
    the reference also takes); LoRA adapters, the critic's head and optimizer counters replicated; Adam's
    moments like their parameters."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def optimizer_shardings(opt, opt_state, shardings):
        return optax.tree_map_params(opt, lambda _, s: s, opt_state, shardings,
                                     transform_non_params=lambda _: replicated)

    def base_sharding(sharding, leaf):  # an int8 kernel's scale is split like the kernel's columns
        if not lora_lib.is_int8_kernel(leaf):
            return sharding
        return lora_lib.Int8Kernel(sharding, NamedSharding(mesh, PartitionSpec(*sharding.spec[1:2])))

    if state.base is None:
        trained = param_shardings
        base = None
    else:
        trained = jax.tree.map(lambda _: replicated, state.params)
        base = jax.tree.map(base_sharding, param_shardings, state.base,
                            is_leaf=lambda x: isinstance(x, NamedSharding))
    critic = critic_opt = None
    if state.critic is not None:
        critic = critic_lib.critic_shardings(param_shardings, mesh)
        critic_opt = optimizer_shardings(critic_optimizer, state.critic_opt_state, critic)
    return TrainState(trained, optimizer_shardings(optimizer, state.opt_state, trained), critic, critic_opt,
                      base)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the jitted batch preparation and train step need to know of the run (static)."""

    group_size: int
    temperature: float
    max_new_tokens: int
    vocab_limit: int  # the sampler's (0: the whole vocabulary): the trained distribution is the sampled one
    loss: LossConfig
    updates: UpdateConfig
    advantages: AdvantageConfig
    ppo: critic_lib.PPOConfig | None = None  # None: GRPO
    mask_truncated: bool = False
    lora: lora_lib.LoRAConfig | None = None  # None: every param is trained

    @property
    def parts(self) -> int:
        return self.updates.num_minibatches * self.updates.grad_accum_steps

    @property
    def needs_old_logprobs(self) -> bool:
        return self.updates.mu > 1 or bool(self.ppo and self.ppo.kl_in_reward and self.loss.beta)


def prepare_batch(state: TrainState, ref_params: nnx.State | None, batch: dict[str, jax.Array], *,
                  graphdef: nnx.GraphDef, options: StepOptions) -> dict[str, jax.Array]:
    """A rollout's batch (prompt/completion tokens and masks, sample_logprobs, rewards `[B]`, truncated
    `[B]`) -> the train step's: advantages, and ref_logprobs / old_logprobs / PPO's values and returns when
    the run needs them. Pure; the trainer jits it."""
    o = options
    batch = dict(batch)
    rewards, truncated = batch.pop("rewards"), batch.pop("truncated")
    if o.mask_truncated:
        batch["completion_mask"] = batch["completion_mask"] & ~truncated[:, None]

    def logprobs(params):
        return batch_logprobs(params, graphdef, batch, group_size=o.group_size, parts=o.parts,
                              temperature=o.temperature, chunk_size=o.updates.logprob_chunk_size,
                              vocab_limit=o.vocab_limit)

    if o.loss.beta:  # under LoRA the reference is the base, the adapters off (QLoRA: dequantized)
        reference = lora_lib.dequantize(state.base) if o.lora is not None else ref_params
        batch["ref_logprobs"] = logprobs(reference)
    if o.needs_old_logprobs:
        batch["old_logprobs"] = logprobs(policy_params(state.params, state.base, o))
    if o.ppo is None:
        a = o.advantages
        batch["advantages"] = advantages_lib.group_advantages(rewards, o.group_size, estimator=a.estimator,
                                                              scale=a.scale, eps=a.eps)
    else:
        batch.update(critic_lib.ppo_targets(state.critic, graphdef, {**batch, "scores": rewards}, o.ppo,
                                            beta=o.loss.beta, kl_estimator=o.loss.kl_estimator,
                                            group_size=o.group_size, parts=o.parts))
    return batch


def minibatch(batch: dict[str, jax.Array], key: jax.Array, index: jax.Array, *, options: StepOptions
              ) -> dict[str, jax.Array]:
    """Minibatch `index` (of mu * num_minibatches) of whole groups: epoch index // num_minibatches draws its
    own permutation of the prompts. Pure; jitted by the trainer, so nothing leaves the device."""
    k, g = options.updates.num_minibatches, options.group_size
    num_prompts = batch["prompt_tokens"].shape[0]
    per = num_prompts // k
    order = jax.random.permutation(jax.random.fold_in(key, index // k), num_prompts)
    prompts = jnp.sort(jax.lax.dynamic_slice(order, ((index % k) * per,), (per,)))
    rows = (prompts[:, None] * g + jnp.arange(g)).reshape(-1)
    return {name: x[prompts] if name.startswith("prompt_") else x[rows] for name, x in batch.items()}


def _objective(trained, base, graphdef, batch, loss_fn: LossFn, options: StepOptions):
    """The loss of one microbatch: the policy loss (+ entropy bonus), + the critic's value loss for PPO.
    `trained`: the policy's params (and the critic's), or under LoRA the adapters merged into `base`."""
    o = options
    params, critic = trained if o.ppo is not None else (trained, None)
    params = policy_params(params, base, o)
    entropy_coef = o.loss.entropy_coef
    out = completion_logprobs(nnx.merge(graphdef, params), batch["prompt_tokens"], batch["prompt_mask"],
                              batch["completion_tokens"], batch["completion_mask"], temperature=o.temperature,
                              chunk_size=o.updates.logprob_chunk_size, return_entropy=bool(entropy_coef),
                              vocab_limit=o.vocab_limit, sequence_mask=sequence_mask(batch))
    logprobs, entropy = out if entropy_coef else (out, None)
    mask = batch["completion_mask"]
    old = batch["old_logprobs"] if o.updates.mu > 1 else jax.lax.stop_gradient(logprobs)
    extra, correction_metrics = {}, {}
    if o.loss.rollout_correction != "none":  # the sampler's tokens, weighted by pi_old / pi_sampler
        extra["token_weights"], correction_metrics = losses.rollout_correction(
            old, batch["sample_logprobs"], mask, mode=o.loss.rollout_correction, cap=o.loss.correction_cap)
    loss, metrics = loss_fn(logprobs, old, batch["advantages"], mask, ref_logprobs=batch.get("ref_logprobs"),
                            **extra)
    metrics.update(correction_metrics)
    if entropy is not None:
        max_length = o.max_new_tokens if o.loss.aggregation == "seq-mean-token-sum-norm" else None
        mean_entropy = losses.aggregate_loss(entropy, mask, o.loss.aggregation, max_length)
        loss = loss - entropy_coef * mean_entropy
        metrics["entropy"] = mean_entropy
    if critic is not None:  # the policy and the critic share no params: one loss, two disjoint gradients
        value_loss, value_metrics = critic_lib.critic_loss(critic, graphdef, batch, o.ppo,
                                                           aggregation=o.loss.aggregation)
        loss = loss + value_loss
        metrics.update(value_metrics)
    # The rollout/training mismatch (meaningful on the iteration's first update, before params move).
    mismatch = losses.kl_divergence(batch["sample_logprobs"], logprobs, "k3")  # KL(sampler || trainer)
    metrics["rollout_kl"] = jnp.where(mask, mismatch, 0.0).sum() / jnp.maximum(mask.sum(), 1)
    difference = jnp.abs(logprobs - batch["sample_logprobs"])
    metrics["rollout_logprob_diff_max"] = jnp.where(mask, difference, 0.0).max()
    metrics["loss"] = loss
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, loss_fn: LossFn, options: StepOptions,
               critic_optimizer: optax.GradientTransformation | None = None) -> tuple[TrainState, dict]:
    """One optimizer update on a minibatch: `(state, batch) -> (state, metrics)`, pure.

    The minibatch holds `n` prompts and their n * G completions; it is split into `grad_accum_steps`
    microbatches of whole groups. Each microbatch's gradient is weighted by its share of the aggregation's
    denominator (tokens for token-mean, non-empty rows otherwise), so the update is that of the whole
    minibatch at once, whatever the split. With PPO the critic is fitted in the same pass, by
    `critic_optimizer`. Metrics named `*_max` / `*_min` are extrema over the microbatches, the others
    weighted means.
    """
    o = options
    trained = (state.params, state.critic) if o.ppo is not None else state.params
    micro = split_batch(batch, o.updates.grad_accum_steps, o.group_size)
    denominators = jax.vmap(functools.partial(losses.aggregation_denominator, mode=o.loss.aggregation))(
        micro["completion_mask"])  # [steps]
    weights = denominators / jnp.maximum(denominators.sum(), 1.0)
    grad_fn = jax.value_and_grad(_objective, has_aux=True)

    def accumulate(grads_sum, inputs):
        part, weight = inputs
        (_, metrics), grads = grad_fn(trained, state.base, graphdef, part, loss_fn, o)
        return jax.tree.map(lambda a, g: a + weight * g.astype(jnp.float32), grads_sum, grads), metrics

    # Summed in float32 whatever the params' dtype (bfloat16 params give bfloat16 gradients), then cast back.
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trained)
    grads, metrics = jax.lax.scan(accumulate, zeros, (micro, weights))
    grads = jax.tree.map(lambda g, x: g.astype(x.dtype), grads, trained)
    reduce = {"_max": jnp.max, "_min": jnp.min}
    metrics = {k: reduce.get(k[-4:], lambda m: jnp.sum(m * weights))(m) for k, m in metrics.items()}
    grads, critic_grads = grads if o.ppo is not None else (grads, None)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["skipped_updates"] = opt_state.total_notfinite.astype(jnp.float32)
    critic, critic_opt_state = state.critic, state.critic_opt_state
    if critic_grads is not None:
        updates, critic_opt_state = critic_optimizer.update(critic_grads, critic_opt_state, critic)
        critic = optax.apply_updates(critic, updates)
        metrics["critic_grad_norm"] = optax.tree.norm(critic_grads)
    return TrainState(params, opt_state, critic, critic_opt_state, state.base), metrics


def tree_bytes(tree) -> int:
    """Bytes of the arrays in a pytree (0 for None)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def compiled_memory(jitted: Callable, *args) -> dict[str, int]:
    """XLA's compiled memory of `jitted(*args)` (`memory_analysis()`, on the arguments' shapes and
    shardings), in bytes; peak = arguments + outputs + temporaries - the donated (aliased) inputs."""
    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    a = jitted.lower(*jax.tree.map(abstract, args)).compile().memory_analysis()
    out = dict(arguments=a.argument_size_in_bytes, outputs=a.output_size_in_bytes,
               temporaries=a.temp_size_in_bytes, aliased=a.alias_size_in_bytes)
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out
