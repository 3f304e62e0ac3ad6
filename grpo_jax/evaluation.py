"""Evaluate a policy on a dataset of verifiable problems: greedy accuracy, pass@k and maj@k.

  metrics = evaluate(model, dataset, tokenizer, key=jax.random.key(0), num_samples=8, ks=(1, 4, 8),
                     max_new_tokens=256)
  # {"greedy_accuracy": ..., "pass@1": ..., "pass@4": ..., "pass@8": ..., "maj@1": ..., ...}

A completion is correct when `rewards.extract_answer` of its text equals the example's "answer" as an exact
fraction, the rule `rewards.accuracy_reward` trains with.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from fractions import Fraction

import jax
import numpy as np

from grpo_jax import rewards
from grpo_jax.models.transformer import Transformer
from grpo_jax.sampling import DEFAULT_BUCKETS, SamplingConfig, sample
from grpo_jax.tokenizers import Tokenizer


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """pass@k = 1 - C(n - c, k) / C(n, k): the chance that k of the n samples, drawn without replacement,
    hold at least one correct one.

    The unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1
    and fig. 3), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the
    binomials.

    Args:
      num_samples: n, the samples drawn for the problem.
      num_correct: c, how many of them are correct, 0 <= c <= n.
      k: the budget, 1 <= k <= n.
    """
    n, c = num_samples, num_correct
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must be in [1, num_samples={n}]; draw at least k samples.")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: num_correct={c} must be in [0, num_samples={n}].")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_at_k(answers: Sequence[Fraction | None], reference: Fraction, k: int) -> float:
    """1.0 when the most frequent of the first k answers equals `reference`, else 0.0 (maj@k, self-
    consistency of Wang et al. 2022). None (no answer found) does not vote; ties go to the answer seen first;
    no answer at all scores 0.0."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"majority_at_k: k={k} must be in [1, len(answers)={len(answers)}].")
    votes = collections.Counter(a for a in answers[:k] if a is not None)  # insertion order = first seen
    if not votes:
        return 0.0
    return float(max(votes, key=votes.__getitem__) == reference)  # max keeps the first of equal counts


def _answers(out, tokenizer: Tokenizer) -> list[Fraction | None]:
    """The extracted answer of every completion row of a `SampleOutput`."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [rewards.extract_answer(tokenizer.decode(row[:length].tolist()))
            for row, length in zip(tokens, lengths, strict=True)]


def evaluate(
    model: Transformer,
    dataset: Sequence[dict],
    tokenizer: Tokenizer,
    *,
    key: jax.Array,
    num_samples: int,
    ks: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_prompts: int = 16,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> dict[str, float]:
    """Greedy accuracy, and pass@k and maj@k of `num_samples` samples per prompt at `temperature`.

    Args:
      model: the policy.
      dataset: examples with "prompt_tokens" and "answer" (a `TokenizedDataset`).
      tokenizer: decodes completions; its stop, pad and vocabulary sizes configure the sampler.
      key: PRNG key; batch b samples with `fold_in(key, b)`, so no key is used twice.
      num_samples: n, samples per prompt for pass@k and maj@k; 0 for greedy accuracy alone.
      ks: the budgets k reported, each in [1, num_samples]; empty when num_samples is 0.
      max_new_tokens: completion length limit.
      temperature: sampling temperature of the n samples (greedy accuracy always decodes at 0).
      batch_prompts: prompts per sampler call; the last batch is padded to it so one shape compiles.
      buckets: prompt-length buckets of the sampler.

    Returns:
      {"greedy_accuracy", "pass@k" and "maj@k" for each k}, each the mean over the dataset, in [0, 1].
    """
    if len(dataset) == 0:
        raise ValueError("evaluate: the dataset is empty; pass at least one example.")
    if num_samples == 0 and ks:
        raise ValueError(f"evaluate: ks={tuple(ks)} needs samples; pass num_samples >= {max(ks)} or ks=().")
    if num_samples and (not ks or any(not 1 <= k <= num_samples for k in ks)):
        raise ValueError(f"evaluate: ks={tuple(ks)} must be non-empty with each k in [1, num_samples="
                         f"{num_samples}]; raise num_samples or drop the larger k.")
    if batch_prompts < 1:
        raise ValueError(f"evaluate: batch_prompts={batch_prompts} must be >= 1.")
    common = dict(max_new_tokens=max_new_tokens, stop_tokens=tuple(tokenizer.stop_ids),
                  pad_id=tokenizer.pad_id, buckets=tuple(buckets), vocab_limit=tokenizer.vocab_size)
    greedy_cfg = SamplingConfig(group_size=1, temperature=0.0, **common)
    sample_cfg = SamplingConfig(group_size=max(num_samples, 1), temperature=temperature, **common)

    greedy, passes, majorities = [], {k: [] for k in ks}, {k: [] for k in ks}
    for batch, start in enumerate(range(0, len(dataset), batch_prompts)):
        examples = [dataset[i] for i in range(start, min(start + batch_prompts, len(dataset)))]
        prompts = [e["prompt_tokens"] for e in examples]
        prompts += [prompts[0]] * (batch_prompts - len(prompts))  # same shape every batch; results dropped
        greedy_key, sample_key = jax.random.split(jax.random.fold_in(key, batch))
        references = [rewards.reference_value(e["answer"], start + i)  # as accuracy_reward reads them
                      for i, e in enumerate(examples)]
        greedy_answers = _answers(sample(model, prompts, greedy_key, greedy_cfg), tokenizer)[:len(examples)]
        greedy += [float(a == r) for a, r in zip(greedy_answers, references, strict=True)]
        if not num_samples:
            continue
        sampled_answers = _answers(sample(model, prompts, sample_key, sample_cfg), tokenizer)
        for i, reference in enumerate(references):
            answers = sampled_answers[i * num_samples:(i + 1) * num_samples]
            num_correct = sum(answer == reference for answer in answers)
            for k in ks:
                passes[k].append(pass_at_k(num_samples, num_correct, k))
                majorities[k].append(majority_at_k(answers, reference, k))
    return {"greedy_accuracy": float(np.mean(greedy)),
            **{f"pass@{k}": float(np.mean(passes[k])) for k in ks},
            **{f"maj@{k}": float(np.mean(majorities[k])) for k in ks}}


def greedy_completions(model: Transformer, dataset: Sequence[dict], tokenizer: Tokenizer, *,
                       max_new_tokens: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> list[str]:
    """The decoded greedy completion of every example of `dataset` (one sampler call), e.g. to show the
    same prompts' answers before and after training."""
    cfg = SamplingConfig(group_size=1, temperature=0.0, max_new_tokens=max_new_tokens,
                         stop_tokens=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id,
                         buckets=tuple(buckets), vocab_limit=tokenizer.vocab_size)
    out = sample(model, [e["prompt_tokens"] for e in dataset], jax.random.key(0), cfg)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tokenizer.decode(row[:length].tolist()) for row, length in zip(tokens, lengths, strict=True)]
