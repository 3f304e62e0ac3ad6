r"""Whole GRPO iterations (sample + rewards + reference + update) on the benches' tiny model.

  python experiments/benchmarks/grpo_iteration.py --repeats=7

The sampler bench's model and work (8 prompts x G=8, 64-token prompts, exactly 128 new tokens, temperature 1,
mu=1), at beta=0 and beta=0.04: median seconds per iteration, the split, and GFLOP/s of the FLOPs the work
needs (prompt once per group) against the measured f32 matmul roofline: the median iteration against the
median matmul call, and the fastest iteration against the fastest call. The update runs on one device;
sampling runs there and, on a CPU, also data-parallel over one CPU device per core (Trainer's
`rollout_mesh`), both reported.
"""

from __future__ import annotations

import os
import statistics

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from grpo_jax import sharding
from grpo_jax.models import Transformer
from grpo_jax.profiling import Roofline, bench_config, bench_reward, grpo_work_flops, tiny_model_config
from grpo_jax.trainer import Trainer

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed iterations (the median is reported).")
_GRAD_ACCUM = flags.DEFINE_integer(
    "grad_accum_steps", 8, "Microbatches per update (the same work and the same update, see "
    "trainer.train_step; smaller microbatches stay in the CPU's caches).")


def rollout_devices() -> int:
    """One CPU device per core for the rollout (a divisor of the bench's 8 prompts)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(d for d in (1, 2, 4, 8) if d <= cores)


def main(argv) -> None:
    del argv
    jax.config.update("jax_num_cpu_devices", rollout_devices())  # before the backend starts
    num_prompts, group_size, prompt_len, new_tokens = 8, 8, 64, 128
    roofline = Roofline()
    roofline.measure()
    rng = np.random.default_rng(0)
    dataset = [{"prompt_tokens": rng.integers(1, 512, prompt_len).tolist()} for _ in range(64)]
    train_mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    layouts = {"sampling on the training device": None}
    if len(jax.devices()) > 1:
        layouts[f"sampling data-parallel over {len(jax.devices())} devices"] = sharding.make_mesh((-1, 1, 1))
    results = {}
    for layout, rollout_mesh in layouts.items():
        for beta in (0.0, 0.04):
            cfg = bench_config(num_prompts, group_size, prompt_len, new_tokens, _GRAD_ACCUM.value,
                               loss=dict(beta=beta))
            trainer = Trainer(Transformer(tiny_model_config(), nnx.Rngs(0)), cfg, dataset, bench_reward,
                              mesh=train_mesh, rollout_mesh=rollout_mesh, time_stages=True)
            trainer.iteration()  # compile
            runs = [trainer.iteration() for _ in range(_REPEATS.value)]
            flops = grpo_work_flops(trainer.model_config, num_prompts, group_size, prompt_len, new_tokens,
                                    beta)
            results[layout, beta] = runs, flops
            roofline.measure()
    print(f"grpo_iteration: tiny model, {num_prompts} prompts x G={group_size}, prompt {prompt_len}, "
          f"{new_tokens} new tokens, mu=1, update on one device in {_GRAD_ACCUM.value} microbatches, "
          f"{jax.default_backend()}; {roofline}")
    keys = ("time_sampling", "time_rewards", "time_reference", "time_update")  # each stage timed alone
    for (layout, beta), (runs, flops) in results.items():
        split = {k: statistics.median(r[k] for r in runs) for k in keys}
        totals = [sum(r[k] for k in keys) for r in runs]
        total, fastest = statistics.median(totals), min(totals)
        needed = sum(flops.values())
        print(f"  {layout}, beta={beta}: {total:.3f} s/iteration (median of {len(runs)}, fastest "
              f"{fastest:.3f} s)  " + "  ".join(f"{k[5:]} {v:.3f} s" for k, v in split.items()))
        limit, strict_limit = needed / roofline.median / 1e9, needed / roofline.best / 1e9
        print(f"    work needs {needed / 1e9:.0f} GFLOP -> {needed / total / 1e9:.0f} GFLOP/s = "
              f"{needed / total / 1e9 / roofline.median:.0%} of the median roofline; limit {limit:.2f} s "
              f"-> {total / limit:.2f}x the limit (target <= 2x); fastest run vs the best roofline call: "
              f"{fastest / strict_limit:.2f}x")
        print("    " + "  ".join(f"{stage} {flops[stage] / split[f'time_{stage}'] / 1e9:.0f} GFLOP/s"
                                 for stage in ("sampling", "update")))


if __name__ == "__main__":
    app.run(main)
