"""grpo_jax.profiling.memory_report (what experiments/benchmarks/memory.py prints) on a tiny model: the bytes
it reports are the analytic counts (LoRA adapters r * (in + out) per targeted kernel, AdamW's two moments
each), the reference is a full copy only for full fine-tuning, LoRA's compiled step is smaller, and the depth
extrapolation is exact where memory is linear in depth (the step's arguments: params and optimizer state)."""

import pytest

from grpo_jax import profiling
from grpo_jax.config import GRPOConfig
from grpo_jax.models import ModelConfig
from grpo_jax.update import tree_bytes

D, F, H, KV, V, RANK = 64, 160, 4, 2, 384, 4
HD = D // H
MODEL = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=1, num_heads=H,
                    num_kv_heads=KV, qkv_bias=True, max_position_embeddings=64)


def grpo(rank: int, quantize: str = "") -> GRPOConfig:
    return GRPOConfig.from_dict(dict(
        sampling=dict(group_size=2, max_new_tokens=8, buckets=(8,)), rollout=dict(num_prompts=4),
        loss=dict(beta=0.04), updates=dict(num_minibatches=2, grad_accum_steps=2),
        lora=dict(rank=rank, alpha=8.0, quantize=quantize)))


@pytest.fixture(scope="module")
def reports():
    return {rank: profiling.memory_report(MODEL, grpo(rank), prompt_tokens=8, depths=None)
            for rank in (0, RANK)}


@pytest.mark.slow
def test_trainable_bytes_are_the_analytic_counts_and_the_reference_is_a_copy_only_without_lora(reports):
    full, lora = reports[0], reports[RANK]
    # By hand: every targeted kernel [in, out] gets A [in, r] and B [r, out].
    kernels = [(D, H * HD), (D, KV * HD), (D, KV * HD), (H * HD, D), (D, F), (D, F), (F, D)]
    adapter_params = MODEL.num_layers * sum(RANK * (fan_in + fan_out) for fan_in, fan_out in kernels)
    biases, norms = (H + 2 * KV) * HD, 2 * D
    layer = sum(fan_in * fan_out for fan_in, fan_out in kernels) + biases + norms
    params = 2 * V * D + MODEL.num_layers * layer + D  # embedding, output projection (untied), final norm
    assert (full["params"], full["trainable_params"], lora["trainable_params"]) == (
        params, params, adapter_params)
    f32 = 4  # the model's params and the adapters, and so their moments
    assert lora["adapters"] == f32 * adapter_params
    assert lora["trainable"] == 3 * f32 * adapter_params  # A, B and AdamW's two moments of each
    assert full["trainable"] == 3 * f32 * params
    assert lora["trainable"] / full["trainable"] == pytest.approx(adapter_params / params, rel=1e-12)
    # beta > 0: full fine-tuning keeps a copy of the weights; LoRA's reference is the frozen base.
    assert full["reference"] == full["weights"] == lora["weights"] == f32 * params
    assert lora["reference"] == 0
    for r in (full, lora):
        assert r["held"] == r["weights"] + r["adapters"] + r["optimizer"] + r["reference"]
        assert r["need"] == r["step"]["peak"] + r["reference"]


def test_the_lora_step_compiles_smaller_than_full_fine_tuning(reports):
    full, lora = reports[0], reports[RANK]
    assert full["step_error"] is None and lora["step_error"] is None
    assert lora["step"]["peak"] < full["step"]["peak"]
    assert lora["step"]["arguments"] < full["step"]["arguments"]


@pytest.mark.slow
def test_depth_extrapolation_is_exact_for_what_is_linear_in_depth():
    """The step's arguments (state + minibatch) extrapolated from 1 and 2 layers are a 3-layer model's."""
    model = ModelConfig(**{**MODEL.__dict__, "num_layers": 3})
    report = profiling.memory_report(model, grpo(0), prompt_tokens=8, depths=(1, 2))
    _, state, batch, _, _ = profiling.abstract_train_step(model, grpo(0), prompt_tokens=8)
    # Up to the optimizer's 1-byte `last_finite` flag, which the step never reads (jit drops unused inputs).
    assert 0 <= tree_bytes(state) + tree_bytes(batch) - report["step"]["arguments"] <= 1
    assert 0 <= tree_bytes(state) - report["step"]["aliased"] <= 1  # the donated state


@pytest.mark.slow
def test_qlora_stores_the_targeted_kernels_as_int8_with_a_scale_per_column():
    q, plain = (profiling.memory_report(MODEL, cfg, prompt_tokens=8, depths=None)
                for cfg in (grpo(RANK, "int8"), grpo(RANK)))
    kernels = {"q": (D, H * HD), "k": (D, KV * HD), "v": (D, KV * HD), "o": (H * HD, D), "gate": (D, F),
               "up": (D, F), "down": (F, D)}
    float32_bytes = sum(4 * i * o for i, o in kernels.values())
    int8_bytes = sum(i * o + 4 * o for i, o in kernels.values())  # int8 entries + a float32 scale per column
    assert plain["weights"] - q["weights"] == float32_bytes - int8_bytes
    assert q["trainable"] == plain["trainable"] and q["reference"] == 0 and q["step"]["peak"] > 0
