"""Supervised warm start: the loss falls, greedy accuracy rises, and the threshold stops it early."""

import jax
import numpy as np
import pytest
from flax import nnx

from grpo_jax.data import ArithmeticTask, TokenizedDataset
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.rewards import extract_answer
from grpo_jax.sampling import SamplingConfig, sample
from grpo_jax.sft import pad_targets, warm_start
from grpo_jax.tokenizers import CharTokenizer

TOKENIZER = CharTokenizer()
MODEL = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def dataset(split):
    return TokenizedDataset(ArithmeticTask(digits=1, split=split, size=500), TOKENIZER)


def target(example):
    return TOKENIZER.encode(example["answer"]) + [TOKENIZER.eos_id]


def greedy_accuracy(model, examples):
    out = sample(model, [e["prompt_tokens"] for e in examples], jax.random.key(0),
                 SamplingConfig(max_new_tokens=4, temperature=0.0, stop_tokens=(TOKENIZER.eos_id,),
                                buckets=(32,), vocab_limit=TOKENIZER.vocab_size))
    rows = zip(np.asarray(out.tokens), np.asarray(out.mask), strict=True)
    texts = [TOKENIZER.decode(tokens[mask]) for tokens, mask in rows]
    return float(np.mean([extract_answer(t) == extract_answer(e["answer"])
                          for t, e in zip(texts, examples, strict=True)]))


@pytest.mark.slow
def test_warm_start_learns_one_digit_addition():
    train = dataset("train")
    held_out = [train[i] for i in range(48)]  # 1-digit sums: the point is fitting, not generalising
    model = Transformer(MODEL, nnx.Rngs(0))
    before = greedy_accuracy(model, held_out)
    model, history = warm_start(model, train, target, steps=300, batch_size=32, learning_rate=3e-3,
                                buckets=(32,), max_target_tokens=4,
                                evaluate=lambda m: greedy_accuracy(m, held_out), threshold=0.5, eval_every=50)
    after = greedy_accuracy(model, held_out)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert before < 0.2 and after >= 0.5
    assert history[-1]["step"] < 300  # stopped at the threshold, not at the step budget


def test_errors():
    with pytest.raises(ValueError, match="1..3 tokens"):
        pad_targets([[1, 2, 3, 4]], 3, 0)
    with pytest.raises(ValueError, match="needs evaluate="):
        warm_start(Transformer(MODEL, nnx.Rngs(0)), dataset("train"), target, steps=1, threshold=0.5)


@pytest.mark.slow
def test_ema_returns_and_evaluates_the_moving_average_of_the_params():
    train = dataset("train")

    def run(steps, ema, evaluated=None):
        model = Transformer(MODEL, nnx.Rngs(0))
        evaluate = None if evaluated is None else (lambda m: evaluated.append(nnx.state(m)) or 0.0)
        model, _ = warm_start(model, train, target, steps=steps, batch_size=8, buckets=(32,),
                              max_target_tokens=4, ema=ema, evaluate=evaluate, eval_every=1)
        return nnx.state(model)

    p0 = nnx.state(Transformer(MODEL, nnx.Rngs(0)))
    p1, p2 = run(1, 0.0), run(2, 0.0)  # the raw params after one and two steps (same data order)
    evaluated = []
    averaged = run(2, 0.5, evaluated)
    # a1 = p0 / 2 + p1 / 2, a2 = a1 / 2 + p2 / 2
    expected = jax.tree.map(lambda a, b, c: 0.25 * a + 0.25 * b + 0.5 * c, p0, p1, p2)
    for got, want in zip(jax.tree.leaves(averaged), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    first = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, p0, p1)  # what the step-1 evaluation saw
    for got, want in zip(jax.tree.leaves(evaluated[0]), jax.tree.leaves(first), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(abs(jax.tree.leaves(p2)[0] - jax.tree.leaves(averaged)[0]).max()) > 0
