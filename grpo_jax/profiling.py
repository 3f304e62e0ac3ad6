"""Timing against the machine's own limits: the benchmarks' shared measuring tools, public for users' own.

  roofline      `Roofline`: f32 matmul GFLOP/s sampled before, between and after the timed work (2048^2, the
                rate a large square matmul reaches: the compute ceiling of the machine at that moment)
  shape limit   `matmul_limit_seconds`: the time the matmuls of a piece of work take alone, at their own
                shapes, with distinct weights (as a decode step reads them): what that work could take if
                nothing but its matmuls ran
  work          `forward_flops` / `grpo_work_flops` / `decode_matmul_shapes`: the FLOPs a model's work needs
  timing        `time_calls`: first call (compilation included) and the median of further calls
  memory        `memory_report` / `abstract_train_step`: device memory of GRPO on a model's shapes (bytes held
                between steps, XLA's compiled peak of one train step), all abstract: nothing allocated or run
  bench work    `tiny_model_config` / `bench_config` / `bench_reward`: the model, GRPOConfig and reward the
                benches in experiments/benchmarks/ share

Times on a shared machine drift: compare medians measured in one run, and state the roofline with them.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import sharding
from grpo_jax import update as update_lib
from grpo_jax.config import GRPOConfig
from grpo_jax.models import ModelConfig, Transformer


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
    call gets a fresh PRNG key, made before the clock starts (only the call is timed); the result is waited
    for."""
    keys = jax.block_until_ready([jax.random.PRNGKey(i) for i in range(repeats + 1)])
    times = []
    for key in keys:
        start = time.perf_counter()
        jax.block_until_ready(fn(key))
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


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


def tiny_model_config(**overrides) -> ModelConfig:
    """The benches' tiny Llama-style model: 4 layers, d_model 256, 4 heads, vocab 512 (~4.5M parameters);
    `overrides` replace fields."""
    fields = dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                  num_kv_heads=4, max_position_embeddings=2048)
    return ModelConfig(**{**fields, **overrides})


def bench_config(num_prompts: int, group_size: int, prompt_len: int, new_tokens: int, grad_accum_steps: int,
                 *, sampling: dict | None = None, **sections: dict) -> GRPOConfig:
    """The benches' GRPOConfig: `num_prompts` prompts x `group_size` completions of `new_tokens` tokens,
    prompts in one bucket of `prompt_len` tokens, AdamW at learning rate 1e-5, `grad_accum_steps`
    microbatches per update, every other field its default. `sampling` adds fields to that section; other
    sections (e.g. loss=dict(beta=0.04), env=...) are passed whole."""
    return GRPOConfig.from_dict(dict(
        sampling=dict(group_size=group_size, max_new_tokens=new_tokens, buckets=(prompt_len,),
                      **(sampling or {})),
        rollout=dict(num_prompts=num_prompts), optimizer=dict(learning_rate=1e-5),
        updates=dict(grad_accum_steps=grad_accum_steps), **sections))


def bench_reward(examples, completions) -> np.ndarray:
    """The benches' reward: cheap to compute and varied within groups (a completion's length mod 3)."""
    return np.asarray([len(c) % 3 for c in completions], np.float32)


def abstract_train_step(model_cfg: ModelConfig, grpo: GRPOConfig, prompt_tokens: int):
    """(step, state, minibatch, params, ref_params): the Trainer's jitted `update.train_step` (donating the
    state) for `model_cfg` under `grpo`, and its arguments as shapes only (jax.eval_shape: nothing
    allocated), the minibatch made by `prepare_batch` / `minibatch` from a rollout of `prompt_tokens`-token
    prompts. `params` are the model's, `ref_params` the reference copy full fine-tuning keeps at beta > 0
    (else None)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))))
    optimizer, critic_optimizer = update_lib.make_optimizers(grpo)
    options = grpo.step_options()
    key = jax.eval_shape(lambda: jax.random.key(grpo.seed))
    # The Trainer's own state initialiser, on one device: the memory of one device's whole state.
    one_device = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state, ref_params = update_lib.abstract_train_state(params, grpo, one_device, optimizer=optimizer,
                                                        critic_optimizer=critic_optimizer)

    spec = jax.ShapeDtypeStruct
    s, n = grpo.sampling, grpo.rollout.num_prompts
    rows, length = n * s.group_size, s.max_new_tokens
    rollout = dict(prompt_tokens=spec((n, prompt_tokens), jnp.int32),
                   prompt_mask=spec((n, prompt_tokens), jnp.bool_),
                   completion_tokens=spec((rows, length), jnp.int32),
                   completion_mask=spec((rows, length), jnp.bool_),
                   sample_logprobs=spec((rows, length), jnp.float32),
                   truncated=spec((rows,), jnp.bool_), rewards=spec((rows,), jnp.float32))
    # The batch's shapes do not depend on remat; without it prepare_batch also traces when its log-prob
    # passes run in several parts (lax.map over a model merged outside it).
    no_remat = nnx.split(nnx.eval_shape(lambda: Transformer(dataclasses.replace(model_cfg, remat=False),
                                                            nnx.Rngs(0))))[0]
    batch = jax.eval_shape(functools.partial(update_lib.prepare_batch, graphdef=no_remat, options=options),
                           state, ref_params, rollout)
    if grpo.updates.num_minibatches > 1:
        batch = jax.eval_shape(functools.partial(update_lib.minibatch, options=options), batch, key,
                               spec((), jnp.int32))
    step = jax.jit(functools.partial(update_lib.train_step, graphdef=graphdef, optimizer=optimizer,
                                     loss_fn=grpo.default_loss(), options=options,
                                     critic_optimizer=critic_optimizer), donate_argnums=0)
    return step, state, batch, params, ref_params


def _step_memory(model_cfg: ModelConfig, grpo: GRPOConfig, prompt_tokens: int):
    """(`update.compiled_memory` of the train step or None, the error that stopped it or None, seconds)."""
    step, state, batch, _, _ = abstract_train_step(model_cfg, grpo, prompt_tokens)
    start = time.perf_counter()
    try:
        return update_lib.compiled_memory(step, state, batch), None, time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - reported in place of the peak; the bytes held stand on their own
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}", time.perf_counter() - start


def memory_report(model_cfg: ModelConfig, grpo: GRPOConfig, prompt_tokens: int, *,
                  depths: tuple[int, int] | None = (2, 3)) -> dict:
    """Device memory of GRPO on `model_cfg` under `grpo` (full fine-tuning at config.lora.rank=0, else
    LoRA), all abstract: shapes only, nothing allocated or run.

    Bytes held between steps: `weights` (the policy's params; under LoRA the frozen base), `adapters`,
    `optimizer` (AdamW's state: `moments` + its counters) and `reference` (the copy of the weights a
    full fine-tuning run keeps at beta > 0; 0 under LoRA, whose reference is the base). `trainable` =
    trained params + their moments.

    `step`: `update.compiled_memory` of one jitted `update.train_step` (donating the state, as the Trainer
    does) on one minibatch, rollout.num_prompts / num_minibatches prompts of `prompt_tokens` tokens x G
    completions of max_new_tokens, in grad_accum_steps microbatches, made by the library's `prepare_batch`
    and `minibatch` from a rollout's shapes. With `depths` (d1, d2), the step is compiled at d1 and d2
    layers, every other dimension as it is, and each figure extrapolated linearly to the model's depth
    (layers are alike: each adds its params, optimizer state and saved activations); `depths=None`
    compiles the whole depth. Not (1, 2): a 1-layer step is scheduled unlike a deeper one. On a CPU the
    whole depth is also not the better figure: XLA's CPU scheduler may run every layer's recomputation
    (remat) ahead of the backward pass (seen under LoRA at Qwen2.5-0.5B's 24 layers: 103 GiB against 15 GiB
    extrapolated). `need` = the step's peak + the reference, which stays on the device beside it.
    """
    _, state, batch, params, ref_params = abstract_train_step(model_cfg, grpo, prompt_tokens)
    layers = model_cfg.num_layers
    if depths is None or layers <= max(depths):
        peak, error, seconds = _step_memory(model_cfg, grpo, prompt_tokens)
    else:
        (low, error_low, t_low), (high, error_high, t_high) = (
            _step_memory(dataclasses.replace(model_cfg, num_layers=d), grpo, prompt_tokens) for d in depths)
        error, seconds = error_low or error_high, t_low + t_high
        peak = None if error else {k: round(low[k] + (high[k] - low[k]) * (layers - depths[0])
                                            / (depths[1] - depths[0])) for k in low}

    tree_bytes = update_lib.tree_bytes
    trained = state.params
    moments = tree_bytes([x for x in jax.tree.leaves(state.opt_state) if x.ndim])  # not the 0-d counters
    weights = params if state.base is None else state.base  # QLoRA: the int8 kernels and their scales
    report = dict(weights=tree_bytes(weights), adapters=tree_bytes(trained) if state.base is not None else 0,
                  optimizer=tree_bytes(state.opt_state), moments=moments, reference=tree_bytes(ref_params),
                  trainable=tree_bytes(trained) + moments,
                  trainable_params=sum(x.size for x in jax.tree.leaves(trained)),
                  params=sum(x.size for x in jax.tree.leaves(params)), step=peak, step_error=error,
                  compile_seconds=seconds, minibatch_prompts=batch["prompt_tokens"].shape[0],
                  microbatch_rows=batch["completion_tokens"].shape[0] // grpo.updates.grad_accum_steps)
    report["held"] = sum(report[k] for k in ("weights", "adapters", "optimizer", "reference"))
    report["need"] = None if peak is None else peak["peak"] + report["reference"]
    return report
