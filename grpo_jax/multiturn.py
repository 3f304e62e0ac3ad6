"""Multi-turn episodes, token in and token out: the policy acts, an environment answers, over several turns.

An episode is one token sequence after its prompt: turn 1, observation 1, turn 2, ... Each turn is sampled
by the jit-compiled sampler with the episode so far as its prompt (prefilled once per turn); the sampled
ids are kept exactly as sampled, and only the environment's observations are encoded (`Observations`), so
the sequence trained on is the sequence sampled, whatever the tokenizer's encode(decode(ids)) gives. The
result is a `SampleOutput` whose `mask` marks the policy's tokens (loss, KL, advantages) and whose
`sequence_mask` marks every token the model reads, observations included.

  Turn 1 samples G episodes per prompt with the prompt shared by its group, as single-turn sampling does.
  Later turns sample only the episodes still running: an episode that ended costs no more decode steps.
  Their number is rounded up to a power of two (times the mesh's data shards) and the episodes to a
  prompt-length bucket, so a run compiles a bounded number of shapes.

Rewards: the episode's reward is the sum of its turns' rewards (`Environment.step`), or what
`reward_fn(examples, episodes)` returns from the `Episode` records (per-turn rewards, texts, metrics).

The environments run on the host, in the process's own thread (the rollout thread under the one_step_off
pipeline). In a multi-process run every process steps every episode's environment on the same gathered
turns, so environments must be deterministic there (a tool that times out on one process and not on
another would make their episodes differ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo_jax import sharding as sharding_lib
from grpo_jax.environments import EnvConfig, Environment, Observations
from grpo_jax.models.transformer import Transformer
from grpo_jax.sampling import DEFAULT_BUCKETS, SampleOutput, SamplingConfig, fold_key, sample
from grpo_jax.tokenizers import Tokenizer


@dataclasses.dataclass
class Episode:
    """One episode on the host: its ids after the prompt and which of them the policy sampled."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    policy: list[bool] = dataclasses.field(default_factory=list)  # per token: sampled by the policy
    logprobs: list[float] = dataclasses.field(default_factory=list)  # the sampler's (0 on observations)
    turns: list[str] = dataclasses.field(default_factory=list)  # each turn's text
    turn_lengths: list[int] = dataclasses.field(default_factory=list)  # each turn's sampled tokens
    observations: list[str] = dataclasses.field(default_factory=list)
    turn_rewards: list[float] = dataclasses.field(default_factory=list)
    truncated: bool = False  # the last turn reached max_new_tokens without a stop token
    observations_cut: int = 0  # observations shortened to config.env.max_observation_tokens
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # Environment.metrics()

    def add(self, ids: Sequence[int], policy: bool, logprobs: Sequence[float] | None = None) -> None:
        self.tokens += list(ids)
        self.policy += [policy] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)


EpisodeRewardFn = Callable[[Sequence[Mapping[str, Any]], Sequence[Episode]], Any]


def row_bucket(rows: int, total: int, shards: int = 1) -> int:
    """The number of rows a later turn samples for `rows` running episodes of `total`: the smallest
    power of two times `shards` that holds them, at most `total` (a multiple of `shards`)."""
    bucket = shards
    while bucket < rows:
        bucket *= 2
    return min(bucket, total)


def turn_buckets(sampling: SamplingConfig, longest: int) -> tuple[int, ...]:
    """Prompt-length buckets of later turns: the sampler's, then the default ones, up to `longest` (the
    longest prompt a last turn can have), which is the last bucket."""
    return tuple(sorted({*(b for b in (*sampling.buckets, *DEFAULT_BUCKETS) if b < longest), longest}))


@dataclasses.dataclass
class EpisodeSampler:
    """Samples multi-turn episodes of a new `make_env()` environment each, with `tokenizer` to read turns
    and write observations. `reward_fn(examples, episodes)` (optional) gives the episodes' rewards `[B]`
    (or `(rewards, metrics)`); by default each episode's reward is the sum of its turn rewards."""

    make_env: Callable[[], Environment]
    tokenizer: Tokenizer
    reward_fn: EpisodeRewardFn | None = None

    def sample(self, model: Transformer, examples: Sequence[Mapping[str, Any]], key: jax.Array,
               sampling: SamplingConfig, env: EnvConfig, *, mesh: Mesh | None = None
               ) -> tuple[SampleOutput, np.ndarray, dict[str, Any], list[Episode]]:
        """G episodes for each example (`example["prompt_tokens"]`): (the episodes as the trainer's
        `SampleOutput` `[B, env.episode_tokens(max_new_tokens)]`, rewards `[B]`, reward metrics, the
        `Episode` records). Turn t samples with `jax.random.fold_in(key, t)`."""
        g, n = sampling.group_size, len(examples)
        b, width = n * g, env.episode_tokens(sampling.max_new_tokens)
        observe = Observations(self.tokenizer, env.observation_template, env.max_observation_tokens)
        envs = [self.make_env() for _ in range(b)]
        prompts = []
        for i, example in enumerate(examples):
            openings = {envs[r].reset(example) for r in range(i * g, (i + 1) * g)}
            if len(openings) != 1:
                raise ValueError("Environment.reset returned different openings for the episodes of one "
                                 "example; an opening must depend on the example alone.")
            opening = openings.pop()
            prompts.append(list(example["prompt_tokens"]) + ([] if opening is None else observe(opening)))
        episodes = [Episode() for _ in range(b)]
        shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES
                                                     if a in mesh.axis_names]))
        running, first = list(range(b)), None
        for turn in range(env.max_turns):
            turn_key = fold_key(key, turn)
            if turn == 0:
                out = first = sample(model, prompts, turn_key, sampling, mesh=mesh)
                rows = running
            else:
                rows = running + [running[0]] * (row_bucket(len(running), b, shards) - len(running))
                # The same buckets for every batch (they are part of the compiled sampler's static config).
                longest = max(sampling.buckets) + width - sampling.max_new_tokens
                cfg = dataclasses.replace(sampling, group_size=1, buckets=turn_buckets(sampling, longest))
                out = sample(model, [prompts[r // g] + episodes[r].tokens for r in rows], turn_key, cfg,
                             mesh=mesh)
            tokens, mask = sharding_lib.to_host(out.tokens), sharding_lib.to_host(out.mask)
            logprobs, truncated = sharding_lib.to_host(out.logprobs), sharding_lib.to_host(out.truncated)
            still = []
            for j, r in enumerate(running):
                episode, ids = episodes[r], tokens[j][mask[j]].tolist()
                episode.add(ids, True, logprobs[j][mask[j]].tolist())
                text = self.tokenizer.decode(ids)
                observation, reward, done = _checked_step(envs[r], text, turn)
                episode.turns.append(text)
                episode.turn_lengths.append(len(ids))
                episode.turn_rewards.append(reward)
                episode.truncated = bool(truncated[j])
                if done or episode.truncated or turn + 1 == env.max_turns:
                    continue
                episode.observations.append(observation)
                ids, cut = observe.encode(observation)
                episode.add(ids, False)
                episode.observations_cut += cut
                still.append(r)
            running = still
            if not running:
                break
        for episode, environment in zip(episodes, envs, strict=True):
            metrics = getattr(environment, "metrics", None)
            episode.metrics = {k: float(v) for k, v in (metrics() if metrics else {}).items()}
        output = self._arrays(episodes, first, width, sampling.pad_id, mesh)
        rewards, metrics = self._rewards(examples, episodes, g)
        return output, rewards, metrics, episodes

    def _arrays(self, episodes: list[Episode], first: SampleOutput, width: int, pad_id: int,
                mesh: Mesh | None) -> SampleOutput:
        b = len(episodes)
        tokens = np.full((b, width), pad_id, np.int32)
        policy, sequence = np.zeros((b, width), bool), np.zeros((b, width), bool)
        logprobs = np.zeros((b, width), np.float32)
        for r, e in enumerate(episodes):
            tokens[r, :len(e.tokens)] = e.tokens
            policy[r, :len(e.policy)] = e.policy
            sequence[r, :len(e.tokens)] = True
            logprobs[r, :len(e.logprobs)] = e.logprobs
        host = dict(tokens=tokens, mask=policy, lengths=policy.sum(1).astype(np.int32),
                    truncated=np.array([e.truncated for e in episodes]), logprobs=logprobs,
                    sequence_mask=sequence)
        if mesh is None:
            arrays = {k: jnp.asarray(v) for k, v in host.items()}
        else:
            arrays = {k: sharding_lib.put_global(v, sharding_lib.batch_sharding(mesh, v.ndim))
                      for k, v in host.items()}
        return SampleOutput(**arrays, prompt_tokens=first.prompt_tokens, prompt_mask=first.prompt_mask)

    def _rewards(self, examples, episodes: list[Episode], g: int) -> tuple[np.ndarray, dict[str, Any]]:
        per_row = {name: np.array([e.metrics.get(name, 0.0) for e in episodes], np.float64)
                   for name in sorted({k for e in episodes for k in e.metrics})}
        per_row["turns"] = np.array([len(e.turns) for e in episodes], np.float64)
        per_row["observations_cut"] = np.array([e.observations_cut for e in episodes], np.float64)
        if self.reward_fn is None:
            return np.array([sum(e.turn_rewards) for e in episodes], np.float32), per_row
        result = self.reward_fn([e for e in examples for _ in range(g)], episodes)
        rewards, metrics = result if isinstance(result, tuple) else (result, {})
        rewards = np.asarray(rewards, np.float32)
        if rewards.shape != (len(episodes),):
            raise ValueError(f"the episode reward_fn returned shape {rewards.shape}; expected "
                             f"({len(episodes)},), one reward per episode.")
        return rewards, {**per_row, **metrics}


def _checked_step(environment: Environment, text: str, turn: int) -> tuple[str | None, float, bool]:
    """`environment.step(text)`, its result checked: (observation, finite reward, done)."""
    result = environment.step(text)
    if not (isinstance(result, tuple) and len(result) == 3):
        raise ValueError(f"{type(environment).__name__}.step must return (observation, reward, done); "
                         f"turn {turn + 1} returned {result!r:.200}.")
    observation, reward, done = result
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        reward = float("nan")
    if not np.isfinite(reward):
        raise ValueError(f"{type(environment).__name__}.step returned the reward {result[1]!r:.100} on turn "
                         f"{turn + 1}; a reward is a finite number.")
    if not done and not isinstance(observation, str):
        raise ValueError(f"{type(environment).__name__}.step returned the observation {observation!r:.100} "
                         f"for an episode that is not done (turn {turn + 1}); return text, or done=True.")
    return observation, reward, bool(done)


def evaluate_episodes(model: Transformer, examples: Sequence[Mapping[str, Any]], sampler: EpisodeSampler,
                      sampling: SamplingConfig, env: EnvConfig, *, batch_prompts: int = 256,
                      key: jax.Array | None = None) -> dict[str, float]:
    """Greedy episodes (`sampling` at temperature 0, one per example) in batches of `batch_prompts`: the
    mean reward and the means of the environments' metrics (e.g. accuracy, tool_calls) over `examples`.
    `tool_call_rate` is the share of episodes with at least one tool call, when the environment counts
    them."""
    greedy = dataclasses.replace(sampling, temperature=0.0, group_size=1)
    key = jax.random.key(0) if key is None else key
    totals: dict[str, float] = {}
    for start in range(0, len(examples), batch_prompts):
        part = [examples[i] for i in range(start, min(start + batch_prompts, len(examples)))]
        _, rewards, metrics, _ = sampler.sample(model, part, key, greedy, env)
        totals["reward"] = totals.get("reward", 0.0) + float(rewards.sum())
        for name, values in metrics.items():
            values = np.asarray(values, np.float64)
            totals[name] = totals.get(name, 0.0) + float(values.sum())
            if name == "tool_calls":
                totals["tool_call_rate"] = totals.get("tool_call_rate", 0.0) + float((values > 0).sum())
    return {name: value / len(examples) for name, value in totals.items()}
