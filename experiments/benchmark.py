r"""grpo_jax benchmarks: one absl entry point, one `--bench` per measurement.

  python experiments/benchmark.py --bench=logprobs_memory
  python experiments/benchmark.py --bench=sampling

logprobs_memory: compiled temp memory (XLA's memory analysis, nothing is run) of loss + grad through
  `token_logprobs` versus the naive full-vocabulary `log_softmax`, at Qwen2.5-0.5B's vocabulary and width.
  With --time, also runs both and reports the median wall time of loss + grad.
sampling: the group sampler on a tiny Llama-style model (4 layers, d_model 256, 4 heads, vocab 512),
  8 prompts x G=8, 64-token prompts, 128 new tokens, temperature 1, no stop tokens: new tokens/s, compile
  time, time per token at 64 vs 512 new tokens, and the same work decoded without a KV cache and (when
  torch and transformers are importable) by transformers `generate` on the same weights, in the same run.
grpo_iteration: whole GRPO iterations (sample + rewards + reference + update) on the sampler benchmark's
  model and work (8 prompts x G=8, 64-token prompts, exactly 128 new tokens, temperature 1, mu=1), at
  beta=0 and beta=0.04: median seconds per iteration, the split, and GFLOP/s of the FLOPs the work needs
  (prompt once per group) against the measured f32 matmul roofline: the median iteration against the
  median matmul call, and the fastest iteration against the fastest call. The update runs on one device;
  sampling runs there and, on a CPU, also data-parallel over one CPU device per core (Trainer's
  `rollout_mesh`), both reported.
turns: the overhead of turns. GRPO iterations on the sampler benchmark's model (8 prompts x G=8, 64-token
  prompts) over 4-turn episodes of an environment that answers every turn with a 16-token observation
  (turns of at most 32 tokens, ending at a stop token drawn ~10% of the time per token), against iterations
  sampling the same number of tokens per row (the episodes' mean length, policy and observation tokens) as
  one turn without stop tokens: median seconds per iteration and its sampling part, the decode steps each
  ran (a turn runs until its longest episode stops), and the roofline limit of the one-turn work. Six
  untimed iterations first compile the shapes later turns use (their row and length buckets vary).
roofline: the f32 matmul roofline alone (--calls timed 2048 x 2048 matmuls, 50 by default), e.g. under
  `taskset`.
train_step: one jitted GRPO update (forward + backward + AdamW) of a ~20M-parameter model on 8 prompts x
  G=8 with 64 + 128 tokens: median seconds and achieved GFLOP/s against the roofline.
memory: device memory of GRPO on Qwen2.5-0.5B / 1.5B / 7B shapes (--models), full fine-tuning against LoRA
  (--lora_rank, every projection targeted): bytes held between steps (weights, adapters, optimizer state,
  reference copy at beta > 0), the LoRA / full trainable-state ratio, and XLA's compiled peak of one train
  step at the gsm8k config's minibatch (experiments/configs/gsm8k_qwen2_5_0_5b.py; --prompt_tokens,
  --new_tokens change its lengths), with bfloat16 params (--param_dtype) and the config's bfloat16 compute
  and remat, against a 16 GiB and a 24 GiB device. Everything is abstract (jax.eval_shape,
  ShapeDtypeStruct): no weight is allocated or read, the step is compiled for this backend and never run.
  The step is compiled at 2 and 3 layers and extrapolated to the model's depth (--full_depth compiles it
  whole). On a CPU the peak approximates an accelerator's: XLA's CPU backend fuses less (e.g. the
  attention softmax) and never rematerializes to fit a memory limit, as the GPU and TPU compilers do.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from grpo_jax import lora as lora_lib
from grpo_jax import profiling, sampling, sharding, token_logprobs
from grpo_jax import update as update_lib
from grpo_jax.config import SECTIONS, GRPOConfig
from grpo_jax.models import ModelConfig, Transformer, causal_mask, positions_from_mask, save_hf_checkpoint
from grpo_jax.multiturn import EpisodeSampler
from grpo_jax.profiling import Roofline, grpo_work_flops, time_calls
from grpo_jax.sampling import SamplingConfig, sample
from grpo_jax.tokenizers import CharTokenizer
from grpo_jax.trainer import Trainer

_BENCH = flags.DEFINE_enum("bench", "logprobs_memory",
                           ["logprobs_memory", "sampling", "grpo_iteration", "train_step", "roofline",
                            "memory", "turns"],
                           "Which benchmark to run.")
_VOCAB = flags.DEFINE_integer("vocab", 151936, "logprobs_memory: vocabulary size V.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "logprobs_memory: tokens B * T (as B=4 sequences).")
_DIM = flags.DEFINE_integer("dim", 896, "logprobs_memory: hidden width D.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "logprobs_memory: token_logprobs chunk_size.")
_TIME = flags.DEFINE_bool("time", False, "logprobs_memory: also run loss + grad and time it.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")
_CALLS = flags.DEFINE_integer("calls", 50, "roofline: timed calls of the 2048 x 2048 matmul.")
_GRAD_ACCUM = flags.DEFINE_integer(
    "grad_accum_steps", 8, "grpo_iteration, train_step: microbatches per update (the same work and the same "
    "update, see trainer.train_step; smaller microbatches stay in the CPU's caches).")
_MICROBATCHES = flags.DEFINE_integer(
    "microbatches", 0, "memory: microbatches per update (grad_accum_steps; 0: the gsm8k config's). Smaller "
    "microbatches, the same update: the activations and attention scores shrink with them.")
_MODELS = flags.DEFINE_list("models", ["0.5B", "1.5B", "7B"], "memory: Qwen2.5 sizes, of 0.5B, 1.5B, 7B.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 16, "memory: LoRA rank compared with full fine-tuning.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float32"],
                                 "memory: storage dtype of the model's params (the adapters are float32).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 0, "memory: prompt length P (0: the gsm8k config's).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 0, "memory: completion length T (0: the gsm8k config's).")
_FULL_DEPTH = flags.DEFINE_bool(
    "full_depth", False, "memory: compile the train step at the model's whole depth instead of at 2 and 3 "
    "layers extrapolated (minutes per compile; on a CPU, XLA's scheduler may then run every layer's "
    "recomputation ahead of the backward pass, which inflates the peak).")


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


def tiny_config(**overrides) -> ModelConfig:
    """The sampler benchmark's model: 4 layers, d_model 256, 4 heads, vocab 512 (~3.3M parameters)."""
    fields = dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                  num_kv_heads=4, max_position_embeddings=2048)
    return ModelConfig(**{**fields, **overrides})


def _no_cache_decode(model: Transformer, prompt_tokens, prompt_mask, key, cfg: SamplingConfig):
    """Baseline: every step re-runs the full forward over prompt + completion so far (no KV cache)."""
    batch, prompt_len = prompt_tokens.shape[0] * cfg.group_size, prompt_tokens.shape[1]
    tokens = jnp.repeat(prompt_tokens, cfg.group_size, axis=0)
    tokens = jnp.pad(tokens, ((0, 0), (0, cfg.max_new_tokens)))
    mask = jnp.pad(jnp.repeat(prompt_mask, cfg.group_size, axis=0), ((0, 0), (0, cfg.max_new_tokens)))
    unembedding = model.unembedding()

    def step(t, carry):
        tokens, mask = carry
        hidden, _ = model(tokens, positions_from_mask(mask), causal_mask(mask))
        last = jax.lax.dynamic_index_in_dim(hidden, prompt_len + t - 1, axis=1, keepdims=False)
        logits = jnp.dot(last, unembedding, preferred_element_type=jnp.float32)
        token, _ = sampling.next_token(logits, jax.random.fold_in(key, t), cfg)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, prompt_len + t))
        mask = jax.lax.dynamic_update_slice(mask, jnp.ones((batch, 1), bool), (0, prompt_len + t))
        return tokens, mask

    return jax.lax.fori_loop(0, cfg.max_new_tokens, step, (tokens, mask))[0][:, prompt_len:]


def _transformers_generate_seconds(model: Transformer, prompts, cfg: SamplingConfig, repeats: int):
    """Median seconds of transformers `generate` on the same weights and work, or None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as directory:
        save_hf_checkpoint(model, directory)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    input_ids = torch.tensor(np.repeat(np.asarray(prompts), cfg.group_size, axis=0), dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=cfg.temperature,
                  top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens,
                  pad_token_id=0, eos_token_id=None)
    times = []
    with torch.inference_mode():
        hf_model.generate(input_ids, **kwargs)  # warm up
        for _ in range(repeats):
            start = time.perf_counter()
            out = hf_model.generate(input_ids, **kwargs)
            times.append(time.perf_counter() - start)
    assert out.shape == (input_ids.shape[0], input_ids.shape[1] + cfg.max_new_tokens)
    print(f"  (transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    return statistics.median(times)


def bench_sampling() -> None:
    num_prompts, group_size, prompt_len = 8, 8, 64
    model = Transformer(tiny_config(), nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 512, (num_prompts, prompt_len)).tolist()
    print(f"sampling: tiny model ({model.config.num_params() / 1e6:.1f}M params), {num_prompts} prompts x "
          f"G={group_size}, prompt {prompt_len}, temperature 1, no stop tokens, "
          f"backend={jax.default_backend()}")

    def run(new_tokens):
        cfg = SamplingConfig(max_new_tokens=new_tokens, group_size=group_size, buckets=(prompt_len,))
        return cfg, lambda key: sample(model, prompts, key, cfg).tokens

    results = {}
    for new_tokens in (128, 64, 512):
        cfg, fn = run(new_tokens)
        first, times = time_calls(fn, _REPEATS.value)
        seconds = statistics.median(times)
        results[new_tokens] = seconds
        rows = num_prompts * group_size
        print(f"  grpo_jax sampler, {new_tokens:3d} new tokens: {seconds:6.3f} s  "
              f"{rows * new_tokens / seconds:8.0f} new tokens/s  {seconds / new_tokens * 1e3:6.2f} ms/step  "
              f"(compile + first call {first:.2f} s)")
    print(f"  time per step at 512 vs 64 new tokens: {results[512] / 512 / (results[64] / 64):.2f}x")

    cfg, _ = run(128)
    tokens, mask = sampling.pad_prompts(prompts, cfg.buckets, cfg.pad_id)
    graphdef, state = nnx.split(model)
    no_cache = jax.jit(
        lambda state, key: _no_cache_decode(nnx.merge(graphdef, state), tokens, mask, key, cfg))
    no_cache = no_cache.lower(state, jax.random.PRNGKey(0)).compile()
    start = time.perf_counter()  # one call: it is slow, and its cost is all arithmetic
    jax.block_until_ready(no_cache(state, jax.random.PRNGKey(1)))
    seconds = time.perf_counter() - start
    rows = num_prompts * group_size
    print(f"  no KV cache (full forward per step), 128 new tokens: {seconds:6.3f} s  "
          f"{rows * 128 / seconds:8.0f} new tokens/s  "
          f"-> KV-cache sampler is {seconds / results[128]:.1f}x faster")
    hf_seconds = _transformers_generate_seconds(model, prompts, cfg, _REPEATS.value)
    if hf_seconds is None:
        print("  transformers generate: torch/transformers not importable here, not measured")
    else:
        print(f"  transformers generate, 128 new tokens: {hf_seconds:6.3f} s  {rows * 128 / hf_seconds:8.0f} "
              f"new tokens/s  -> grpo_jax sampler is {hf_seconds / results[128]:.2f}x faster (target >= 2x)")


def _constant_reward(examples, completions):
    return np.asarray([len(c) % 3 for c in completions], np.float32)  # cheap, varied within groups


def _rollout_devices() -> int:
    """One CPU device per core for grpo_iteration's rollout (a divisor of its 8 prompts)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(d for d in (1, 2, 4, 8) if d <= cores)


def bench_grpo_iteration() -> None:
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
            cfg = GRPOConfig.from_dict(dict(
                sampling=dict(group_size=group_size, max_new_tokens=new_tokens, buckets=(prompt_len,)),
                rollout=dict(num_prompts=num_prompts), loss=dict(beta=beta),
                optimizer=dict(learning_rate=1e-5), updates=dict(grad_accum_steps=_GRAD_ACCUM.value)))
            trainer = Trainer(Transformer(tiny_config(), nnx.Rngs(0)), cfg, dataset, _constant_reward,
                              mesh=train_mesh, rollout_mesh=rollout_mesh)
            trainer.iteration()  # compile
            runs = [trainer.iteration() for _ in range(_REPEATS.value)]
            flops = grpo_work_flops(trainer.model_config, num_prompts, group_size, prompt_len, new_tokens,
                                    beta)
            results[layout, beta] = runs, flops
            roofline.measure()
    print(f"grpo_iteration: tiny model, {num_prompts} prompts x G={group_size}, prompt {prompt_len}, "
          f"{new_tokens} new tokens, mu=1, update on one device in {_GRAD_ACCUM.value} microbatches, "
          f"{jax.default_backend()}; {roofline}")
    keys = ("time_sampling", "time_rewards", "time_reference", "time_update")
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


class _ObservingEnv:
    """Every turn is answered with the same 8-character observation, until the episode runs out of turns."""

    def reset(self, example):
        return None

    def step(self, completion):
        return "12345678", 0.1 * (len(completion) % 3), False


def bench_turns() -> None:
    num_prompts, group_size, prompt_len, turns, turn_tokens = 8, 8, 64, 4, 32
    tokenizer = CharTokenizer()
    roofline = Roofline()
    roofline.measure()
    rng = np.random.default_rng(0)
    dataset = [{"prompt_tokens": rng.integers(4, 100, prompt_len).tolist()} for _ in range(64)]
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    common = dict(rollout=dict(num_prompts=num_prompts), optimizer=dict(learning_rate=1e-5),
                  updates=dict(grad_accum_steps=_GRAD_ACCUM.value))
    multi = GRPOConfig.from_dict(dict(
        sampling=dict(group_size=group_size, max_new_tokens=turn_tokens, buckets=(prompt_len,),
                      stop_tokens=tuple(range(4, 14)), vocab_limit=tokenizer.vocab_size),
        env=dict(max_turns=turns, max_observation_tokens=16, observation_template="<r>{observation}</r>"),
        **common))
    trainer = Trainer(Transformer(tiny_config(), nnx.Rngs(0)), multi, dataset, None, mesh=mesh,
                      episodes=EpisodeSampler(_ObservingEnv, tokenizer))
    for _ in range(6):  # compile: later turns' row and length buckets vary between iterations
        trainer.iteration()
    multi_runs, lengths, steps = [], [], []
    for _ in range(_REPEATS.value):
        multi_runs.append(trainer.iteration())
        sequence = sharding.to_host(trainer.last_rollout.sample.sequence_mask)
        lengths.append(sequence.sum(1).mean())
        # Each turn decodes until its longest episode stops: its decode steps are the turn's longest.
        by_turn = {}
        for row in range(sequence.shape[0]):
            episode_turns = _turn_lengths(trainer.last_rollout.mask[row], sequence[row])
            for t, n in enumerate(episode_turns):
                by_turn[t] = max(by_turn.get(t, 0), n)
        steps.append(sum(by_turn.values()))
    roofline.measure()
    tokens = int(round(statistics.median(lengths)))
    single = GRPOConfig.from_dict(dict(
        sampling=dict(group_size=group_size, max_new_tokens=tokens, buckets=(prompt_len,),
                      vocab_limit=tokenizer.vocab_size), **common))
    trainer = Trainer(Transformer(tiny_config(), nnx.Rngs(0)), single, dataset, _constant_reward, mesh=mesh)
    trainer.iteration()  # compile
    single_runs = [trainer.iteration() for _ in range(_REPEATS.value)]
    roofline.measure()
    flops = sum(grpo_work_flops(trainer.model_config, num_prompts, group_size, prompt_len, tokens,
                                0.0).values())
    limit = flops / roofline.median / 1e9
    keys = ("time_sampling", "time_rewards", "time_reference", "time_update")
    print(f"turns: tiny model, {num_prompts} prompts x G={group_size}, prompt {prompt_len}, "
          f"{jax.default_backend()}; {roofline}")
    print(f"  {turns}-turn episodes: {statistics.median(lengths):.1f} tokens per episode (median of "
          f"{len(lengths)} iterations), {statistics.median(steps):.0f} decode steps per iteration")
    for name, runs in ((f"{turns} turns", multi_runs), (f"1 turn of {tokens} tokens", single_runs)):
        total = statistics.median(sum(r[k] for k in keys) for r in runs)
        sampling_time = statistics.median(r["time_sampling"] for r in runs)
        print(f"  {name}: {total:.3f} s/iteration (median of {len(runs)}), sampling {sampling_time:.3f} s, "
              f"update {statistics.median(r['time_update'] for r in runs):.3f} s; {total / limit:.2f}x the "
              f"roofline limit of the one-turn work ({flops / 1e9:.0f} GFLOP, {limit:.3f} s)")


def _turn_lengths(policy: np.ndarray, sequence: np.ndarray) -> list[int]:
    """The lengths of the runs of policy tokens in one episode's row (its turns)."""
    policy = policy[:int(sequence.sum())].astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], policy, [0]])))  # starts and ends of the runs
    return (edges[1::2] - edges[0::2]).tolist()


def bench_train_step() -> None:
    cfg = ModelConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
                      num_kv_heads=8, max_position_embeddings=1024)
    num_prompts, group_size, prompt_len, new_tokens = 8, 8, 64, 128
    roofline = Roofline()
    roofline.measure()
    rng = np.random.default_rng(0)
    dataset = [{"prompt_tokens": rng.integers(1, 2048, prompt_len).tolist()} for _ in range(8)]
    grpo = GRPOConfig.from_dict(dict(
        sampling=dict(group_size=group_size, max_new_tokens=new_tokens, buckets=(prompt_len,)),
        rollout=dict(num_prompts=num_prompts), optimizer=dict(learning_rate=1e-5),
        updates=dict(grad_accum_steps=_GRAD_ACCUM.value)))
    trainer = Trainer(Transformer(cfg, nnx.Rngs(0)), grpo, dataset, _constant_reward)
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

# Qwen2.5's shapes, from each checkpoint's config.json (only shapes matter here: no weight is made or read).
QWEN2_5 = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
               num_kv_heads=4, tie_word_embeddings=False),
}
GIB = 2**30
# XLA's CPU scheduler by default orders the program for parallelism, keeping buffers alive that an
# accelerator's memory-aware scheduler frees (remat then saves nothing); the bench compiles with the
# memory-minimising schedule instead, so a CPU compile approximates a TPU/GPU one.
CPU_MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
CHIPS = {"16 GiB (TPU v5e)": 16 * GIB, "24 GiB (GPU)": 24 * GIB}


def qwen2_5_config(size: str, *, param_dtype: str = "bfloat16", dtype: str = "bfloat16",
                   remat: bool = True) -> ModelConfig:
    """The ModelConfig of Qwen2.5-`size` (0.5B, 1.5B, 7B): qkv bias, RoPE theta 1e6, head_dim = D / heads."""
    return ModelConfig(**QWEN2_5[size], qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, param_dtype=param_dtype, dtype=dtype, remat=remat)


def gsm8k_setup(lora_rank: int = 0, quantize: str = "") -> tuple[GRPOConfig, int]:
    """The GRPOConfig of experiments/configs/gsm8k_qwen2_5_0_5b.py (config.lora.rank = `lora_rank`) and its
    prompt length: min(max_prompt_tokens, the largest bucket). The tokenizer's fields keep their defaults
    (vocab_limit 0: the whole vocabulary)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from configs import gsm8k_qwen2_5_0_5b

    config = gsm8k_qwen2_5_0_5b.get_config()
    sections = {name: config[name].to_dict() for name in SECTIONS}
    sections["lora"]["rank"] = lora_rank
    sections["lora"]["quantize"] = quantize
    if _MICROBATCHES.value:
        sections["updates"]["grad_accum_steps"] = _MICROBATCHES.value
    grpo = GRPOConfig.from_dict({**sections, "algo": config.algo, "num_steps": config.num_steps,
                                 "seed": config.seed})
    return grpo, min(config.max_prompt_tokens, max(grpo.sampling.buckets))


def _abstract_step(model_cfg: ModelConfig, grpo: GRPOConfig, prompt_tokens: int):
    """The Trainer's jitted train step and its abstract arguments (shapes only): (step, state, minibatch,
    params, ref_params)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))))
    optimizer = update_lib.make_optimizer(grpo.optimizer, grpo.optimizer_updates())
    options = grpo.step_options()
    key = jax.eval_shape(lambda: jax.random.key(grpo.seed))
    if grpo.lora.enabled:
        trained = jax.eval_shape(lambda p, k: lora_lib.init_adapters(p, grpo.lora, k), params, key)
        base = params
        if grpo.lora.quantize:  # QLoRA: the frozen kernels as int8 + a scale per column
            base = jax.eval_shape(functools.partial(lora_lib.quantize_base, cfg=grpo.lora), params)
    else:
        trained, base = params, None
    state = update_lib.TrainState(trained, jax.eval_shape(optimizer.init, trained), base=base)
    ref_params = params if grpo.loss.beta and base is None else None

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
                                     loss_fn=grpo.default_loss(), options=options), donate_argnums=0)
    return step, state, batch, params, ref_params


def _step_memory(model_cfg: ModelConfig, grpo: GRPOConfig, prompt_tokens: int):
    """(`update.compiled_memory` of the train step or None, the error that stopped it or None, seconds)."""
    step, state, batch, _, _ = _abstract_step(model_cfg, grpo, prompt_tokens)
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
    _, state, batch, params, ref_params = _abstract_step(model_cfg, grpo, prompt_tokens)
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


def _size(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n else "0"


def bench_memory() -> None:
    full_cfg, prompt_tokens = gsm8k_setup(0)
    lora_cfg, _ = gsm8k_setup(_LORA_RANK.value)
    qlora_cfg, _ = gsm8k_setup(_LORA_RANK.value, "int8")
    if _NEW_TOKENS.value:
        full_cfg, lora_cfg, qlora_cfg = (dataclasses.replace(c, sampling=dataclasses.replace(
            c.sampling, max_new_tokens=_NEW_TOKENS.value)) for c in (full_cfg, lora_cfg, qlora_cfg))
    prompt_tokens = _PROMPT_TOKENS.value or prompt_tokens
    depths = None if _FULL_DEPTH.value else (2, 3)
    s, u = full_cfg.sampling, full_cfg.updates
    print(f"memory: GRPO device memory, full fine-tuning vs LoRA (and QLoRA) rank {_LORA_RANK.value} (alpha "
          f"{lora_cfg.lora.alpha:g}, targets {','.join(lora_cfg.lora.targets)}); AdamW, beta="
          f"{full_cfg.loss.beta:g}; {_PARAM_DTYPE.value} params (the LoRA adapters too), bfloat16 compute, "
          f"remat.\nOne train step of the gsm8k config: {full_cfg.rollout.num_prompts // u.num_minibatches} "
          f"prompts x G={s.group_size}, {prompt_tokens} prompt + {s.max_new_tokens} new tokens, in "
          f"{u.grad_accum_steps} microbatches; compiled for {jax.default_backend()} on abstract shapes "
          "(nothing allocated or run), " + ("at the whole depth." if depths is None else
                                            "at 2 and 3 layers, extrapolated linearly to the model's depth.")
          + " GiB = 2^30 bytes.")
    total = time.perf_counter()
    for size in _MODELS.value:
        model_cfg = qwen2_5_config(size, param_dtype=_PARAM_DTYPE.value)
        reports = [memory_report(model_cfg, c, prompt_tokens, depths=depths)
                   for c in (full_cfg, lora_cfg, qlora_cfg)]
        full, lora, qlora = reports
        print(f"\nQwen2.5-{size} ({full['params'] / 1e9:.2f}B params, {model_cfg.num_layers} layers), "
              f"microbatch {full['microbatch_rows']} rows:")
        print(f"  {'':42s} {'full FT':>11s} {f'LoRA r={_LORA_RANK.value}':>11s} {'QLoRA int8':>11s}")

        def row(name, *values):
            print(f"  {name:42s} " + " ".join(f"{v:>11s}" for v in values))

        def step(report, part):
            return "n/a" if report["step"] is None else _size(report["step"][part])

        row("policy weights (LoRA: the frozen base)", *(_size(r["weights"]) for r in reports))
        row("LoRA adapters", "-", _size(lora["adapters"]), _size(qlora["adapters"]))
        row("optimizer state (AdamW moments)", *(_size(r["optimizer"]) for r in reports))
        row(f"reference params (beta={full_cfg.loss.beta:g})", *(_size(r["reference"]) for r in reports))
        row("held between steps", *(_size(r["held"]) for r in reports))
        row("trainable state (trained params + moments)", *(_size(r["trainable"]) for r in reports))
        for part in ("arguments", "outputs", "temporaries", "aliased"):
            row(f"  train step {part}", *(step(r, part) for r in reports))
        row("train step peak (compiled)", *(step(r, "peak") for r in reports))
        row("peak + reference", *("n/a" if r["need"] is None else _size(r["need"]) for r in reports))
        for chip, capacity in CHIPS.items():
            row(f"fits {chip}", *("n/a" if r["need"] is None else "yes" if r["need"] <= capacity else "no"
                                  for r in reports))
        row("compile time", *(f"{r['compile_seconds']:.1f} s" for r in reports))
        for name, r in zip(("full FT", "LoRA", "QLoRA"), reports, strict=True):
            if r["step_error"]:
                print(f"  {name}: the train step does not compile: {r['step_error'][:300]}")
        print(f"  LoRA trainable state / full fine-tuning's: {lora['trainable'] / full['trainable']:.2%} of "
              f"the bytes (target <= 2%), {lora['trainable_params'] / full['trainable_params']:.2%} of the "
              f"parameters ({lora['trainable_params'] / 1e6:.1f}M)")
    print("\nfits: peak + reference <= the chip's memory, with no allowance for the runtime's own "
          "reservation or the sampler's KV cache. QLoRA: the frozen targeted kernels as int8 with a "
          "scale per column, dequantized inside the step. "
          f"Total {time.perf_counter() - total:.0f} s.")


def bench_roofline() -> None:
    roofline = Roofline()
    roofline.rates = profiling.matmul_calls(_CALLS.value)
    print(f"{jax.default_backend()}: {roofline}")


def main(argv) -> None:
    del argv
    benches = {"logprobs_memory": bench_logprobs_memory, "sampling": bench_sampling,
               "grpo_iteration": bench_grpo_iteration, "train_step": bench_train_step,
               "roofline": bench_roofline, "memory": bench_memory, "turns": bench_turns}
    if _BENCH.value == "grpo_iteration":  # before the backend starts: one CPU device per core
        jax.config.update("jax_num_cpu_devices", _rollout_devices())
    if _BENCH.value == "memory":  # before the backend starts: see CPU_MEMORY_FLAG
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_MEMORY_FLAG}".strip()
    benches[_BENCH.value]()


if __name__ == "__main__":
    app.run(main)
