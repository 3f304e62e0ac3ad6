r"""The group sampler on the benches' tiny model, against decoding without a KV cache and transformers.

  python experiments/benchmarks/sampling.py --repeats=7

A Llama-style model of 4 layers, d_model 256, 4 heads, vocab 512 (`profiling.tiny_model_config`), 8 prompts
x G=8, 64-token prompts, 128 new tokens, temperature 1, no stop tokens: new tokens/s, compile time, time per
token at 64 vs 512 new tokens, and the same work decoded without a KV cache and (when torch and
transformers are importable) by transformers `generate` on the same weights, in the same run.
"""

from __future__ import annotations

import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from grpo_jax import sampling
from grpo_jax.models import Transformer, causal_mask, positions_from_mask, save_hf_checkpoint
from grpo_jax.profiling import time_calls, tiny_model_config
from grpo_jax.sampling import SamplingConfig, sample

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")


def no_cache_decode(model: Transformer, prompt_tokens, prompt_mask, key, cfg: SamplingConfig):
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


def transformers_generate_seconds(model: Transformer, prompts, cfg: SamplingConfig, repeats: int):
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

    def generate(_):  # torch draws its own randomness: the key is unused
        out = hf_model.generate(input_ids, **kwargs)
        assert out.shape == (input_ids.shape[0], input_ids.shape[1] + cfg.max_new_tokens)
        return out

    with torch.inference_mode():
        _, times = time_calls(generate, repeats)  # the first call warms up
    print(f"  (transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    return statistics.median(times)


def main(argv) -> None:
    del argv
    num_prompts, group_size, prompt_len = 8, 8, 64
    rows = num_prompts * group_size
    model = Transformer(tiny_model_config(), nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 512, (num_prompts, prompt_len)).tolist()
    print(f"sampling: tiny model ({model.config.num_params() / 1e6:.1f}M params), {num_prompts} prompts x "
          f"G={group_size}, prompt {prompt_len}, temperature 1, no stop tokens, "
          f"backend={jax.default_backend()}")

    def config(new_tokens):
        return SamplingConfig(max_new_tokens=new_tokens, group_size=group_size, buckets=(prompt_len,))

    results = {}
    for new_tokens in (128, 64, 512):
        cfg = config(new_tokens)
        first, times = time_calls(lambda key, cfg=cfg: sample(model, prompts, key, cfg).tokens,
                                  _REPEATS.value)
        seconds = statistics.median(times)
        results[new_tokens] = seconds
        print(f"  grpo_jax sampler, {new_tokens:3d} new tokens: {seconds:6.3f} s  "
              f"{rows * new_tokens / seconds:8.0f} new tokens/s  {seconds / new_tokens * 1e3:6.2f} ms/step  "
              f"(compile + first call {first:.2f} s)")
    print(f"  time per step at 512 vs 64 new tokens: {results[512] / 512 / (results[64] / 64):.2f}x")

    cfg = config(128)
    tokens, mask = sampling.pad_prompts(prompts, cfg.buckets, cfg.pad_id)
    graphdef, state = nnx.split(model)
    no_cache = jax.jit(
        lambda state, key: no_cache_decode(nnx.merge(graphdef, state), tokens, mask, key, cfg))
    no_cache = no_cache.lower(state, jax.random.PRNGKey(0)).compile()
    # Compiled ahead, so the first call is all run time; one call: it is slow, and its cost is all arithmetic.
    seconds, _ = time_calls(lambda key: no_cache(state, key), 0)
    print(f"  no KV cache (full forward per step), 128 new tokens: {seconds:6.3f} s  "
          f"{rows * 128 / seconds:8.0f} new tokens/s  "
          f"-> KV-cache sampler is {seconds / results[128]:.1f}x faster")
    hf_seconds = transformers_generate_seconds(model, prompts, cfg, _REPEATS.value)
    if hf_seconds is None:
        print("  transformers generate: torch/transformers not importable here, not measured")
    else:
        print(f"  transformers generate, 128 new tokens: {hf_seconds:6.3f} s  {rows * 128 / hf_seconds:8.0f} "
              f"new tokens/s  -> grpo_jax sampler is {hf_seconds / results[128]:.2f}x faster (target >= 2x)")


if __name__ == "__main__":
    app.run(main)
