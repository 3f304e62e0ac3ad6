r"""The overhead of turns: GRPO iterations over multi-turn episodes against one turn of the same length.

  python experiments/benchmarks/turns.py

GRPO iterations on the benches' tiny model (8 prompts x G=8, 64-token prompts) over 4-turn episodes of an
environment that answers every turn with a 16-token observation (turns of at most 32 tokens, ending at a stop
token drawn ~10% of the time per token), against iterations sampling the same number of tokens per row (the
episodes' mean length, policy and observation tokens) as one turn without stop tokens: median seconds per
iteration and its sampling part, the decode steps each ran (a turn runs until its longest episode stops), and
the roofline limit of the one-turn work. Six untimed iterations first compile the shapes later turns use
(their row and length buckets vary).
"""

from __future__ import annotations

import statistics

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from grpo_jax import sharding
from grpo_jax.models import Transformer
from grpo_jax.multiturn import EpisodeSampler
from grpo_jax.profiling import Roofline, bench_config, bench_reward, grpo_work_flops, tiny_model_config
from grpo_jax.tokenizers import CharTokenizer
from grpo_jax.trainer import Trainer

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed iterations of each (the median is reported).")
_GRAD_ACCUM = flags.DEFINE_integer("grad_accum_steps", 8, "Microbatches per update.")


class ObservingEnv:
    """Every turn is answered with the same 8-character observation, until the episode runs out of turns."""

    def reset(self, example):
        return None

    def step(self, completion):
        return "12345678", 0.1 * (len(completion) % 3), False


def turn_lengths(policy: np.ndarray, sequence: np.ndarray) -> list[int]:
    """The lengths of the runs of policy tokens in one episode's row (its turns)."""
    policy = policy[:int(sequence.sum())].astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], policy, [0]])))  # starts and ends of the runs
    return (edges[1::2] - edges[0::2]).tolist()


def main(argv) -> None:
    del argv
    num_prompts, group_size, prompt_len, turns, turn_tokens = 8, 8, 64, 4, 32
    tokenizer = CharTokenizer()
    roofline = Roofline()
    roofline.measure()
    rng = np.random.default_rng(0)
    dataset = [{"prompt_tokens": rng.integers(4, 100, prompt_len).tolist()} for _ in range(64)]
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    multi = bench_config(
        num_prompts, group_size, prompt_len, turn_tokens, _GRAD_ACCUM.value,
        sampling=dict(stop_tokens=tuple(range(4, 14)), vocab_limit=tokenizer.vocab_size),
        env=dict(max_turns=turns, max_observation_tokens=16, observation_template="<r>{observation}</r>"))
    trainer = Trainer(Transformer(tiny_model_config(), nnx.Rngs(0)), multi, dataset, None, mesh=mesh,
                      episodes=EpisodeSampler(ObservingEnv, tokenizer), time_stages=True)
    for _ in range(6):  # compile: later turns' row and length buckets vary between iterations
        trainer.iteration()
    multi_runs, lengths, steps = [], [], []
    for _ in range(_REPEATS.value):
        multi_runs.append(trainer.iteration())
        sequence = sharding.to_host(trainer.last_rollout.sample.sequence_mask)
        lengths.append(sequence.sum(1).mean())
        # Each turn decodes until its longest episode stops: its decode steps are the turn's longest.
        by_turn = {}
        for row in range(sequence.shape[0]):
            for t, n in enumerate(turn_lengths(trainer.last_rollout.mask[row], sequence[row])):
                by_turn[t] = max(by_turn.get(t, 0), n)
        steps.append(sum(by_turn.values()))
    roofline.measure()
    tokens = int(round(statistics.median(lengths)))
    single = bench_config(num_prompts, group_size, prompt_len, tokens, _GRAD_ACCUM.value,
                          sampling=dict(vocab_limit=tokenizer.vocab_size))
    trainer = Trainer(Transformer(tiny_model_config(), nnx.Rngs(0)), single, dataset, bench_reward, mesh=mesh,
                      time_stages=True)
    trainer.iteration()  # compile
    single_runs = [trainer.iteration() for _ in range(_REPEATS.value)]
    roofline.measure()
    flops = sum(grpo_work_flops(trainer.model_config, num_prompts, group_size, prompt_len, tokens,
                                0.0).values())
    limit = flops / roofline.median / 1e9
    keys = ("time_sampling", "time_rewards", "time_reference", "time_update")  # each stage timed alone
    print(f"turns: tiny model, {num_prompts} prompts x G={group_size}, prompt {prompt_len}, "
          f"{jax.default_backend()}; {roofline}")
    print(f"  {turns}-turn episodes: {statistics.median(lengths):.1f} tokens per episode (median of "
          f"{len(lengths)} iterations), {statistics.median(steps):.0f} decode steps per iteration")
    for name, runs in ((f"{turns} turns", multi_runs), (f"1 turn of {tokens} tokens", single_runs)):
        total = statistics.median(sum(r[k] for k in keys) for r in runs)
        sampling_time = statistics.median(r["time_sampling"] for r in runs)
        print(f"  {name}: {total:.3f} s/iteration (median of {len(runs)}), sampling {sampling_time:.3f} s, "
              f"update {statistics.median(r['time_update'] for r in runs):.3f} s; {total / limit:.2f}x the "
              f"roofline limit of the one-turn work ({flops / 1e9:.0f} GFLOP, {limit:.3f} s)")


if __name__ == "__main__":
    app.run(main)
