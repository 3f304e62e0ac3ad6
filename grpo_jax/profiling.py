"""Timing against the machine's own limits: the benchmarks' shared measuring tools, public for users' own.

  roofline      `Roofline`: f32 matmul GFLOP/s sampled before, between and after the timed work (2048^2, the
                rate a large square matmul reaches: the compute ceiling of the machine at that moment)
  shape limit   `matmul_limit_seconds`: the time the matmuls of a piece of work take alone, at their own
                shapes, with distinct weights (as a decode step reads them): what that work could take if
                nothing but its matmuls ran
  work          `forward_flops` / `grpo_work_flops` / `decode_matmul_shapes`: the FLOPs a model's work needs
  timing        `time_calls`: first call (compilation included) and the median of further calls

Times on a shared machine drift: compare medians measured in one run, and state the roofline with them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from grpo_jax.models.config import ModelConfig


def matmul_calls(calls: int = 10, size: int = 2048) -> list[float]:
    """GFLOP/s of `calls` timed `size` x `size` float32 matmuls on the default backend."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size))
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    rates = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return rates


class Roofline:
    """The f32 matmul roofline from samples taken before, between and after the timed work.

    `median` is the typical rate, to set against the median of the timed work (like with like on a machine
    whose speed varies from moment to moment); `best` is the fastest call, the strict ceiling, to set against
    the fastest run of the work.
    """

    def __init__(self):
        self.rates: list[float] = []

    def measure(self, calls: int = 10) -> None:
        self.rates += matmul_calls(calls)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)

    def __str__(self) -> str:
        return (f"f32 matmul roofline {self.median:.0f} GFLOP/s median, {self.best:.0f} best "
                f"({len(self.rates)} calls of a 2048 x 2048 matmul)")


def time_calls(fn: Callable[[jax.Array], object], repeats: int) -> tuple[float, list[float]]:
    """(seconds of the first call, compilation included; seconds of each of `repeats` further calls). Each
    call gets a fresh PRNG key; the result is waited for."""
    start = time.perf_counter()
    jax.block_until_ready(fn(jax.random.PRNGKey(0)))
    first = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.PRNGKey(i + 1)))
        times.append(time.perf_counter() - start)
    return first, times


def forward_flops(cfg: ModelConfig, tokens: int, context: float) -> float:
    """Forward FLOPs of `tokens` tokens attending to `context` keys on average (matmuls + attention)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = 2 * (d * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * d
                     + 3 * d * cfg.intermediate_size)
    attention = 2 * 2 * cfg.num_heads * hd * context  # q k^T and weights v
    return tokens * (cfg.num_layers * (per_layer + attention) + 2 * d * cfg.vocab_size)


def grpo_work_flops(cfg: ModelConfig, prompts: int, group: int, prompt_len: int, new_tokens: int,
                    beta: float) -> dict[str, float]:
    """FLOPs one GRPO iteration needs, each prompt computed once per group (forward x1, backward x2)."""
    rows = prompts * group
    prompt = forward_flops(cfg, prompts * prompt_len, prompt_len / 2)
    completions = forward_flops(cfg, rows * new_tokens, prompt_len + new_tokens / 2)
    return {"sampling": prompt + completions, "reference": (prompt + completions) if beta else 0.0,
            "update": 3 * (prompt + completions)}


def decode_matmul_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every weight matmul of one decode step, as grpo_jax's model runs them (q/k/v and
    gate/up fused), the output head last."""
    d, hd = cfg.hidden_size, cfg.head_dim
    layer = [(d, hd * (cfg.num_heads + 2 * cfg.num_kv_heads)), (cfg.num_heads * hd, d),
             (d, 2 * cfg.intermediate_size), (cfg.intermediate_size, d)]
    return layer * cfg.num_layers + [(d, cfg.vocab_size)]


def matmul_limit_seconds(rows: int, shapes: Sequence[tuple[int, int]], repeats: int = 5) -> float:
    """Median seconds of `rows`-row float32 matmuls against one distinct weight per (in, out) in `shapes`,
    chained (each reads its weights from memory, as a decode step does): the time the work's matmuls take
    alone at their own shapes."""
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    weights = [jax.random.normal(k, s) * s[0] ** -0.5 for k, s in zip(keys, shapes, strict=True)]
    widest = max(s[0] for s in shapes)
    x = jnp.ones((rows, widest))

    @jax.jit
    def chain(x, weights):
        total = jnp.zeros((), jnp.float32)
        for w in weights:  # each input depends on the previous output: one matmul at a time, in order
            y = x[:, :w.shape[0]] @ w
            total += y[0, 0]
            x = x.at[0, 0].add(y[0, 0] * 1e-9)
        return total

    jax.block_until_ready(chain(x, weights))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(chain(x, weights))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
