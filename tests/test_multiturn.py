"""Multi-turn episodes: the loss mask, token in / token out, the rollout/training mismatch across turns,
tools that fail, and the config's checks."""

import itertools
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from grpo_jax import sft
from grpo_jax.config import GRPOConfig
from grpo_jax.environments import (
    EnvConfig,
    Observations,
    Tool,
    ToolCallError,
    ToolEnv,
    calculator,
    exact_answer,
    format_tool_call,
    parse_tool_call,
    run_tool,
)
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.multiturn import EpisodeSampler, evaluate_episodes, row_bucket
from grpo_jax.policy import completion_logprobs
from grpo_jax.sampling import SamplingConfig, sample
from grpo_jax.tokenizers import CharTokenizer, load_tokenizer
from grpo_jax.trainer import Trainer

CHATML_DIR = Path(__file__).parent / "fixtures" / "hf" / "tokenizer"
MODEL = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=256)
TEMPLATE = "<r>{observation}</r>\n"
TOKENIZER = CharTokenizer()


def model(seed=0):
    return Transformer(MODEL, nnx.Rngs(seed))


# A random model's turns stop often: eos and the 20 ids after the specials (the digits and a-j) stop them.
STOPS = (1, *range(4, 24))


def sampling(group_size=4, max_new_tokens=8, **fields):
    return SamplingConfig(max_new_tokens=max_new_tokens, group_size=group_size, stop_tokens=STOPS, pad_id=0,
                          vocab_limit=TOKENIZER.vocab_size, buckets=(16,), **fields)


def examples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": "q", "answer": "1",
             "prompt_tokens": rng.integers(4, 100, rng.integers(3, 12)).tolist()} for _ in range(n)]


class RandomEnv:
    """Observations of random length and content; each turn ends the episode with probability 1/3. The
    n-th environment of a sampler (`random_envs()`) draws from seed n, whatever ran before."""

    def __init__(self, seed):
        self.seed = seed

    def reset(self, example):
        self.rng = np.random.default_rng(self.seed)

    def step(self, text):
        done = self.rng.random() < 1 / 3
        observation = "".join(self.rng.choice(list("abcXYZ0123 "), self.rng.integers(0, 30)))
        return observation, float(len(text)) / 10, done


def random_envs():
    """A factory of RandomEnvs numbered 1, 2, ... in the order the sampler makes them."""
    counter = itertools.count(1)
    return lambda: RandomEnv(next(counter))


@pytest.mark.slow
def test_the_loss_mask_is_exactly_the_policy_tokens_and_the_observations_are_read():
    env = EnvConfig(max_turns=4, max_observation_tokens=12, observation_template=TEMPLATE)
    observe = Observations(TOKENIZER, TEMPLATE, 12)
    out, rewards, _, episodes = EpisodeSampler(random_envs(), TOKENIZER).sample(
        model(), examples(6), jax.random.key(1), sampling(), env)
    tokens, mask, seq = (np.asarray(x) for x in (out.tokens, out.mask, out.sequence_mask))
    assert tokens.shape == (24, env.episode_tokens(8)) == (24, 4 * 8 + 3 * 12)
    assert {len(e.turns) for e in episodes} >= {1, 2, 3}  # the random episodes have several lengths
    for row, episode in enumerate(episodes):
        length = seq[row].sum()
        assert seq[row, :length].all() and not seq[row, length:].any()  # one contiguous sequence
        assert not (mask[row] & ~seq[row]).any()
        # The sequence is runs of policy tokens (the turns) and of other tokens (the observations),
        # alternating, starting and ending with a turn.
        edges = np.flatnonzero(np.diff(mask[row, :length].astype(int))) + 1
        runs = np.split(np.arange(length), edges)
        policy_runs, observation_runs = runs[0::2], runs[1::2]
        assert all(mask[row, r].all() for r in policy_runs) and not any(mask[row, r].any() for r in
                                                                        observation_runs)
        assert len(policy_runs) == len(episode.turns) == len(episode.observations) + 1
        for run, text in zip(policy_runs, episode.turns, strict=True):
            assert 1 <= len(run) <= 8 and TOKENIZER.decode(tokens[row, run].tolist()) == text
        for run, observation in zip(observation_runs, episode.observations, strict=True):
            assert tokens[row, run].tolist() == observe(observation)  # encoded, markers included
            assert len(run) <= 12
        assert np.isclose(rewards[row], sum(episode.turn_rewards))
        # "<r>" + text + "</r>\n" is 8 + len(text) characters: a longer text than 4 is cut, and counted.
        assert episode.observations_cut == sum(len(o) > 4 for o in episode.observations)
    assert sum(e.observations_cut for e in episodes) > 0


class LowercasingTokenizer(CharTokenizer):
    """encode(decode(ids)) != ids: upper-case letters come back lower-case."""

    def encode(self, text):
        return super().encode(text.lower())


class AlwaysContinue:
    def reset(self, example):
        return None  # no opening observation, no state

    def step(self, text):
        return "OK", 0.0, False


@pytest.mark.slow
def test_sampled_tokens_are_never_re_encoded_and_train_with_the_samplers_log_probs():
    tokenizer = LowercasingTokenizer()
    env = EnvConfig(max_turns=3, max_observation_tokens=12, observation_template=TEMPLATE)
    policy, cfg, key = model(), sampling(), jax.random.key(2)
    exs = examples(4)
    out, _, _, episodes = EpisodeSampler(AlwaysContinue, tokenizer).sample(policy, exs, key, cfg, env)
    # Turn 1 is the sampler's own output with the turn's key, id for id.
    first = sample(policy, [e["prompt_tokens"] for e in exs], jax.random.fold_in(key, 0), cfg)
    first_len = np.asarray(first.lengths)
    for row in range(16):
        np.testing.assert_array_equal(np.asarray(out.tokens)[row, :first_len[row]],
                                      np.asarray(first.tokens)[row, :first_len[row]])
    upper = set(CharTokenizer().encode("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    policy_ids = np.asarray(out.tokens)[np.asarray(out.mask)]
    assert np.isin(policy_ids, list(upper)).any()  # ids the lossy tokenizer can never produce
    assert all(len(e.turns) >= 2 for e in episodes) or any(e.truncated for e in episodes)
    # The training forward over the episode gives the sampler's log-probs of the policy's tokens.
    logprobs = completion_logprobs(policy, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask,
                                   sequence_mask=out.sequence_mask, vocab_limit=tokenizer.vocab_size)
    difference = np.where(np.asarray(out.mask), np.abs(np.asarray(logprobs) - np.asarray(out.logprobs)), 0)
    assert difference.max() < 1e-4
    # Without the sequence mask (observations unread) the log-probs of later turns are another policy's.
    unread = completion_logprobs(policy, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask,
                                 vocab_limit=tokenizer.vocab_size)
    unread_difference = np.abs(np.asarray(unread) - np.asarray(out.logprobs))
    assert np.where(np.asarray(out.mask), unread_difference, 0).max() > 1e-2


def make_config(max_turns=3, observation_tokens=10, **fields):
    return GRPOConfig.from_dict(dict(
        sampling=dict(group_size=4, max_new_tokens=8, buckets=(16,), stop_tokens=STOPS,
                      vocab_limit=TOKENIZER.vocab_size),
        rollout=dict(num_prompts=8), optimizer=dict(learning_rate=1e-3), seed=0,
        env=dict(max_turns=max_turns, max_observation_tokens=observation_tokens,
                 observation_template=TEMPLATE),
        **fields))


@pytest.mark.slow
def test_a_trainer_iteration_over_episodes_has_no_rollout_training_mismatch():
    trainer = Trainer(model(), make_config(), examples(16), None,
                      episodes=EpisodeSampler(random_envs(), TOKENIZER))
    metrics = [trainer.iteration() for _ in range(2)]
    assert max(m["reward/turns"] for m in metrics) > 1.5
    for m in metrics:
        assert m["rollout_kl"] < 1e-6 and m["rollout_logprob_diff_max"] < 1e-4
        assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
    # The loss reads the policy's tokens only: the logged length counts them, not the observations.
    rollout = trainer.last_rollout
    assert m["completion_length_mean"] == pytest.approx(rollout.mask.sum(1).mean())
    assert (np.asarray(rollout.sample.sequence_mask).sum() > rollout.mask.sum())


@pytest.mark.slow
def test_observation_tokens_get_no_gradient():
    # With the TIS correction the sampler's log-probs weight every token of the loss: changing them on the
    # observation tokens changes nothing; on the policy's tokens it changes the gradient.
    trainer = Trainer(model(), make_config(loss=dict(rollout_correction="tis", correction_cap=1.5)),
                      examples(16), None, episodes=EpisodeSampler(random_envs(), TOKENIZER))
    batch = trainer.batch(trainer.collect(jax.random.key(0)))
    observation = np.asarray(batch["sequence_mask"] & ~batch["completion_mask"])
    policy = np.asarray(batch["completion_mask"])
    assert observation.any() and policy.any()

    def step(changed_where):
        logprobs = np.where(changed_where, -5.0, np.asarray(batch["sample_logprobs"]))
        _, metrics = trainer.train_step(jax.tree.map(lambda x: x.copy(), trainer.state),
                                        dict(batch, sample_logprobs=logprobs))
        return float(metrics["grad_norm"])

    unchanged = step(np.zeros_like(policy))
    assert unchanged > 0
    assert step(observation) == unchanged
    assert abs(step(policy) - unchanged) > 1e-3 * unchanged


# -- tools ------------------------------------------------------------------------------------------------


def test_tool_calls_are_parsed_in_both_formats_and_never_evaluated():
    assert parse_tool_call("no call here") is None
    call = parse_tool_call(
        'x <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>')
    assert (call.name, call.kwargs) == ("calculator", {"expression": "2*3"})
    call = parse_tool_call("<tool_call>calculator('2*3', 4, key=[1, 2])</tool_call>", "pythonic")
    assert (call.name, call.args, call.kwargs) == ("calculator", ("2*3", 4), {"key": [1, 2]})
    for fmt, arguments in (("json", {"expression": "7*8"}), ("pythonic", {"expression": "7*8"})):
        assert parse_tool_call(format_tool_call("calculator", arguments, fmt), fmt).kwargs == arguments
    hostile = ["<tool_call>calculator(__import__('os').system('touch /tmp/pwned'))</tool_call>",
               "<tool_call>calculator(open('/etc/passwd').read())</tool_call>",
               "<tool_call>os.system('x')</tool_call>", "<tool_call>calculator(**{'a': 1})</tool_call>",
               "<tool_call>calculator('1'", "<tool_call>" + "(" * 5000 + "</tool_call>",
               "<tool_call>calculator(" + "9" * 5000 + ")</tool_call>"]
    for text in hostile:
        with pytest.raises(ToolCallError):
            parse_tool_call(text, "pythonic")
    for text in ['<tool_call>{"name": 3}</tool_call>', "<tool_call>[1, 2]</tool_call>",
                 '<tool_call>{"name": "c", "arguments": [1]}</tool_call>', "<tool_call>{{{</tool_call>"]:
        with pytest.raises(ToolCallError):
            parse_tool_call(text, "json")
    assert not Path("/tmp/pwned").exists()


def raising(x: str) -> str:
    raise RuntimeError("the tool broke")


def hanging(x: str) -> str:
    time.sleep(30)
    return "never"


class Unprintable:
    def __str__(self):
        raise ValueError("no")


def garbage(x: str):
    return Unprintable()


def nan(x: str):
    return float("nan")


def test_a_raising_hanging_or_garbage_tool_gives_an_error_observation():
    env = ToolEnv([raising, hanging, garbage, nan, calculator], tool_format="pythonic", timeout=0.3)
    env.reset({"answer": "6"})
    start = time.perf_counter()
    outcomes = {name: env.step(f"<tool_call>{name}('1')</tool_call>")
                for name in ("raising", "hanging", "garbage", "nan", "missing")}
    assert time.perf_counter() - start < 5  # the hanging tool did not hold the episode
    assert "RuntimeError: the tool broke" in outcomes["raising"][0]
    assert "timed out after 0.3 s" in outcomes["hanging"][0]
    assert "returned Unprintable, not text" in outcomes["garbage"][0]
    assert "returned nan" in outcomes["nan"][0]
    assert "no tool 'missing'" in outcomes["missing"][0]
    for observation, reward, done in outcomes.values():
        assert observation.startswith("error: ") and reward == 0.0 and not done
    observation = env.step("<tool_call>calculator(expression=3)</tool_call>")[0]
    assert observation.startswith("error: calculator raised")
    assert env.step("<tool_call>calculator(1, 2)</tool_call>")[0].startswith("error: calculator()")
    assert env.step("<tool_call>calculator('2*3')</tool_call>") == ("6", 0.0, False)
    assert env.step("the answer is 6") == (None, 1.0, True)
    assert env.metrics() == {"tool_calls": 8.0, "tool_errors": 7.0, "accuracy": 1.0}
    assert run_tool(Tool.of(calculator), parse_tool_call("<tool_call>calculator('2**1000**1000')</tool_call>",
                                                         "pythonic"), 1.0)[1]  # refused, not computed


class FailingToolEnv(ToolEnv):
    """Calls a failing tool on the first turn whatever the policy wrote, then takes its answer."""

    def step(self, completion):
        if self.tool_calls == 0:
            return super().step("<tool_call>raising('x')</tool_call>")
        return super().step(completion)


@pytest.mark.slow
def test_a_run_goes_on_after_tool_errors():
    env = lambda: FailingToolEnv([raising], tool_format="pythonic")  # noqa: E731
    trainer = Trainer(model(), make_config(max_turns=2, observation_tokens=64),
                      [dict(e, answer="7") for e in examples(16)], None,
                      episodes=EpisodeSampler(env, TOKENIZER))
    metrics = trainer.iteration()
    assert metrics["reward/tool_errors"] == 1.0 and metrics["reward/tool_calls"] == 1.0
    assert metrics["reward/turns"] > 1 and np.isfinite(metrics["loss"])
    observations = [
        TOKENIZER.decode(row[seq & ~mask].tolist()) for row, seq, mask in zip(
            trainer.last_rollout.tokens, np.asarray(trainer.last_rollout.sample.sequence_mask),
            trainer.last_rollout.mask, strict=True)]
    assert any("error: raising raised RuntimeError" in o for o in observations)


def test_observations_use_the_chat_templates_tool_turn_after_the_stop_token():
    tokenizer = load_tokenizer(str(CHATML_DIR))
    observe = Observations(tokenizer, "chat", 64)
    expected = "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"  # <|im_end|> was sampled
    assert observe("42") == tokenizer.encode(expected)
    char = Observations(TOKENIZER, "chat", 64)
    assert TOKENIZER.decode(char("42")) == "\nTool: 42\nAssistant:"
    long = Observations(TOKENIZER, TEMPLATE, 12)("x" * 100)
    assert len(long) == 12 and TOKENIZER.decode(long).endswith("</r>\n")  # cut inside, markers kept
    with pytest.raises(ValueError, match="max_observation_tokens=5 leaves no room"):
        Observations(TOKENIZER, TEMPLATE, 5)


def test_greedy_evaluation_counts_tool_calls_and_accuracy():
    class Scripted:
        def reset(self, example):
            self.example = example

        def step(self, text):
            return None, float(self.example["answer"]), True

        def metrics(self):
            right = float(self.example["answer"])
            return {"accuracy": right, "tool_calls": 1.0 - right}

    exs = [dict(e, answer=str(i % 2)) for i, e in enumerate(examples(5))]
    result = evaluate_episodes(model(), exs, EpisodeSampler(Scripted, TOKENIZER), sampling(),
                               EnvConfig(max_turns=2), batch_prompts=2)
    assert result["accuracy"] == pytest.approx(2 / 5) and result["tool_call_rate"] == pytest.approx(3 / 5)
    assert result["turns"] == 1.0


def test_row_buckets_bound_the_shapes_of_later_turns():
    assert [row_bucket(r, 64) for r in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert [row_bucket(r, 24, shards=8) for r in (1, 9, 17)] == [8, 16, 24]


@pytest.mark.slow
def test_multi_turn_demonstrations_train_on_the_policy_tokens_only():
    policy = model()
    graphdef, params = nnx.split(policy)
    prompts, prompt_mask = np.full((2, 4), 5, np.int32), np.ones((2, 4), bool)
    demo = ([7, 8, 9, 10, 11], [True, True, False, False, True])
    padded = sft.pad_demonstrations([demo, [12, 13]], 6, 0)
    assert padded["loss_mask"].tolist() == [[1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]]
    batch = dict(prompt_tokens=prompts, prompt_mask=prompt_mask, **padded)
    logprobs = completion_logprobs(policy, prompts, prompt_mask, padded["target_tokens"], padded["loss_mask"],
                                   sequence_mask=padded["target_mask"])
    expected = -(np.asarray(logprobs) * padded["loss_mask"]).sum() / padded["loss_mask"].sum()
    assert float(sft.sft_loss(params, graphdef, batch)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="loss mask has 2 entries for 5 tokens"):
        sft.pad_demonstrations([([7, 8, 9, 10, 11], [True, True])], 6, 0)


@pytest.mark.parametrize("fields, message", [
    (dict(env=dict(max_turns=0)), "config.env.max_turns=0 must be an integer >= 1"),
    (dict(env=dict(tool_format="xml")), "config.env.tool_format='xml'"),
    (dict(env=dict(observation_template="no placeholder")), "config.env.observation_template="),
    (dict(env=dict(tool_timeout=0)), "config.env.tool_timeout=0 must be a number of seconds > 0"),
    (dict(env=dict(max_turns=2), algo="ppo"), "config.env.max_turns=2 > 1 needs config.algo='grpo'"),
    (dict(env=dict(max_turns=2), rollout=dict(overlong_buffer=2)),
     "config.env.max_turns=2 > 1 needs config.rollout.overlong_buffer=0"),
])
def test_env_config_errors_name_the_path(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GRPOConfig.from_dict(dict(sampling=dict(max_new_tokens=8, group_size=2), **fields))


def test_a_multi_turn_config_needs_an_environment():
    with pytest.raises(ValueError, match="config.env.max_turns=3 needs an environment"):
        Trainer(model(), make_config(), examples(16), lambda e, c: np.zeros(len(c)))


@pytest.mark.slow
def test_an_episode_reward_fn_sees_the_turn_rewards_and_replaces_their_sum():
    def last_turn_twice(examples, episodes):
        assert len(examples) == len(episodes) == 8 and all("prompt_tokens" in e for e in examples)
        return [2 * e.turn_rewards[-1] for e in episodes], {"first_turn_reward": [e.turn_rewards[0]
                                                                                    for e in episodes]}

    env = EnvConfig(max_turns=3, max_observation_tokens=12, observation_template=TEMPLATE)
    _, rewards, metrics, episodes = EpisodeSampler(random_envs(), TOKENIZER, last_turn_twice).sample(
        model(), examples(2), jax.random.key(3), sampling(), env)
    np.testing.assert_allclose(rewards, [2 * e.turn_rewards[-1] for e in episodes], rtol=1e-6)
    assert metrics["first_turn_reward"] == [e.turn_rewards[0] for e in episodes]
    with pytest.raises(ValueError, match=r"returned shape \(3,\); expected \(8,\)"):
        EpisodeSampler(random_envs(), TOKENIZER, lambda ex, ep: [0.0] * 3).sample(
            model(), examples(2), jax.random.key(3), sampling(), env)


@pytest.mark.slow
def test_a_batch_of_short_episodes_trains_at_their_width_with_the_same_update():
    from grpo_jax.trainer import episode_width

    assert episode_width(np.zeros((2, 176), bool)) == 32
    assert [episode_width(np.arange(176)[None] < n) for n in (1, 32, 33, 100, 170, 176)] == [
        32, 32, 64, 128, 176, 176]
    # Observations of at most 8 + 30 tokens in a budget of 64: no episode fills the static width of 152.
    trainer = Trainer(model(), make_config(observation_tokens=64), examples(16), None,
                      episodes=EpisodeSampler(random_envs(), TOKENIZER))
    rollout = trainer.collect(jax.random.key(0))
    batch = trainer.batch(rollout)
    full_width = rollout.sample.tokens.shape[1]
    assert batch["completion_tokens"].shape[1] < full_width  # the random episodes are short
    width = batch["completion_tokens"].shape[1]
    assert not np.asarray(rollout.sample.sequence_mask)[:, width:].any()  # only padding was cut
    assert np.asarray(rollout.sample.sequence_mask)[:, width - 32:].any()  # the longest episode fills it
    # The same batch at the whole static width: the same loss and gradient.
    padded = {k: (np.pad(np.asarray(v), ((0, 0), (0, full_width - v.shape[1])))
                  if v.ndim == 2 and not k.startswith("prompt_") else v) for k, v in batch.items()}
    _, short = trainer.train_step(jax.tree.map(lambda x: x.copy(), trainer.state), batch)
    _, whole = trainer.train_step(jax.tree.map(lambda x: x.copy(), trainer.state), padded)
    np.testing.assert_allclose(float(short["grad_norm"]), float(whole["grad_norm"]), rtol=1e-5)
    assert float(whole["grad_norm"]) > 0
    for name in ("loss", "rollout_kl"):  # both ~0 on-policy (the advantages of a group sum to 0)
        assert abs(float(short[name]) - float(whole[name])) < 1e-6


def huge(x: str) -> int:
    return 10**5000  # str() of it raises ValueError (Python's digit limit)


def test_a_tool_whose_result_cannot_be_printed_and_a_builtin_tool():
    env = ToolEnv([huge], tool_format="pythonic")
    env.reset({"answer": "1"})
    observation, reward, done = env.step("<tool_call>huge('x')</tool_call>")
    assert observation.startswith("error: huge raised ValueError") and not done
    with pytest.raises(ValueError, match="the tool max has no readable signature"):
        ToolEnv([max])


def test_tool_env_accuracy_is_the_exact_answer_and_its_reward_the_answer_reward():
    env = ToolEnv([calculator], answer_reward=lambda example, text: 0.5 + exact_answer(example, text))
    env.reset({"answer": "6"})
    assert env.step("6") == (None, 1.5, True) and env.metrics()["accuracy"] == 1.0
    env.reset({"answer": "6"})
    assert env.step("7") == (None, 0.5, True) and env.metrics()["accuracy"] == 0.0
    text_env = ToolEnv([calculator], answer_reward=lambda example, text: float(text == example["answer"]))
    text_env.reset({"answer": "Paris"})  # no number to compare exactly: the reward is the accuracy
    assert text_env.step("Paris") == (None, 1.0, True) and text_env.metrics()["accuracy"] == 1.0
