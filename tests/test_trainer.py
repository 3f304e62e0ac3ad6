"""The GRPO trainer: shared-prefix log-probs, sharded train step, beta/mu/dynamic sampling/overlong/reference
options, non-finite updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import sharding
from grpo_jax.models import ModelConfig, Transformer, causal_mask, positions_from_mask
from grpo_jax.trainer import (
    GRPOConfig,
    Trainer,
    completion_logprobs,
    merge_groups,
    overlong_penalty,
    split_groups,
)

MODEL = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, qkv_bias=True, max_position_embeddings=64)
TARGET = 5


def make_dataset(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_tokens": rng.integers(2, MODEL.vocab_size, rng.integers(2, 7)).tolist(), "id": i}
            for i in range(n)]


def reward_fraction_of_target(examples, completions):
    """Toy verifiable reward: share of completion tokens equal to TARGET."""
    rewards = np.array([np.mean(np.asarray(c) == TARGET) if c else 0.0 for c in completions], np.float32)
    return rewards, {"target_share": rewards}


def make_trainer(mesh=None, model_seed=0, reward_fn=reward_fraction_of_target, dataset=None,
                 model_config=MODEL, **overrides):
    fields = dict(num_prompts=8, group_size=4, max_new_tokens=6, learning_rate=3e-3, prompt_buckets=(8,),
                  stop_tokens=(1,))
    cfg = GRPOConfig(**{**fields, **overrides})
    model = Transformer(model_config, nnx.Rngs(model_seed))
    return Trainer(model, cfg, dataset or make_dataset(), reward_fn, mesh=mesh)


# ----------------------------------------------------------------------------- shared prefix


def test_shared_prefix_logprobs_and_gradients_equal_full_forward():
    model = Transformer(MODEL, nnx.Rngs(1))
    rng = np.random.default_rng(1)
    num_prompts, group, prompt_len, length = 3, 4, 7, 5
    prompt_lengths = np.array([7, 3, 5])
    prompt_mask = np.arange(prompt_len)[None] >= (prompt_len - prompt_lengths)[:, None]
    prompt_tokens = np.where(prompt_mask, rng.integers(2, 32, (num_prompts, prompt_len)), 0)
    completion_lengths = rng.integers(1, length + 1, num_prompts * group)
    completion_mask = np.arange(length)[None] < completion_lengths[:, None]
    completion_tokens = np.where(completion_mask, rng.integers(2, 32, (num_prompts * group, length)), 0)
    weights = jnp.asarray(rng.normal(size=(num_prompts * group, length)) * completion_mask, jnp.float32)
    graphdef, params = nnx.split(model)

    def shared(params):
        m = nnx.merge(graphdef, params)
        return completion_logprobs(m, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask),
                                   jnp.asarray(completion_tokens), jnp.asarray(completion_mask))

    def full(params):  # plain forward over [prompt ; completion] rows, each prompt repeated G times
        m = nnx.merge(graphdef, params)
        rows = np.concatenate([np.repeat(prompt_tokens, group, 0), completion_tokens], axis=1)
        mask = jnp.asarray(np.concatenate([np.repeat(prompt_mask, group, 0), completion_mask], axis=1))
        hidden, _ = m(jnp.asarray(rows), positions_from_mask(mask), causal_mask(mask))
        logits = jnp.einsum("btd,dv->btv", hidden, m.unembedding())
        logp = jax.nn.log_softmax(logits[:, prompt_len - 1:-1])
        return jnp.take_along_axis(logp, jnp.asarray(completion_tokens)[..., None], -1)[..., 0]

    np.testing.assert_allclose(np.where(completion_mask, shared(params), 0),
                               np.where(completion_mask, full(params), 0), atol=2e-5)
    g_shared = jax.grad(lambda p: jnp.sum(shared(p) * weights))(params)
    g_full = jax.grad(lambda p: jnp.sum(full(p) * weights))(params)
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(jnp.abs(b).max())))


# ----------------------------------------------------------------------------- sharding


def fixed_batch(trainer):
    """One rollout's device batch, made on the host so every mesh sees the same numbers."""
    host, _ = trainer._collect(jax.random.key(7))
    return host


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_train_step_equals_single_device(mesh_shape):
    # Adam's first step is lr * g / (|g| + eps): with the default eps, float32 reduction-order noise in a
    # near-zero gradient flips its sign. A larger eps keeps the update a continuous function of g, so the
    # comparison below tests the sharded gradient rather than that noise.
    options = dict(beta=0.04, grad_accum_steps=2, adam_eps=1e-3)
    single = make_trainer(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), **options)
    sharded = make_trainer(sharding.make_mesh(mesh_shape), **options)
    host = fixed_batch(single)
    results = []
    for trainer in (single, sharded):
        batch = trainer._device_batch(host)
        batch["ref_logprobs"] = trainer._logprobs(trainer.ref_params, batch)
        trainer.state, metrics = trainer._train_step(trainer.state, batch)  # the old state is donated
        results.append((jax.device_get(trainer.state.params), jax.device_get(metrics)))
    (params_1, metrics_1), (params_n, metrics_n) = results
    assert metrics_1["loss"] == pytest.approx(metrics_n["loss"], rel=1e-4, abs=1e-6)
    assert metrics_1["grad_norm"] == pytest.approx(metrics_n["grad_norm"], rel=1e-4)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_n), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The parameters really are split: FSDP over "fsdp", heads/MLP over "tensor".
    kernel = sharded.state.params["layers"][0]["mlp"]["gate"]["kernel"][...]  # [embed=32, mlp=64]
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (32 // mesh_shape[1], 64 // mesh_shape[2])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_equals_the_whole_minibatch(aggregation):
    """Microbatches with unequal token counts (and an empty row) weighted by their share of the aggregation's
    denominator: the same gradient and update as one pass over the whole minibatch."""
    host = fixed_batch(make_trainer())
    host["mask"] = host["mask"].copy()
    host["mask"][:4] = False  # the first prompt's whole group (in microbatch 1 of 2) has no tokens ...
    host["mask"][4, 1:] = False  # ... and the next row one token, so the microbatches differ in size
    by_prompt = host["mask"].reshape(8, 4, -1)  # microbatch j of 2 holds prompts j, j + 2, j + 4, j + 6
    assert by_prompt[0::2].sum() != by_prompt[1::2].sum()
    results, ref_logprobs = [], []
    for steps in (1, 2, 4):
        trainer = make_trainer(grad_accum_steps=steps, aggregation=aggregation, beta=0.04, adam_eps=1e-3)
        batch = trainer._device_batch(host)
        batch["ref_logprobs"] = trainer._logprobs(trainer.ref_params, batch)  # also in microbatches
        ref_logprobs.append(np.where(host["mask"], jax.device_get(batch["ref_logprobs"]), 0.0))
        trainer.state, metrics = trainer._train_step(trainer.state, batch)
        results.append((jax.device_get(trainer.state.params), jax.device_get(metrics)))
    np.testing.assert_allclose(ref_logprobs[1], ref_logprobs[0], atol=1e-6)
    np.testing.assert_allclose(ref_logprobs[2], ref_logprobs[0], atol=1e-6)
    (params_1, metrics_1), *split = results
    for params_k, metrics_k in split:
        assert metrics_k["grad_norm"] == pytest.approx(metrics_1["grad_norm"], rel=1e-5)
        assert metrics_k["loss"] == pytest.approx(metrics_1["loss"], rel=1e-5, abs=1e-7)
        for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_k), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_split_groups_is_strided_and_merge_groups_inverts_it():
    x = jnp.arange(8 * 3 * 2).reshape(8 * 3, 2)  # 8 prompts x 3 rows each
    parts = split_groups(x, 4, 3)
    assert parts.shape == (4, 6, 2)
    np.testing.assert_array_equal(parts[1], np.concatenate([x[3:6], x[15:18]]))  # prompts 1 and 5
    np.testing.assert_array_equal(merge_groups(parts, 3), x)


def test_microbatches_are_split_without_moving_data_between_devices():
    """On a data-parallel mesh every device holds its share of each microbatch: the compiled train step
    only all-reduces (gradients, metrics), it never gathers or permutes the batch."""
    trainer = make_trainer(sharding.make_mesh((2, 1, 1), devices=jax.devices()[:2]), grad_accum_steps=2)
    batch = trainer._device_batch(fixed_batch(trainer))
    hlo = trainer._train_step.lower(trainer.state, batch).compile().as_text()
    assert "all-reduce" in hlo
    for collective in ("all-gather", "all-to-all", "collective-permute"):
        assert collective not in hlo, collective


def test_rollout_mesh_samples_on_its_own_layout_with_the_same_results():
    """Training on one device, sampling data-parallel over eight: the same completions and updates as
    sampling where training runs, and the sampled policy really is laid out on the rollout mesh."""
    one_device = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rollout_mesh = sharding.make_mesh((8, 1, 1))
    plain = make_trainer(one_device)
    split = Trainer(Transformer(MODEL, nnx.Rngs(0)), plain.cfg, make_dataset(), reward_fraction_of_target,
                    mesh=one_device, rollout_mesh=rollout_mesh)
    kernel = nnx.split(split.rollout_model())[1]["layers"][0]["mlp"]["gate"]["kernel"][...]
    assert kernel.sharding.mesh == rollout_mesh and len(kernel.sharding.device_set) == 8
    for _ in range(2):
        metrics = [trainer.iteration() for trainer in (plain, split)]
        np.testing.assert_array_equal(plain.last_rollout["tokens"], split.last_rollout["tokens"])
        assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5, abs=1e-7)
    for a, b in zip(jax.tree.leaves(jax.device_get(plain.state.params)),
                    jax.tree.leaves(jax.device_get(split.state.params)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="prompts cannot be split"):
        Trainer(Transformer(MODEL, nnx.Rngs(0)), dataclasses.replace(plain.cfg, num_prompts=4),
                make_dataset(), reward_fraction_of_target, mesh=one_device, rollout_mesh=rollout_mesh)


# ----------------------------------------------------------------------------- options


def test_beta_zero_runs_no_reference_and_holds_no_reference_params():
    trainer = make_trainer(beta=0.0)
    metrics = trainer.iteration()
    assert trainer.ref_params is None
    assert trainer.counters["reference_forward"] == 0
    assert "kl" not in metrics
    with_ref = make_trainer(beta=0.04)
    metrics = with_ref.iteration()
    assert with_ref.counters["reference_forward"] == 1 and metrics["kl"] >= 0.0


def test_bfloat16_compute_and_remat_run_whole_iterations_like_float32():
    """The TPU/GPU settings (bfloat16 compute, remat) through sampling, reference forward and update on CPU:
    the same sampled tokens' log-probs as float32 within bfloat16 precision, and the same kind of update."""
    low = make_trainer(beta=0.04, model_config=dataclasses.replace(MODEL, dtype="bfloat16", remat=True))
    high = make_trainer(beta=0.04)
    batch = low._device_batch(fixed_batch(low))
    got, want = low._logprobs(low.state.params, batch), high._logprobs(high.state.params, batch)
    mask = np.asarray(batch["completion_mask"])
    assert got.dtype == jnp.float32 and mask.sum() > 0
    np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, want, 0), atol=0.05)
    low.state, step_low = low._train_step(low.state, {**batch, "ref_logprobs": got})  # donates the state
    _, step_high = high._train_step(high.state, {**batch, "ref_logprobs": want})
    assert float(step_low["grad_norm"]) == pytest.approx(float(step_high["grad_norm"]), rel=0.05)
    metrics = low.iteration()  # bfloat16 sampling too
    assert all(np.isfinite(metrics[name]) for name in ("loss", "grad_norm", "kl"))
    assert metrics["skipped_updates"] == 0.0 and metrics["completion_length_mean"] > 0


def test_mu_two_second_epoch_moves_ratio_and_clips():
    trainer = make_trainer(mu=2, learning_rate=5e-2)
    metrics = [trainer.iteration() for _ in range(2)]
    assert trainer.counters["policy_forward"] == 2  # old log-probs once per batch
    # Epoch 1 of each batch: ratio exactly 1 (no update yet); epoch 2: the policy moved and clipping engages.
    assert all(m["clip_fraction_last_epoch"] > 0 for m in metrics)
    first = make_trainer(mu=1, learning_rate=5e-2).iteration()
    assert first["clip_fraction"] == 0.0 and first["ratio_max"] == pytest.approx(1.0)


def test_learns_the_toy_task():
    trainer = make_trainer(learning_rate=1e-2)
    rewards = [trainer.iteration()["reward_mean"] for _ in range(12)]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3


def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    # Reward 1 only for prompts with an even id: odd-id groups are all-zero (degenerate) whatever is sampled;
    # even-id groups vary because the completions differ.
    def reward(examples, completions):
        rewards = np.array([float(e["id"] % 2 == 0 and TARGET in c)
                            for e, c in zip(examples, completions, strict=True)], np.float32)
        return rewards, {"hits": rewards, "errors/hits": 1}

    trainer = make_trainer(dynamic_sampling=True, max_resample_rounds=6, reward_fn=reward, temperature=1.5)
    host, info = trainer._collect(jax.random.key(0))
    groups = host["rewards"].reshape(8, 4)
    assert all(g.max() > g.min() for g in groups)
    assert info["prompts_sampled"] > 8 and info["resample_rounds"] >= 1
    assert all(e["id"] % 2 == 0 for e in host["examples"])
    # Per-completion reward metrics describe the kept groups; per-call counts add up over the rounds.
    assert info["reward_metrics"]["hits"] == pytest.approx(host["rewards"].mean())
    assert info["reward_metrics"]["errors/hits"] == info["resample_rounds"] + 1
    plain = make_trainer(reward_fn=reward, temperature=1.5)
    host, _ = plain._collect(jax.random.key(0))
    assert any(g.max() == g.min() for g in host["rewards"].reshape(8, 4))


def test_overlong_penalty_matches_dapo_eq_13_in_tokens():
    max_len, buffer = 20, 4
    lengths = np.array([1, 16, 17, 18, 20, 21])
    want = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]  # ((L_max - L_cache) - |y|) / L_cache, -1 past L_max
    np.testing.assert_allclose(overlong_penalty(lengths, max_len, buffer), want)
    # In the trainer: no stop tokens -> every completion truncated at 6 tokens -> penalty -1 each.
    trainer = make_trainer(overlong_buffer=2, stop_tokens=(), reward_fn=lambda e, c: np.zeros(len(c)))
    host, _ = trainer._collect(jax.random.key(0))
    np.testing.assert_allclose(host["rewards"], -1.0)
    np.testing.assert_allclose(host["task_rewards"], 0.0)


def test_mask_truncated_removes_truncated_completions_from_the_loss():
    trainer = make_trainer(mask_truncated=True, stop_tokens=())
    host, _ = trainer._collect(jax.random.key(0))
    assert host["truncated"].all()
    batch = trainer._device_batch(host)
    assert not bool(batch["completion_mask"].any())


def test_iterative_reference_update_resets_at_the_right_steps():
    trainer = make_trainer(beta=0.04, ref_update_every=2)
    initial = jax.device_get(trainer.ref_params)

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    trainer.iteration()  # step 1: reference untouched
    assert same(trainer.ref_params, initial)
    assert not same(trainer.state.params, initial)
    trainer.iteration()  # step 2: reference <- policy
    assert same(trainer.ref_params, trainer.state.params)
    after_reset = jax.device_get(trainer.ref_params)
    trainer.iteration()  # step 3: untouched again
    assert same(trainer.ref_params, after_reset) and not same(trainer.state.params, after_reset)


def test_non_finite_update_is_skipped_and_counted():
    trainer = make_trainer()
    host, _ = trainer._collect(jax.random.key(0))
    batch = trainer._device_batch(host)
    batch["advantages"] = batch["advantages"].at[0].set(jnp.nan)
    before = jax.device_get(trainer.state.params)
    state, metrics = trainer._train_step(trainer.state, batch)
    assert float(metrics["skipped_updates"]) == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="GRPOConfig.num_minibatches=3"):
        GRPOConfig(num_prompts=8, num_minibatches=3)
    with pytest.raises(ValueError, match="GRPOConfig.grad_accum_steps=3"):
        GRPOConfig(num_prompts=8, grad_accum_steps=3)
    with pytest.raises(ValueError, match="GRPOConfig.loss_type='ppo'"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="GRPOConfig.overlong_buffer=200"):
        GRPOConfig(max_new_tokens=128, overlong_buffer=200)
