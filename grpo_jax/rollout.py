"""Rollout: N prompts -> G completions each -> rewards on the host, with DAPO's dynamic sampling and soft
overlong penalty.

`collect` samples with the jit-compiled group sampler and keeps its arrays on the device (the padded
prompts, the completions and the sampler's own log-probs of its tokens go to training as they are); only the
completion tokens and their mask come to the host, where the reward function reads them as token lists.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo_jax import sharding
from grpo_jax._validation import check_fields, check_option, finite
from grpo_jax.environments import EnvConfig
from grpo_jax.models.transformer import Transformer
from grpo_jax.multiturn import EpisodeSampler
from grpo_jax.rewards import overlong_penalty
from grpo_jax.sampling import SampleOutput, SamplingConfig, fold_key, sample

RewardFn = Callable[[Sequence[Any], Sequence[Sequence[int]]], Any]
PIPELINES = ("sync", "one_step_off")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """`config.rollout`: what one iteration collects (N prompts; G and the sampling are `config.sampling`)."""

    num_prompts: int = 8
    # DAPO dynamic sampling: keep only groups whose rewards differ, sampling up to max_resample_rounds more
    # rounds of num_prompts prompts to fill the batch (remaining places take groups without signal).
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    overlong_buffer: int = 0  # L_cache of DAPO eq. 13, in tokens (0: no soft overlong penalty)
    overlong_penalty: float = 1.0  # scale of that penalty
    mask_truncated: bool = False  # DAPO overlong filtering: truncated completions get no loss
    # "sync": each iteration samples, then updates. "one_step_off": the next iteration's rollout is sampled
    # (from the params before this update) while this update runs, so each update trains on a rollout one
    # step stale; pair it with config.loss.rollout_correction. See `Trainer.iteration`.
    pipeline: str = "sync"

    def __post_init__(self):
        check_option("config.rollout.pipeline", self.pipeline, PIPELINES)
        check_fields("config.rollout", [
            ("num_prompts", self.num_prompts, self.num_prompts >= 1, "must be >= 1"),
            ("max_resample_rounds", self.max_resample_rounds, self.max_resample_rounds >= 0, "must be >= 0"),
            ("overlong_buffer", self.overlong_buffer, self.overlong_buffer >= 0,
             "must be >= 0 (0: no soft overlong penalty)"),
            ("overlong_penalty", self.overlong_penalty,
             finite(self.overlong_penalty) and self.overlong_penalty >= 0, "must be a finite number >= 0"),
        ])


class Rollout(NamedTuple):
    """N groups of G scored completions (B = N * G rows, a prompt's G rows contiguous)."""

    examples: list[dict]  # [N] the prompts' examples
    sample: SampleOutput  # on the device: prompts [N, P], completions, masks, sampler log-probs [B, T]
    tokens: np.ndarray  # [B, T] host copy of the completion tokens
    mask: np.ndarray  # [B, T] host copy of the completion mask
    truncated: np.ndarray  # [B] no stop token within max_new_tokens
    rewards: np.ndarray  # [B] float32: the reward function's, plus the overlong penalty
    task_rewards: np.ndarray  # [B] float32: the reward function's alone
    reward_metrics: dict[str, float]
    resample_rounds: int
    prompts_sampled: int
    time_sampling: float
    time_rewards: float


def score(reward_fn: RewardFn, examples: Sequence[dict], tokens: np.ndarray, mask: np.ndarray,
          group_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Call `reward_fn(examples repeated G times, completion token lists)`: rewards `[B]` and its metrics."""
    completions = [row[m].tolist() for row, m in zip(tokens, mask, strict=True)]
    result = reward_fn([e for e in examples for _ in range(group_size)], completions)
    rewards, metrics = result if isinstance(result, tuple) else (result, {})
    rewards = np.asarray(rewards, np.float32)
    if rewards.shape != (len(completions),):
        raise ValueError(f"reward_fn returned shape {rewards.shape}; expected ({len(completions)},), one "
                         "reward per completion.")
    return rewards, metrics


def has_signal(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """`[N]` bool on the host: the group has >= 2 finite rewards that differ (so it carries a gradient)."""
    grouped = rewards.reshape(-1, group_size)
    finite = np.isfinite(grouped)
    return np.where(finite, grouped, -np.inf).max(1) > np.where(finite, grouped, np.inf).min(1)


@jax.jit
def _select_groups(samples: tuple[SampleOutput, ...], groups: jax.Array, pad_id: jax.Array) -> SampleOutput:
    """The chosen groups (indices into the rounds' concatenated prompts) of several sampling rounds, their
    prompts left-padded to the widest round's bucket."""
    width = max(s.prompt_tokens.shape[1] for s in samples)
    group_size = samples[0].tokens.shape[0] // samples[0].prompt_tokens.shape[0]

    def left_pad(x, value):
        return jnp.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)

    rows = (groups[:, None] * group_size + jnp.arange(group_size)).reshape(-1)
    names = ("tokens", "mask", "lengths", "truncated", "logprobs")
    names += ("sequence_mask",) if samples[0].sequence_mask is not None else ()
    fields = {name: jnp.concatenate([getattr(s, name) for s in samples])[rows] for name in names}
    prompts = jnp.concatenate([left_pad(s.prompt_tokens, pad_id) for s in samples])[groups]
    prompt_mask = jnp.concatenate([left_pad(s.prompt_mask, False) for s in samples])[groups]
    return SampleOutput(**fields, prompt_tokens=prompts, prompt_mask=prompt_mask)


def rollout_examples(cfg: RolloutConfig) -> int:
    """How many examples `collect` may read: N per sampling round (1 + max_resample_rounds rounds with
    dynamic sampling)."""
    return cfg.num_prompts * (1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0))


def collect(model: Transformer, examples: Sequence[dict], key: jax.Array, sampling: SamplingConfig,
            cfg: RolloutConfig, reward_fn: RewardFn | None, *, mesh: Mesh | None = None,
            episodes: EpisodeSampler | None = None, env: EnvConfig | None = None) -> Rollout:
    """Sample G completions for each of the first `cfg.num_prompts` (N) `examples` and score them.

    Round r samples examples[r * N:(r + 1) * N] with `jax.random.fold_in(key, r)`. With
    `cfg.dynamic_sampling`, groups whose rewards are all equal are dropped and further rounds are sampled
    until N groups carry signal (or `cfg.max_resample_rounds` more rounds were sampled, or `examples` has no
    N more; the remaining places then take groups without signal, which get advantage 0): pass
    `rollout_examples(cfg)` examples. `Rollout.prompts_sampled` says how many were read. Per-completion
    reward metrics are those of the kept groups; per-call ones (e.g. error counts) add up over the rounds.

    With `episodes` (and `env`, `config.env`), each completion is a multi-turn episode of
    `episodes.make_env()` (`grpo_jax.multiturn`), rewarded by its environment; `reward_fn` is not used.
    """
    g, n = sampling.group_size, cfg.num_prompts
    if len(examples) < n:
        raise ValueError(f"collect got {len(examples)} examples for config.rollout.num_prompts={n}; pass "
                         "at least that many (rollout_examples(config.rollout) with dynamic sampling).")
    rounds = min(rollout_examples(cfg), len(examples)) // n
    samples, sampled, host, call_metrics = [], [], [], {}
    time_sampling = time_rewards = 0.0
    for round_index in range(rounds):
        start = time.perf_counter()
        round_examples = list(examples[round_index * n:(round_index + 1) * n])
        key_r = fold_key(key, round_index)
        if episodes is not None:  # the environments reward the episodes while they are sampled
            if env is None:
                raise ValueError("collect(episodes=...) needs env=, the run's config.env.")
            out, rewards, metrics, _ = episodes.sample(model, round_examples, key_r, sampling, env,
                                                       mesh=mesh)
            tokens, mask = sharding.to_host(out.tokens), sharding.to_host(out.mask)
            time_sampling += time.perf_counter() - start
            start = time.perf_counter()
        else:
            out = sample(model, [e["prompt_tokens"] for e in round_examples], key_r, sampling, mesh=mesh)
            tokens, mask = sharding.to_host(out.tokens), sharding.to_host(out.mask)  # what the reward reads
            time_sampling += time.perf_counter() - start
            start = time.perf_counter()
            rewards, metrics = score(reward_fn, round_examples, tokens, mask, g)
        per_row = {k: np.asarray(v, np.float64) for k, v in metrics.items() if np.shape(v) == rewards.shape}
        for k, v in metrics.items():
            if k not in per_row:
                call_metrics[k] = call_metrics.get(k, 0.0) + float(np.sum(v))
        time_rewards += time.perf_counter() - start
        samples.append(out)
        sampled += round_examples
        host.append(dict(tokens=tokens, mask=mask, rewards=rewards, per_row=per_row,
                         truncated=sharding.to_host(out.truncated)))
        signal = np.concatenate([has_signal(h["rewards"], g) for h in host])
        if not cfg.dynamic_sampling or signal.sum() >= n:
            break
    if len(samples) == 1:
        chosen = np.arange(n)
        selected = samples[0]
    else:  # informative groups first, in sampling order, then groups without signal
        chosen = np.concatenate([np.flatnonzero(signal), np.flatnonzero(~signal)])[:n]
        selected = _select_groups(tuple(samples), jax.device_put(chosen.astype(np.int32)),
                                  jax.device_put(np.int32(sampling.pad_id)))
    rows = (chosen[:, None] * g + np.arange(g)).reshape(-1)

    def kept(field):
        return np.concatenate([h[field] for h in host])[rows]

    tokens, mask, task_rewards = kept("tokens"), kept("mask"), kept("rewards")
    truncated, rewards = kept("truncated"), task_rewards
    start = time.perf_counter()
    if cfg.overlong_buffer:
        lengths = np.where(truncated, sampling.max_new_tokens + 1, mask.sum(axis=1))
        rewards = task_rewards + cfg.overlong_penalty * overlong_penalty(
            lengths, sampling.max_new_tokens, cfg.overlong_buffer)
    names = sorted({k for h in host for k in h["per_row"]})  # a round may lack a metric: 0 there
    reward_metrics = {k: float(np.mean(np.concatenate([h["per_row"].get(k, np.zeros(len(h["rewards"])))
                                                       for h in host])[rows])) for k in names}
    return Rollout(examples=[sampled[i] for i in chosen], sample=selected, tokens=tokens, mask=mask,
                   truncated=truncated, rewards=rewards, task_rewards=task_rewards,
                   reward_metrics={**reward_metrics, **call_metrics}, resample_rounds=len(samples) - 1,
                   prompts_sampled=n * len(samples), time_sampling=time_sampling,
                   time_rewards=time_rewards + time.perf_counter() - start)


def rollout_metrics(rollout: Rollout, group_size: int) -> dict[str, float]:
    """The rollout's logged statistics: rewards, groups without signal, lengths, reward metrics, times."""
    rewards, lengths = rollout.rewards, rollout.mask.sum(axis=1)
    metrics = {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "task_reward_mean": float(rollout.task_rewards.mean()),
        "zero_variance_groups": float(1.0 - has_signal(rewards, group_size).mean()),
        "completion_length_mean": float(lengths.mean()), "completion_length_max": float(lengths.max()),
        "truncated_fraction": float(rollout.truncated.mean()),
        "resample_rounds": float(rollout.resample_rounds), "prompts_sampled": float(rollout.prompts_sampled),
        **{f"reward/{k}": v for k, v in rollout.reward_metrics.items()},
        "time_sampling": rollout.time_sampling, "time_rewards": rollout.time_rewards,
    }
    if "reward/accuracy" in metrics:  # the progress line's "acc"
        metrics["accuracy"] = metrics["reward/accuracy"]
    return metrics


def sample_records(rollout: Rollout, step: int, decode: Callable[[Sequence[int]], str], *,
                   num_prompts: int = 2, per_prompt: int = 2) -> list[dict[str, Any]]:
    """A few completions as `{step, prompt, completion, reward}` records: the first `per_prompt` completions
    of each of the rollout's first `num_prompts` groups."""
    g, records = rollout.tokens.shape[0] // len(rollout.examples), []
    if rollout.sample.sequence_mask is not None:  # an episode's record holds its observations too
        sequence_masks = sharding.to_host(rollout.sample.sequence_mask)
    for i, example in enumerate(rollout.examples[:num_prompts]):
        for row in range(i * g, i * g + min(per_prompt, g)):
            prompt = example.get("prompt_text") or decode(example["prompt_tokens"])
            read = rollout.mask if rollout.sample.sequence_mask is None else sequence_masks
            records.append(dict(step=step, prompt=prompt,
                                completion=decode(rollout.tokens[row][read[row]].tolist()),
                                reward=float(rollout.rewards[row])))
    return records
