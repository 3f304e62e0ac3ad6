"""LoRA: adapters start as the base model, their gradient is the full gradient restricted to them, the base
is the reference (no copy), the sampler runs on the trained weights, and checkpoints hold the adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_trainer import MODEL, make_trainer

from grpo_jax import lora
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.models import Transformer
from grpo_jax.policy import batch_logprobs, completion_logprobs
from grpo_jax.trainer import train

LORA = dict(rank=4, alpha=8.0)


def test_adapters_start_as_the_base_model_and_cover_exactly_the_targets():
    params = nnx.split(Transformer(MODEL, nnx.Rngs(0)))[1]
    cfg = lora.LoRAConfig(rank=4, targets=("q", "v", "down"))
    adapters = lora.init_adapters(params, cfg, jax.random.key(0))
    assert sorted(adapters) == sorted(f"layers.{i}.{p}" for i in range(MODEL.num_layers)
                                      for p in ("attn.q", "attn.v", "mlp.down"))
    q = params["layers"][0]["attn"]["q"]["kernel"][...]
    assert adapters["layers.0.attn.q"]["a"].shape == (q.shape[0], 4)
    assert adapters["layers.0.attn.q"]["b"].shape == (4, q.shape[1])
    merged = lora.merge(params, adapters, cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(a, b)  # B = 0: the adapted policy is the base, exactly


@pytest.mark.slow
def test_the_adapter_gradient_is_the_full_gradient_restricted_to_the_adapters():
    """d/dA and d/dB of the loss through W + s A B equal s G B^T and s A^T G, G = dLoss/dW at the merged
    weights: a LoRA update is the full update projected onto the adapters."""
    graphdef, params = nnx.split(Transformer(MODEL, nnx.Rngs(0)))
    cfg = lora.LoRAConfig(rank=3, alpha=6.0)
    adapters = lora.init_adapters(params, cfg, jax.random.key(1))
    keys = jax.random.split(jax.random.key(2), len(adapters))
    adapters = {name: {"a": ab["a"], "b": 0.1 * jax.random.normal(k, ab["b"].shape)}  # B != 0
                for (name, ab), k in zip(adapters.items(), keys, strict=True)}
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(2, 32, (2, 5)))
    completion = jnp.asarray(rng.integers(2, 32, (4, 6)))
    weights = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)

    def loss(p):
        logprobs = completion_logprobs(nnx.merge(graphdef, p), prompt, jnp.ones_like(prompt, bool),
                                       completion, jnp.ones_like(completion, bool))
        return jnp.sum(weights * logprobs)

    merged = lora.merge(params, adapters, cfg)
    full = jax.jit(jax.grad(loss))(merged)  # compiled, not op by op: seconds
    adapter_grads = jax.jit(jax.grad(lambda ad: loss(lora.merge(params, ad, cfg))))(adapters)
    for name, grads in adapter_grads.items():
        _, layer, block, projection = name.split(".")
        g = full["layers"][int(layer)][block][projection]["kernel"][...]
        a, b = adapters[name]["a"], adapters[name]["b"]
        # Two computation orders of one float32 gradient: an entry that nearly cancels is compared at the
        # scale of its array, not its own.
        for got, want in ((grads["a"], cfg.scale * g @ b.T), (grads["b"], cfg.scale * a.T @ g)):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * float(np.abs(want).max()),
                                       err_msg=name)


@pytest.mark.slow
def test_under_lora_the_reference_is_the_frozen_base_with_no_copy_and_sampling_uses_the_adapted_weights():
    trainer = make_trainer(beta=0.04, mu=2, num_minibatches=2, learning_rate=3e-2, **LORA)
    untrained = nnx.split(Transformer(MODEL, nnx.Rngs(0)))[1]
    assert trainer.ref_params is None and trainer.state_bytes()["ref_params"] == 0
    full = make_trainer(beta=0.04, mu=2, num_minibatches=2)
    adapters_and_moments = trainer.state_bytes()["params"] + trainer.state_bytes()["opt_state"]
    assert adapters_and_moments < 0.25 * (full.state_bytes()["params"] + full.state_bytes()["opt_state"])
    for _ in range(3):
        metrics = trainer.iteration()
        # The sampler's log-probs are the training forward's: it samples from the merged adapters.
        assert metrics["rollout_kl"] < 1e-7 and metrics["rollout_logprob_diff_max"] < 1e-4
    assert metrics["kl"] > 0  # the policy moved away from the reference
    # The base never moved, and the reference log-probs are the untrained model's.
    for a, b in zip(jax.tree.leaves(untrained), jax.tree.leaves(trainer.state.base), strict=True):
        np.testing.assert_array_equal(a, b)
    batch = trainer.batch(trainer.collect(jax.random.key(5)))
    o = trainer.cfg.step_options()
    expected = batch_logprobs(untrained, trainer.graphdef, batch, group_size=o.group_size)
    np.testing.assert_allclose(batch["ref_logprobs"], expected, atol=1e-5)
    # The policy did move: its weights differ from the base's on the adapted kernels only.
    policy = nnx.split(trainer.policy())[1]
    q = policy["layers"][0]["attn"]["q"]["kernel"][...]
    assert float(jnp.abs(q - untrained["layers"][0]["attn"]["q"]["kernel"][...]).max()) > 1e-4
    np.testing.assert_array_equal(policy["embed"][...], untrained["embed"][...])


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["", "int8"])
def test_a_lora_checkpoint_holds_the_adapters_alone_and_resumes_exactly(tmp_path, quantize):
    lora_fields = {**LORA, "quantize": quantize}
    straight = make_trainer(beta=0.04, learning_rate=3e-2, num_steps=3, **lora_fields)
    train(straight, tmp_path / "straight", 3, checkpoint_every=1, print_fn=lambda _: None)
    first = make_trainer(beta=0.04, learning_rate=3e-2, num_steps=3, **lora_fields)
    train(first, tmp_path / "resumed", 2, checkpoint_every=1, print_fn=lambda _: None)
    with Checkpointer(tmp_path / "resumed" / "checkpoints") as checkpoints:
        stored = checkpoints.stored_paths(2)
    assert {path.split("/")[0] for path in stored} == {"params", "opt_state", "rng"}  # no base, no reference
    assert {path.split("/")[1] for path in stored if path.startswith("params/")} == set(first.state.params)
    resumed = make_trainer(beta=0.04, learning_rate=3e-2, num_steps=3, **lora_fields)
    train(resumed, tmp_path / "resumed", 3, checkpoint_every=1, print_fn=lambda _: None)
    pairs = zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params), strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fields, message", [
    (dict(rank=-1), "config.lora.rank=-1"),
    (dict(rank=4, alpha=0.0), "config.lora.alpha=0.0"),
    (dict(rank=4, targets=("qkv",)), "config.lora.targets=('qkv',)"),
    (dict(rank=0, quantize="int8"), "config.lora.quantize=.int8. needs config.lora.rank > 0"),
    (dict(rank=4, quantize="nf4"), "config.lora.quantize=.nf4."),
])
def test_lora_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lora.LoRAConfig(**fields)


@pytest.mark.slow
def test_qlora_holds_the_base_as_int8_its_reference_is_the_dequantized_base_and_it_trains():
    trainer = make_trainer(beta=0.04, learning_rate=3e-2, quantize="int8", **LORA)
    plain = make_trainer(beta=0.04, learning_rate=3e-2, **LORA)
    untrained = nnx.split(Transformer(MODEL, nnx.Rngs(0)))[1]
    is_kernel = lambda x: isinstance(x, lora.Int8Kernel)  # noqa: E731
    kernels = [x for x in jax.tree.leaves(trainer.state.base, is_leaf=is_kernel) if is_kernel(x)]
    assert len(kernels) == 7 * MODEL.num_layers and all(k.q.dtype == jnp.int8 for k in kernels)
    assert trainer.state_bytes()["base"] < 0.5 * plain.state_bytes()["base"]  # float32 kernels -> int8
    # The dequantized base is the model within the int8 rounding (half a step of each column's scale).
    dequantized = lora.dequantize(trainer.state.base)
    q = dequantized["layers"][0]["attn"]["q"]["kernel"][...]
    w = untrained["layers"][0]["attn"]["q"]["kernel"][...]
    assert 0 < float(jnp.abs(q - w).max()) <= float(jnp.abs(w).max(axis=0).max()) / 127 / 2 * 1.001
    for _ in range(3):
        metrics = trainer.iteration()
        assert metrics["rollout_kl"] < 1e-7 and metrics["rollout_logprob_diff_max"] < 1e-4
    assert metrics["kl"] > 0 and np.isfinite(metrics["loss"])
    batch = trainer.batch(trainer.collect(jax.random.key(5)))
    o = trainer.cfg.step_options()
    dequantized = lora.dequantize(trainer.state.base)  # the train step donates the state: read it again
    np.testing.assert_array_equal(dequantized["layers"][0]["attn"]["q"]["kernel"][...], q)  # never moved
    expected = batch_logprobs(dequantized, trainer.graphdef, batch, group_size=o.group_size)
    np.testing.assert_allclose(batch["ref_logprobs"], expected, atol=1e-5)
