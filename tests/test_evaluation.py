"""pass@k and maj@k values, evaluate() on a scripted sampler and on a real tiny model, and the eval script."""

import itertools
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from grpo_jax import evaluation, rewards
from grpo_jax.data import PLAIN, ArithmeticTask, TokenizedDataset
from grpo_jax.evaluation import evaluate, majority_at_k, pass_at_k
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.sampling import SampleOutput, SamplingConfig, sample
from grpo_jax.tokenizers import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            exact = Fraction(sum(any(s) for s in subsets), len(subsets))
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0  # k = n: all samples drawn
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k=5 must be in"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="num_correct=5"):
        pass_at_k(4, 5, 1)


F = Fraction


@pytest.mark.parametrize("answers, reference, k, expected", [
    ([F(3), F(3), F(4)], F(3), 3, 1.0),
    ([F(4), F(3), F(3)], F(3), 3, 1.0),
    ([F(4), F(3), F(3)], F(3), 1, 0.0),  # only the first answer votes
    ([F(4), F(3)], F(3), 2, 0.0),  # tie: the first seen wins
    ([F(3), F(4)], F(3), 2, 1.0),
    ([None, None, F(3)], F(3), 3, 1.0),  # None does not vote
    ([None, F(4), F(3), None], F(3), 4, 0.0),
    ([None, None], F(3), 2, 0.0),  # no answer at all
    ([F(1, 2), F(2, 4), F(1)], F(1, 2), 3, 1.0),  # equal fractions are one answer
])
def test_majority_at_k(answers, reference, k, expected):
    assert majority_at_k(answers, reference, k) == expected


def test_majority_at_k_rejects_k_beyond_the_answers():
    with pytest.raises(ValueError, match="k=3"):
        majority_at_k([F(1), F(2)], F(1), 3)


TOKENIZER = CharTokenizer()


def _scripted_dataset():
    examples = [{"prompt": f"question {i}", "answer": str(i)} for i in range(3)]
    return TokenizedDataset(examples, TOKENIZER, PLAIN)


# Greedy completion and the 4 sampled completions of each prompt; "x" has no answer.
GREEDY = ["0", "5", "2"]
SAMPLED = [["0", "0", "7", "7"],  # c=2, maj: 0 (tie, first seen)
           ["5", "1", "5", "x"],  # c=1, maj: 5
           ["3", "2", "2", "x"]]  # c=2, maj@1: 3, maj@2: 3 (tie), maj@4: 2


def test_evaluate_aggregates_scripted_completions(monkeypatch):
    dataset = _scripted_dataset()
    index = {tuple(dataset[i]["prompt_tokens"]): i for i in range(len(dataset))}
    keys = []

    def fake_sample(model, prompts, key, config: SamplingConfig):
        keys.append(tuple(np.asarray(jax.random.key_data(key)).tolist()))
        assert config.stop_tokens == (TOKENIZER.eos_id,) and config.vocab_limit == TOKENIZER.vocab_size
        if config.temperature == 0:
            assert config.group_size == 1
            texts = [GREEDY[index[tuple(p)]] for p in prompts]
        else:
            assert config.group_size == 4 and config.temperature == 0.7
            texts = [t for p in prompts for t in SAMPLED[index[tuple(p)]]]
        rows = [TOKENIZER.encode(t) + [TOKENIZER.eos_id] for t in texts]
        tokens = np.zeros((len(rows), config.max_new_tokens), np.int32)
        for r, row in enumerate(rows):
            tokens[r, :len(row)] = row
        lengths = np.array([len(row) for row in rows], np.int32)
        return SampleOutput(tokens, tokens > 0, lengths, None, None, None, None)

    monkeypatch.setattr(evaluation, "sample", fake_sample)
    metrics = evaluate(None, dataset, TOKENIZER, key=jax.random.key(0), num_samples=4, ks=(1, 2, 4),
                       max_new_tokens=4, temperature=0.7, batch_prompts=2)
    expected = {
        "greedy_accuracy": 2 / 3,
        "pass@1": (2 / 4 + 1 / 4 + 2 / 4) / 3,
        "pass@2": (5 / 6 + 1 / 2 + 5 / 6) / 3,  # 1 - C(n-c, 2) / C(4, 2)
        "pass@4": 1.0,
        "maj@1": 1 / 3,
        "maj@2": 1 / 3,
        "maj@4": 2 / 3,
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert len(keys) == 4 and len(set(keys)) == 4  # 2 batches x (greedy, sampled), no key used twice


def test_evaluate_with_no_samples_decodes_greedily_only(monkeypatch):
    dataset = _scripted_dataset()
    index = {tuple(dataset[i]["prompt_tokens"]): i for i in range(len(dataset))}
    temperatures = []

    def fake_sample(model, prompts, key, config: SamplingConfig):
        temperatures.append(config.temperature)
        rows = [TOKENIZER.encode(GREEDY[index[tuple(p)]]) + [TOKENIZER.eos_id] for p in prompts]
        tokens = np.array(rows, np.int32)
        return SampleOutput(tokens, tokens > 0, np.array([len(r) for r in rows]), None, None, None, None)

    monkeypatch.setattr(evaluation, "sample", fake_sample)
    metrics = evaluate(None, dataset, TOKENIZER, key=jax.random.key(0), num_samples=0, ks=(),
                       max_new_tokens=4, batch_prompts=2)
    assert metrics == {"greedy_accuracy": pytest.approx(2 / 3)}
    assert temperatures == [0.0, 0.0]  # two batches, no sampled pass
    with pytest.raises(ValueError, match="ks=\\(1,\\) needs samples"):
        evaluate(None, dataset, TOKENIZER, key=jax.random.key(0), num_samples=0, ks=(1,), max_new_tokens=4)


def test_evaluate_rejects_k_above_num_samples():
    with pytest.raises(ValueError, match="ks=\\(1, 8\\)"):
        evaluate(None, _scripted_dataset(), TOKENIZER, key=jax.random.key(0), num_samples=4, ks=(1, 8),
                 max_new_tokens=4)


def test_evaluate_on_a_tiny_model_matches_a_hand_recomputation():
    config = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    model = Transformer(config, nnx.Rngs(0))
    task = ArithmeticTask(digits=1, split="test", size=8)
    dataset = TokenizedDataset(task, TOKENIZER, PLAIN)
    kwargs = dict(num_samples=4, ks=(1, 2, 4), max_new_tokens=4, batch_prompts=4, buckets=(16,))
    metrics = evaluate(model, dataset, TOKENIZER, key=jax.random.key(1), **kwargs)
    assert metrics == evaluate(model, dataset, TOKENIZER, key=jax.random.key(1), **kwargs)  # deterministic
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"]

    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0, stop_tokens=TOKENIZER.stop_ids,
                            pad_id=TOKENIZER.pad_id, buckets=(16,), vocab_limit=TOKENIZER.vocab_size)
    correct = []
    for start in (0, 4):  # the same batches of 4 as evaluate
        examples = [dataset[i] for i in range(start, start + 4)]
        out = sample(model, [e["prompt_tokens"] for e in examples], jax.random.key(0), greedy)
        for e, row, length in zip(examples, np.asarray(out.tokens), np.asarray(out.lengths), strict=True):
            correct.append(rewards.extract_answer(TOKENIZER.decode(row[:length].tolist()))
                           == Fraction(e["answer"]))
    assert metrics["greedy_accuracy"] == pytest.approx(np.mean(correct))
    texts = evaluation.greedy_completions(model, dataset, TOKENIZER, max_new_tokens=4, buckets=(16,))
    right = rewards.accuracy_reward([], texts, answer=[e["answer"] for e in dataset])
    assert len(texts) == 8 and np.mean(right) == pytest.approx(metrics["greedy_accuracy"])


@pytest.mark.slow
def test_evaluate_script_reads_the_training_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as for a user
    config = f"--config={ROOT / 'experiments' / 'configs' / 'arithmetic_tiny.py'}"
    trained = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train_grpo.py"), config, f"--workdir={tmp_path}",
         "--config.num_steps=1", "--config.rollout.num_prompts=4", "--config.warm_start.steps=0"],
        capture_output=True, text=True, timeout=600, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "evaluate.py"), config, f"--workdir={tmp_path}",
         "--num_examples=8", "--num_samples=4", "--ks=1,4", "--show=3", "--config.num_steps=1",
         "--config.rollout.num_prompts=4", "--config.warm_start.steps=0"],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluating the checkpoint of step 1" in done.stdout
    assert "greedy_accuracy: " in done.stdout and "maj@4: " in done.stdout
    shown = [line for line in done.stdout.splitlines() if line.startswith(("right | ", "wrong | "))]
    assert len(shown) == 3 and all(" -> " in line and "What is " in line for line in shown)
    result = json.loads((tmp_path / "eval_test.json").read_text())
    assert set(result) == {"greedy_accuracy", "pass@1", "pass@4", "maj@1", "maj@4", "step", "split",
                           "num_examples", "num_samples", "temperature"}
    assert result["step"] == 1 and result["split"] == "test" and result["num_examples"] == 8
