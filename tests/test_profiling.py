"""grpo_jax.profiling, the benches' measuring tools: FLOP counts agree with each other and the limits time
what they say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import profiling
from grpo_jax.config import GRPOConfig
from grpo_jax.models import ModelConfig

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_layers=3, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)


def test_decode_matmul_shapes_are_the_forward_flops_without_attention():
    """One decode step's weight matmuls (q/k/v and gate/up fused, the head last) add up to the forward FLOPs
    of one token with no attention context."""
    shapes = profiling.decode_matmul_shapes(CFG)
    assert len(shapes) == 4 * CFG.num_layers + 1 and shapes[-1] == (32, 96)
    assert shapes[0] == (32, 8 * (4 + 2 * 2)) and shapes[2] == (32, 160)
    assert sum(2 * a * b for a, b in shapes) == profiling.forward_flops(CFG, tokens=1, context=0)
    with_context = profiling.forward_flops(CFG, tokens=1, context=10)
    assert with_context - profiling.forward_flops(CFG, 1, 0) == 3 * 2 * 2 * 4 * 8 * 10  # q k^T and weights v


def test_grpo_work_counts_the_prompt_once_per_group_and_the_update_three_times():
    work = profiling.grpo_work_flops(CFG, prompts=2, group=4, prompt_len=8, new_tokens=6, beta=0.0)
    prompt = profiling.forward_flops(CFG, 2 * 8, 4)
    completions = profiling.forward_flops(CFG, 8 * 6, 8 + 3)
    assert work == {"sampling": prompt + completions, "reference": 0.0, "update": 3 * (prompt + completions)}
    assert profiling.grpo_work_flops(CFG, 2, 4, 8, 6, beta=0.04)["reference"] == prompt + completions


def test_time_calls_and_the_limits_measure_real_work():
    keys = []
    first, times = profiling.time_calls(lambda key: keys.append(key) or jnp.ones(3), repeats=3)
    assert len(times) == 3 and first >= 0 and all(t >= 0 for t in times)
    assert len({int(jax.random.key_data(k)[-1]) for k in keys}) == 4  # a fresh key per call
    small = profiling.matmul_limit_seconds(8, [(64, 64)] * 4, repeats=3)
    large = profiling.matmul_limit_seconds(256, [(512, 512)] * 16, repeats=3)
    assert 0 < small < large  # 1024x the FLOPs take longer, whatever the machine
    roofline = profiling.Roofline()
    roofline.measure(calls=2)
    assert len(roofline.rates) == 2 and roofline.best >= roofline.median > 0
    assert "GFLOP/s median" in str(roofline)


@pytest.mark.parametrize("rows", [1, 64])
def test_decode_shapes_of_smollm2_give_its_published_parameter_count(rows):
    """SmolLM2-135M's shapes (from its GGUF metadata): its weight matmuls hold its 134.5M parameters (the
    tied head counted once), 17.2 GFLOP a decode step at 64 rows."""
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, tie_word_embeddings=True, max_position_embeddings=8192)
    shapes = profiling.decode_matmul_shapes(cfg)
    weights = sum(a * b for a, b in shapes)
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    assert weights + norms == cfg.num_params()
    np.testing.assert_allclose(2 * rows * weights, rows * 2 * 134.5e6, rtol=0.01)


def test_bench_config_is_the_benches_work_with_the_sections_given():
    """The benches' shared GRPOConfig: their work in its fields, extra sampling fields and whole sections
    added; their model and reward."""
    cfg = profiling.bench_config(8, 4, 16, 32, 2, sampling=dict(vocab_limit=100), loss=dict(beta=0.04))
    s = cfg.sampling
    assert (cfg.rollout.num_prompts, s.group_size, s.buckets, s.max_new_tokens,
            cfg.updates.grad_accum_steps) == (8, 4, (16,), 32, 2)
    assert (s.vocab_limit, cfg.loss.beta, cfg.optimizer.learning_rate) == (100, 0.04, 1e-5)
    assert profiling.bench_config(8, 4, 16, 32, 2).loss.beta == GRPOConfig().loss.beta  # a default
    assert profiling.tiny_model_config().num_layers == 4
    assert profiling.tiny_model_config(num_layers=2).num_layers == 2
    np.testing.assert_array_equal(profiling.bench_reward(None, ["ab", "abc", "abcd"]), [2, 0, 1])
