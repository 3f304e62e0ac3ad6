r"""grpo_jax benchmarks: one absl entry point, one `--bench` per measurement.

  python experiments/benchmark.py --bench=logprobs_memory

logprobs_memory: compiled temp memory (XLA's memory analysis, nothing is run) of loss + grad through
  `token_logprobs` versus the naive full-vocabulary `log_softmax`, at Qwen2.5-0.5B's vocabulary and width.
  With --time, also runs both and reports the median wall time of loss + grad.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from grpo_jax import token_logprobs

_BENCH = flags.DEFINE_enum("bench", "logprobs_memory", ["logprobs_memory"], "Which benchmark to run.")
_VOCAB = flags.DEFINE_integer("vocab", 151936, "logprobs_memory: vocabulary size V.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "logprobs_memory: tokens B * T (as B=4 sequences).")
_DIM = flags.DEFINE_integer("dim", 896, "logprobs_memory: hidden width D.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "logprobs_memory: token_logprobs chunk_size.")
_TIME = flags.DEFINE_bool("time", False, "logprobs_memory: also run loss + grad and time it.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")


def _naive_logprobs(hidden, unembedding, targets):
    logits = jnp.einsum("btd,dv->btv", hidden, unembedding, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _loss_and_grad(logprob_fn):
    def loss(hidden, unembedding, targets, advantages):  # a policy-gradient-shaped loss
        return -jnp.mean(advantages * logprob_fn(hidden, unembedding, targets))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _median_seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_logprobs_memory() -> None:
    batch = 4
    length = _TOKENS.value // batch
    shapes = (
        jax.ShapeDtypeStruct((batch, length, _DIM.value), jnp.float32),
        jax.ShapeDtypeStruct((_DIM.value, _VOCAB.value), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, length), jnp.float32),
    )
    variants = {
        "naive log_softmax": _loss_and_grad(_naive_logprobs),
        f"token_logprobs(chunk_size={_CHUNK.value})": _loss_and_grad(
            lambda h, w, t: token_logprobs(h, w, t, chunk_size=_CHUNK.value)),
    }
    logits_gb = batch * length * _VOCAB.value * 4 / 1e9
    print(f"loss + grad, B*T={batch * length}, D={_DIM.value}, V={_VOCAB.value} "
          f"(one f32 [B*T, V] logits buffer = {logits_gb:.2f} GB), backend={jax.default_backend()}")
    temps = {}
    for name, fn in variants.items():
        stats = fn.lower(*shapes).compile().memory_analysis()
        temps[name] = stats.temp_size_in_bytes
        line = (f"  {name:32s} temp {stats.temp_size_in_bytes / 1e9:7.3f} GB   "
                f"output {stats.output_size_in_bytes / 1e9:6.3f} GB")
        if _TIME.value:
            key = jax.random.split(jax.random.PRNGKey(0), 4)
            args = (jax.random.normal(key[0], shapes[0].shape),
                    jax.random.normal(key[1], shapes[1].shape) / _DIM.value**0.5,
                    jax.random.randint(key[2], shapes[2].shape, 0, _VOCAB.value),
                    jax.random.normal(key[3], shapes[3].shape))
            seconds = _median_seconds(fn, *args)
            flops = 3 * 2 * batch * length * _DIM.value * _VOCAB.value  # logits + 2 backward matmuls
            line += f"   {seconds:6.2f} s   {flops / seconds / 1e9:6.1f} GFLOP/s (of the work needed)"
        print(line)
    naive, chunked = temps.values()
    print(f"  ratio chunked / naive temp = {chunked / naive:.3f} (target <= 0.25)")


def main(argv) -> None:
    del argv
    {"logprobs_memory": bench_logprobs_memory}[_BENCH.value]()


if __name__ == "__main__":
    app.run(main)
