"""The rollout stage on its own (no Trainer): `rollout.collect` on a tiny model and a few int prompts, with
toy reward functions whose signal is set per example, and its host helpers `score` / `has_signal`; and
`sampling.fold_key`, the per-round key."""

import functools
from collections.abc import Sequence

import jax
import numpy as np
import pytest
from flax import nnx

from grpo_jax import rollout
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.sampling import SamplingConfig, fold_key, sample

MODEL = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, max_position_embeddings=16)
G, N = 2, 2  # group size, prompts per round
SAMPLING = SamplingConfig(max_new_tokens=4, group_size=G, stop_tokens=(1,), buckets=(8,))
KEY = jax.random.key(3)


@functools.lru_cache
def model():
    """The policy (one instance: the sampler compiles once for it)."""
    return Transformer(MODEL, nnx.Rngs(0))


def make_examples(signal):
    """One example per entry of `signal` (whether its group gets differing rewards), prompts of 2-6 ids."""
    rng = np.random.default_rng(0)
    return [{"prompt_tokens": rng.integers(2, 16, 2 + i % 5).tolist(), "id": i, "signal": s}
            for i, s in enumerate(signal)]


class Recorded(Sequence):
    """A sequence of examples that records which indices were read."""

    def __init__(self, items):
        self.items, self.read = list(items), set()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            self.read.update(range(*index.indices(len(self.items))))
        else:
            self.read.add(index % len(self.items))
        return self.items[index]


class PositionReward:
    """Reward = a completion's position in its group (0, 1, ...) for examples with signal, 1 for the
    others (a group without signal); records every call. Metrics: the rewards per row, and 1 per call."""

    def __init__(self):
        self.calls = []

    def __call__(self, examples, completions):
        self.calls.append((list(examples), [list(c) for c in completions]))
        rewards = np.array([float(i % G) if e["signal"] else 1.0 for i, e in enumerate(examples)], np.float32)
        return rewards, {"per_row": rewards, "calls": 1}


def collect(examples, reward_fn, **rollout_fields):
    cfg = rollout.RolloutConfig(num_prompts=N, **rollout_fields)
    return rollout.collect(model(), examples, KEY, SAMPLING, cfg, reward_fn)


def sampled(examples, round_index):
    """A direct `sample` of `examples` with the key of round `round_index`, on the host."""
    out = sample(model(), [e["prompt_tokens"] for e in examples], fold_key(KEY, round_index), SAMPLING)
    return out._replace(**{k: np.asarray(v) for k, v in out._asdict().items() if v is not None})


def rows(group):
    return slice(group * G, (group + 1) * G)


# ----------------------------------------------------------------------------- fold_key


@pytest.mark.parametrize("key", [jax.random.key(7), jax.random.PRNGKey(7)], ids=["typed", "raw"])
def test_fold_key_is_jax_random_fold_in_bit_for_bit(key):
    """fold_key(key, i) has the key data of jax.random.fold_in(key, i), for i from 0 to 2**31 - 1."""
    data = set()
    for i in (0, 1, 2, 7, 12345, 2**31 - 1):
        expected = jax.random.key_data(jax.random.fold_in(key, i))
        got = jax.random.key_data(fold_key(key, i))
        np.testing.assert_array_equal(got, expected)
        data.add(tuple(np.asarray(got).tolist()))
    assert len(data) == 6


# ----------------------------------------------------------------------------- has_signal / score


def test_has_signal_needs_two_finite_rewards_that_differ():
    """A group has signal iff at least two of its finite rewards differ (NaN and inf are ignored)."""
    inf, nan = np.inf, np.nan
    pairs = np.array([1, 1, 0, 1, nan, 1, nan, nan, inf, 0, -inf, inf, 0.5, -0.5], np.float32)
    np.testing.assert_array_equal(rollout.has_signal(pairs, 2),
                                  [False, True, False, False, False, False, True])
    triples = np.array([nan, 0, 1, 2, 2, 2, inf, 3, 3, nan, 4, -inf], np.float32)
    np.testing.assert_array_equal(rollout.has_signal(triples, 3), [True, False, False, False])


def test_score_passes_each_example_g_times_with_the_masked_completion_token_lists():
    """reward_fn gets every example repeated G times and each row's tokens under its mask as a list;
    (rewards, metrics) and plain rewards both come back as float32 `[B]` rewards and a metrics dict."""
    examples = [{"id": 0}, {"id": 1}]
    tokens = np.array([[5, 6, 1], [7, 0, 0], [1, 0, 0], [8, 9, 10]], np.int32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 1]], bool)
    seen = []

    def reward_fn(examples, completions):
        seen.append((examples, completions))
        return [float(len(c)) for c in completions], {"n": len(completions)}

    rewards, metrics = rollout.score(reward_fn, examples, tokens, mask, G)
    assert seen == [([examples[0], examples[0], examples[1], examples[1]], [[5, 6, 1], [7], [1], [8, 9, 10]])]
    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards, [3, 1, 1, 3])
    assert metrics == {"n": 4}
    rewards, metrics = rollout.score(lambda e, c: np.arange(4), examples, tokens, mask, G)
    np.testing.assert_array_equal(rewards, [0, 1, 2, 3])
    assert rewards.dtype == np.float32 and metrics == {}


@pytest.mark.parametrize("returned", [[0.0] * 3, [[0.0]] * 4, 1.0, [0.0] * 5],
                         ids=["short", "2d", "scalar", "long"])
def test_score_rejects_rewards_that_are_not_one_per_completion(returned):
    """A reward function returning anything but `[B]` rewards is an error that says what was expected."""
    tokens, mask = np.zeros((4, 2), np.int32), np.ones((4, 2), bool)
    with pytest.raises(ValueError, match=r"expected \(4,\), one reward per completion"):
        rollout.score(lambda e, c: returned, [{}, {}], tokens, mask, G)


# ----------------------------------------------------------------------------- collect


def test_collect_without_dynamic_sampling_reads_the_first_n_examples_and_samples_them_with_round_0s_key():
    """No dynamic sampling: only examples[:N] are read (even with more given), prompts_sampled == N, the
    completions are those of `sample(model, prompts, fold_key(key, 0))`, and the reward function got
    each example G times with the completions' token lists; its rewards are the rollout's."""
    examples = Recorded(make_examples([False, True, True, True, True, True]))
    reward_fn = PositionReward()
    out = collect(examples, reward_fn)
    assert examples.read == {0, 1}
    assert out.prompts_sampled == N and out.resample_rounds == 0
    assert [e["id"] for e in out.examples] == [0, 1]
    direct = sampled(examples.items[:N], 0)
    for name in ("tokens", "mask", "lengths", "truncated", "logprobs", "prompt_tokens", "prompt_mask"):
        np.testing.assert_array_equal(getattr(out.sample, name), getattr(direct, name), err_msg=name)
    np.testing.assert_array_equal(out.tokens, direct.tokens)
    np.testing.assert_array_equal(out.mask, direct.mask)
    np.testing.assert_array_equal(out.truncated, direct.truncated)
    ((seen_examples, completions),) = reward_fn.calls
    assert seen_examples == [e for e in examples.items[:N] for _ in range(G)]
    assert completions == [row[m].tolist() for row, m in zip(direct.tokens, direct.mask, strict=True)]
    np.testing.assert_array_equal(out.rewards, [1, 1, 0, 1])
    np.testing.assert_array_equal(out.task_rewards, out.rewards)
    assert out.reward_metrics == {"per_row": 0.75, "calls": 1.0}
    # Another round's key samples other completions: the key really is fold_key(key, 0).
    assert not np.array_equal(sampled(examples.items[:N], 1).tokens, direct.tokens)


def test_dynamic_sampling_samples_rounds_until_n_groups_have_signal_and_puts_them_first():
    """Signal in examples 1 (round 0) and 4 (round 2): three rounds are sampled (examples 0-5 read, round r
    with fold_key(key, r)), and the kept groups are 1 and 4 with their own round's completions; per-row
    metrics are those of the kept rows, per-call ones add up over the rounds."""
    examples = Recorded(make_examples([False, True, False, False, True, False, True, True]))
    cfg = rollout.RolloutConfig(num_prompts=N, dynamic_sampling=True, max_resample_rounds=3)
    assert rollout.rollout_examples(cfg) == len(examples) == 8
    reward_fn = PositionReward()
    out = collect(examples, reward_fn, dynamic_sampling=True, max_resample_rounds=3)
    assert examples.read == set(range(6))
    assert out.prompts_sampled == 6 and out.resample_rounds == 2 and len(reward_fn.calls) == 3
    assert [[e["id"] for e in call[0][::G]] for call in reward_fn.calls] == [[0, 1], [2, 3], [4, 5]]
    assert [e["id"] for e in out.examples] == [1, 4]
    for group, (round_index, position) in enumerate([(0, 1), (2, 0)]):
        direct = sampled(examples.items[round_index * N:(round_index + 1) * N], round_index)
        np.testing.assert_array_equal(out.tokens[rows(group)], direct.tokens[rows(position)])
        np.testing.assert_array_equal(out.mask[rows(group)], direct.mask[rows(position)])
        np.testing.assert_array_equal(out.sample.logprobs[rows(group)], direct.logprobs[rows(position)])
        np.testing.assert_array_equal(out.sample.prompt_tokens[group], direct.prompt_tokens[position])
    np.testing.assert_array_equal(out.sample.tokens, out.tokens)
    np.testing.assert_array_equal(out.rewards, [0, 1, 0, 1])
    assert out.reward_metrics == {"per_row": 0.5, "calls": 3.0}


def test_dynamic_sampling_fills_the_batch_with_groups_without_signal_after_the_informative_ones():
    """Signal only in example 3: all 1 + max_resample_rounds rounds are sampled, and the batch is group 3
    first, then the first group without signal (example 0)."""
    examples = Recorded(make_examples([False, False, False, True, False, False, False, False]))
    out = collect(examples, PositionReward(), dynamic_sampling=True, max_resample_rounds=3)
    assert examples.read == set(range(8))
    assert out.prompts_sampled == 8 and out.resample_rounds == 3
    assert [e["id"] for e in out.examples] == [3, 0]
    np.testing.assert_array_equal(out.rewards, [0, 1, 1, 1])
    first_round = sampled(examples.items[:N], 0)
    np.testing.assert_array_equal(out.tokens[rows(1)], first_round.tokens[rows(0)])


def test_fewer_examples_than_rollout_examples_cap_the_rounds():
    """Dynamic sampling given 5 < rollout_examples(cfg) = 8 examples and no signal anywhere: only the
    2 whole rounds those hold are sampled (examples 0-3 read)."""
    examples = Recorded(make_examples([False] * 5))
    out = collect(examples, PositionReward(), dynamic_sampling=True, max_resample_rounds=3)
    assert examples.read == set(range(4))
    assert out.prompts_sampled == 4 and out.resample_rounds == 1
    assert [e["id"] for e in out.examples] == [0, 1]


def test_fewer_examples_than_num_prompts_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"config\.rollout\.num_prompts=2"):
        collect(make_examples([True]), PositionReward())


def test_collect_rejects_a_reward_function_returning_the_wrong_shape():
    """The rollout refuses rewards that are not one per completion rather than misaligning them."""
    with pytest.raises(ValueError, match="one reward per completion"):
        collect(make_examples([True, True]), lambda examples, completions: np.zeros(len(completions) + 1))
