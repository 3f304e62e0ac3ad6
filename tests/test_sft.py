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
    with pytest.raises(ValueError, match="both evaluate and threshold"):
        warm_start(Transformer(MODEL, nnx.Rngs(0)), dataset("train"), target, steps=1, threshold=0.5)
