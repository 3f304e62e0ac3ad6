r"""One jitted GRPO update (forward + backward + AdamW) of a ~20M-parameter model.

  python experiments/benchmarks/train_step.py --repeats=5

8 prompts x G=8 with 64 + 128 tokens: median seconds and achieved GFLOP/s against the f32 matmul roofline.
"""

from __future__ import annotations

import statistics

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.profiling import Roofline, bench_config, bench_reward, grpo_work_flops, time_calls
from grpo_jax.trainer import Trainer

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed updates (the median is reported).")
_GRAD_ACCUM = flags.DEFINE_integer(
    "grad_accum_steps", 8, "Microbatches per update (the same work and the same update, see "
    "trainer.train_step; smaller microbatches stay in the CPU's caches).")


def main(argv) -> None:
    del argv
    cfg = ModelConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
                      num_kv_heads=8, max_position_embeddings=1024)
    num_prompts, group_size, prompt_len, new_tokens = 8, 8, 64, 128
    roofline = Roofline()
    roofline.measure()
    rng = np.random.default_rng(0)
    dataset = [{"prompt_tokens": rng.integers(1, 2048, prompt_len).tolist()} for _ in range(8)]
    grpo = bench_config(num_prompts, group_size, prompt_len, new_tokens, _GRAD_ACCUM.value)
    trainer = Trainer(Transformer(cfg, nnx.Rngs(0)), grpo, dataset, bench_reward)
    batch = trainer.batch(trainer.collect(jax.random.key(0)))

    def step(_):
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
        return metrics["loss"]

    _, times = time_calls(step, _REPEATS.value)
    seconds = statistics.median(times)
    roofline.measure()
    flops = grpo_work_flops(cfg, num_prompts, group_size, prompt_len, new_tokens, 0.0)["update"]
    rate = flops / seconds / 1e9
    print(f"train_step: {cfg.num_params() / 1e6:.1f}M params, {num_prompts} prompts x G={group_size}, "
          f"{prompt_len} + {new_tokens} tokens, {_GRAD_ACCUM.value} microbatches; {roofline}")
    print(f"  {seconds:.3f} s/step (median of {_REPEATS.value}), work {flops / 1e9:.0f} GFLOP -> "
          f"{rate:.0f} GFLOP/s = {rate / roofline.median:.0%} of the median roofline, "
          f"{rate / roofline.best:.0%} of the best call (target >= 50%)")


if __name__ == "__main__":
    app.run(main)
