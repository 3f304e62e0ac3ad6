r"""Log-prob memory: compiled temp memory of loss + grad through `token_logprobs` against the naive
full-vocabulary `log_softmax`.

  python experiments/benchmarks/logprobs_memory.py
  python experiments/benchmarks/logprobs_memory.py --time

XLA's memory analysis of both compiled functions, nothing run, at Qwen2.5-0.5B's vocabulary and width by
default. With --time, also runs both and reports the median wall time of loss + grad.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from grpo_jax import token_logprobs
from grpo_jax.profiling import time_calls

_VOCAB = flags.DEFINE_integer("vocab", 151936, "Vocabulary size V.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens B * T (as B=4 sequences).")
_DIM = flags.DEFINE_integer("dim", 896, "Hidden width D.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "token_logprobs chunk_size.")
_TIME = flags.DEFINE_bool("time", False, "Also run loss + grad and time it.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions with --time (the median is reported).")


def naive_logprobs(hidden, unembedding, targets):
    logits = jnp.einsum("btd,dv->btv", hidden, unembedding, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def loss_and_grad(logprob_fn):
    def loss(hidden, unembedding, targets, advantages):  # a policy-gradient-shaped loss
        return -jnp.mean(advantages * logprob_fn(hidden, unembedding, targets))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv) -> None:
    del argv
    batch, dim, vocab = 4, _DIM.value, _VOCAB.value
    length = _TOKENS.value // batch
    shapes = (
        jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, length), jnp.float32),
    )
    variants = {
        "naive log_softmax": loss_and_grad(naive_logprobs),
        f"token_logprobs(chunk_size={_CHUNK.value})": loss_and_grad(
            lambda h, w, t: token_logprobs(h, w, t, chunk_size=_CHUNK.value)),
    }
    logits_gb = batch * length * vocab * 4 / 1e9
    print(f"loss + grad, B*T={batch * length}, D={dim}, V={vocab} "
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
                    jax.random.normal(key[1], shapes[1].shape) / dim**0.5,
                    jax.random.randint(key[2], shapes[2].shape, 0, vocab),
                    jax.random.normal(key[3], shapes[3].shape))
            _, times = time_calls(lambda _, fn=fn, args=args: fn(*args), _REPEATS.value)
            seconds = statistics.median(times)
            flops = 3 * 2 * batch * length * dim * vocab  # logits + 2 backward matmuls
            line += f"   {seconds:6.2f} s   {flops / seconds / 1e9:6.1f} GFLOP/s (of the work needed)"
        print(line)
    naive, chunked = temps.values()
    print(f"  ratio chunked / naive temp = {chunked / naive:.3f} (target <= 0.25)")


if __name__ == "__main__":
    app.run(main)
