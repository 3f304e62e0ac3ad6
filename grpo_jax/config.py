"""A run's configuration: one frozen section per stage, each validated where it is defined, composed here.

  config.sampling    SamplingConfig   (grpo_jax.sampling)  G, completion length, temperature, filters
  config.rollout     RolloutConfig    (grpo_jax.rollout)   N prompts, DAPO dynamic sampling / overlong
  config.advantages  AdvantageConfig  (grpo_jax.update)    group-relative estimator
  config.loss        LossConfig       (grpo_jax.update)    policy loss options, KL, entropy bonus
  config.optimizer   OptimizerConfig  (grpo_jax.update)    AdamW, schedule, clipping
  config.updates     UpdateConfig     (grpo_jax.update)    mu, minibatches, gradient accumulation
  config.ppo         PPOConfig        (grpo_jax.critic)    the critic and GAE of algo="ppo"
  config.env         EnvConfig        (grpo_jax.environments)  multi-turn episodes: turns, observations

`GRPOConfig.from_dict` builds it from the nested sections of an ml_collections config (or dicts); every
field is reachable as `--config.<section>.<field>`. `GRPOConfig` checks what needs two sections at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from grpo_jax import critic as critic_lib
from grpo_jax import rollout as rollout_lib
from grpo_jax._validation import check_fields, check_option
from grpo_jax.environments import EnvConfig
from grpo_jax.lora import LoRAConfig
from grpo_jax.sampling import SamplingConfig
from grpo_jax.update import (
    AdvantageConfig,
    LossConfig,
    LossFn,
    OptimizerConfig,
    StepOptions,
    UpdateConfig,
)

ALGOS = ("grpo", "ppo")
SECTIONS = {"sampling": SamplingConfig, "rollout": rollout_lib.RolloutConfig, "advantages": AdvantageConfig,
            "loss": LossConfig, "optimizer": OptimizerConfig, "updates": UpdateConfig,
            "ppo": critic_lib.PPOConfig, "lora": LoRAConfig, "env": EnvConfig}


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """A run's settings besides the model, data and reward: one section per stage (`config.<section>`)."""

    sampling: SamplingConfig = dataclasses.field(
        default_factory=lambda: SamplingConfig(max_new_tokens=128, group_size=8))
    rollout: rollout_lib.RolloutConfig = dataclasses.field(default_factory=rollout_lib.RolloutConfig)
    advantages: AdvantageConfig = dataclasses.field(default_factory=AdvantageConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    updates: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)
    ppo: critic_lib.PPOConfig = dataclasses.field(default_factory=critic_lib.PPOConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    algo: str = "grpo"  # or "ppo": a learned critic and GAE instead of group statistics
    num_steps: int = 1000  # iterations; the learning-rate schedule spans them
    seed: int = 0

    def __post_init__(self):
        check_option("config.algo", self.algo, ALGOS)
        s, r = self.sampling, self.rollout
        check_fields("config", [("num_steps", self.num_steps, self.num_steps >= 1, "must be >= 1")])
        self.updates.check_divides(r.num_prompts)
        check_fields("config.sampling", [
            ("temperature", s.temperature, s.temperature > 0, "must be > 0 to train: at 0 (greedy) a "
             "prompt's completions are identical, so no group ever carries signal"),
            ("group_size", s.group_size, s.group_size >= 2 or self.algo == "ppo",
             "must be >= 2 for GRPO: the advantage is a reward relative to its group"),
        ])
        check_fields("config.rollout", [
            ("overlong_buffer", r.overlong_buffer, r.overlong_buffer < s.max_new_tokens,
             f"must be < config.sampling.max_new_tokens={s.max_new_tokens}")])
        check_fields("config.env", [
            ("max_turns", self.env.max_turns, not self.env.multi_turn or self.algo == "grpo",
             "> 1 needs config.algo='grpo' (PPO's critic and GAE over observation tokens are not built)"),
            ("max_turns", self.env.max_turns, not self.env.multi_turn or not r.overlong_buffer,
             "> 1 needs config.rollout.overlong_buffer=0 (the overlong penalty is of one completion)"),
        ])
        check_fields("config.ppo", [
            ("kl_in_reward", self.ppo.kl_in_reward, not self.ppo.kl_in_reward or self.algo == "ppo",
             "needs config.algo='ppo'")])
        check_fields("config.lora", [
            ("rank", self.lora.rank, not self.lora.enabled or self.algo == "grpo",
             "needs config.algo='grpo' (PPO's critic is a full copy of the policy; use rank=0)"),
            ("rank", self.lora.rank, not self.lora.enabled or not self.updates.ref_update_every,
             "with config.updates.ref_update_every: under LoRA the reference is the frozen base, which "
             "is never reset; use ref_update_every=0"),
        ])

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GRPOConfig:
        """From a nested mapping (an ml_collections config or dicts): each section a mapping of its fields."""
        fields = dict(values)
        for name, section in SECTIONS.items():
            if name not in fields:
                continue  # the section's default
            given = dict(fields[name])
            known = {f.name for f in dataclasses.fields(section)}
            unknown = sorted(set(given) - known)
            if unknown:
                raise ValueError(f"config.{name} has no field(s) {unknown}; its fields are {sorted(known)}.")
            fields[name] = section(**given)
        return cls(**fields)

    def step_options(self) -> StepOptions:
        return StepOptions(group_size=self.sampling.group_size, temperature=self.sampling.temperature,
                           max_new_tokens=self.completion_tokens(),
                           vocab_limit=self.sampling.vocab_limit, loss=self.loss, updates=self.updates,
                           advantages=self.advantages, ppo=self.ppo if self.algo == "ppo" else None,
                           mask_truncated=self.rollout.mask_truncated,
                           lora=self.lora if self.lora.enabled else None)

    def completion_tokens(self) -> int:
        """The width of a rollout's completions: max_new_tokens, or a multi-turn episode's whole width."""
        if self.env.multi_turn:
            return self.env.episode_tokens(self.sampling.max_new_tokens)
        return self.sampling.max_new_tokens

    def optimizer_updates(self) -> int:
        return self.num_steps * self.updates.mu * self.updates.num_minibatches

    def default_loss(self) -> LossFn:
        # PPO may pay the KL in the reward instead of the loss.
        beta = 0.0 if self.algo == "ppo" and self.ppo.kl_in_reward else None
        return self.loss.policy_loss(self.completion_tokens(), beta=beta)


def flatten(tree: Any, prefix: str = "config") -> dict[str, Any]:
    """`{"loss": {"beta": 0.0}}` -> `{"config.loss.beta": 0.0}`: the paths a user types."""
    if isinstance(tree, Mapping):
        return {k: v for name, sub in tree.items() for k, v in flatten(sub, f"{prefix}.{name}").items()}
    return {prefix: tree}


# Set from the tokenizer by the experiment, not by the user.
TOKENIZER_FIELDS = ("stop_tokens", "pad_id", "vocab_limit")


def config_sections(**overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Every section of `GRPOConfig` as an ml_collections ConfigDict, each field at its default unless
    `overrides[section]` sets it, so an experiment's config file names only what it changes and every
    option stays reachable as `--config.<section>.<field>` (fields that default to None are typed
    placeholders). The sampler's tokenizer fields are left out: the experiment sets them."""
    unknown = sorted(set(overrides) - set(SECTIONS))
    if unknown:
        raise ValueError(f"config sections {unknown} do not exist; the sections are {sorted(SECTIONS)}.")
    config = ml_collections.ConfigDict()
    for name, section in SECTIONS.items():
        values = {}
        for f in dataclasses.fields(section):
            if f.name in TOKENIZER_FIELDS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            values[f.name] = (ml_collections.config_dict.placeholder(float) if default is None
                              and "float" in str(f.type) else default)
        given = dict(overrides.get(name, {}))
        unknown = sorted(set(given) - set(values))
        if unknown:
            raise ValueError(f"config.{name} has no field(s) {unknown}; its fields are {sorted(values)}.")
        config[name] = ml_collections.ConfigDict(values)
        for key, value in given.items():
            config[name][key] = value
    return config
