"""The GRPO loop's stages: shared-prefix log-probs, sharded train step, beta/mu/dynamic sampling/overlong/
reference options, non-finite updates, the rollout/training mismatch and host transfers."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import sharding
from grpo_jax.config import SECTIONS, GRPOConfig
from grpo_jax.models import ModelConfig, Transformer, causal_mask, positions_from_mask
from grpo_jax.policy import completion_logprobs, merge_groups, split_groups
from grpo_jax.rewards import overlong_penalty
from grpo_jax.trainer import Trainer

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


FIELDS = dict(num_prompts=8, group_size=4, max_new_tokens=6, learning_rate=3e-3, buckets=(8,),
              stop_tokens=(1,))


def make_config(**fields) -> GRPOConfig:
    """A GRPOConfig from field names, each placed in the one section that has it (algo, num_steps and seed
    are top-level)."""
    nested = {name: {} for name in SECTIONS}
    for field, value in fields.items():
        owners = [name for name, section in SECTIONS.items()
                  if field in {f.name for f in dataclasses.fields(section)}]
        assert len(owners) <= 1, (field, owners)
        if owners:
            nested[owners[0]][field] = value
        else:
            nested[field] = value
    return GRPOConfig.from_dict({k: v for k, v in nested.items() if v != {}})


def make_trainer(mesh=None, model_seed=0, reward_fn=reward_fraction_of_target, dataset=None,
                 model_config=MODEL, **overrides):
    cfg = make_config(**{**FIELDS, **overrides})
    model = Transformer(model_config, nnx.Rngs(model_seed))
    return Trainer(model, cfg, dataset or make_dataset(), reward_fn, mesh=mesh)


# ----------------------------------------------------------------------------- shared prefix


@pytest.mark.slow
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

    # Compiled, not op by op: the same comparison in seconds.
    np.testing.assert_allclose(np.where(completion_mask, jax.jit(shared)(params), 0),
                               np.where(completion_mask, jax.jit(full)(params), 0), atol=2e-5)
    g_shared = jax.jit(jax.grad(lambda p: jnp.sum(shared(p) * weights)))(params)
    g_full = jax.jit(jax.grad(lambda p: jnp.sum(full(p) * weights)))(params)
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(jnp.abs(b).max())))


# ----------------------------------------------------------------------------- sharding


def fixed_rollout(trainer):
    """One rollout, to be placed on every mesh with the same numbers."""
    return trainer.collect(jax.random.key(7))


def with_mask(rollout, mask):
    """The rollout with another completion mask (host copy and device arrays)."""
    return rollout._replace(mask=mask, sample=rollout.sample._replace(mask=jnp.asarray(mask)))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_train_step_equals_single_device(mesh_shape):
    # Adam's first step is lr * g / (|g| + eps): with the default eps, float32 reduction-order noise in a
    # near-zero gradient flips its sign. A larger eps keeps the update a continuous function of g, so the
    # comparison below tests the sharded gradient rather than that noise.
    options = dict(beta=0.04, grad_accum_steps=2, adam_eps=1e-3)
    single = make_trainer(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), **options)
    sharded = make_trainer(sharding.make_mesh(mesh_shape), **options)
    rollout = fixed_rollout(single)
    results = []
    for trainer in (single, sharded):
        batch = trainer.batch(rollout)
        assert "ref_logprobs" in batch
        trainer.state, metrics = trainer.train_step(trainer.state, batch)  # the old state is donated
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


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_equals_the_whole_minibatch(aggregation):
    """Microbatches with unequal token counts (and an empty row) weighted by their share of the aggregation's
    denominator: the same gradient and update as one pass over the whole minibatch."""
    rollout = fixed_rollout(make_trainer())
    mask = rollout.mask.copy()
    mask[:4] = False  # the first prompt's whole group (in microbatch 1 of 2) has no tokens ...
    mask[4, 1:] = False  # ... and the next row one token, so the microbatches differ in size
    by_prompt = mask.reshape(8, 4, -1)  # microbatch j of 2 holds prompts j, j + 2, j + 4, j + 6
    assert by_prompt[0::2].sum() != by_prompt[1::2].sum()
    rollout = with_mask(rollout, mask)
    results, ref_logprobs = [], []
    for steps in (1, 2, 4):
        trainer = make_trainer(grad_accum_steps=steps, aggregation=aggregation, beta=0.04, adam_eps=1e-3)
        batch = trainer.batch(rollout)  # the reference log-probs, also in microbatches
        ref_logprobs.append(np.where(mask, jax.device_get(batch["ref_logprobs"]), 0.0))
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
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


@pytest.mark.slow
def test_microbatches_are_split_without_moving_data_between_devices():
    """On a data-parallel mesh every device holds its share of each microbatch: the compiled train step
    only all-reduces (gradients, metrics), it never gathers or permutes the batch."""
    trainer = make_trainer(sharding.make_mesh((2, 1, 1), devices=jax.devices()[:2]), grad_accum_steps=2)
    batch = trainer.batch(fixed_rollout(trainer))
    hlo = trainer.train_step.lower(trainer.state, batch).compile().as_text()
    assert "all-reduce" in hlo
    for collective in ("all-gather", "all-to-all", "collective-permute"):
        assert collective not in hlo, collective


@pytest.mark.slow
def test_rollout_mesh_samples_on_its_own_layout_with_the_same_results():
    """Training on one device, sampling data-parallel over eight: the same completions and updates as
    sampling where training runs, and the sampled policy really is laid out on the rollout mesh."""
    one_device = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rollout_mesh = sharding.make_mesh((8, 1, 1))
    plain = make_trainer(one_device)
    split = Trainer(Transformer(MODEL, nnx.Rngs(0)), plain.cfg, make_dataset(), reward_fraction_of_target,
                    mesh=one_device, rollout_mesh=rollout_mesh)
    kernel = nnx.split(split.policy(rollout_mesh))[1]["layers"][0]["mlp"]["gate"]["kernel"][...]
    assert kernel.sharding.mesh == rollout_mesh and len(kernel.sharding.device_set) == 8
    for _ in range(2):
        metrics = [trainer.iteration() for trainer in (plain, split)]
        np.testing.assert_array_equal(plain.last_rollout.tokens, split.last_rollout.tokens)
        assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5, abs=1e-7)
    for a, b in zip(jax.tree.leaves(jax.device_get(plain.state.params)),
                    jax.tree.leaves(jax.device_get(split.state.params)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="prompts cannot be split"):
        Trainer(Transformer(MODEL, nnx.Rngs(0)), make_config(**{**FIELDS, "num_prompts": 4}),
                make_dataset(), reward_fraction_of_target, mesh=one_device, rollout_mesh=rollout_mesh)


# ----------------------------------------------------------------------------- options


@pytest.mark.slow
def test_beta_zero_runs_no_reference_and_holds_no_reference_params():
    trainer = make_trainer(beta=0.0)
    assert "ref_logprobs" not in trainer.batch(fixed_rollout(trainer))
    metrics = trainer.iteration()
    assert trainer.ref_params is None and trainer.state_bytes()["ref_params"] == 0
    assert "kl" not in metrics
    with_ref = make_trainer(beta=0.04)
    assert "ref_logprobs" in with_ref.batch(fixed_rollout(with_ref))
    metrics = with_ref.iteration()
    assert with_ref.state_bytes()["ref_params"] == with_ref.state_bytes()["params"] and metrics["kl"] >= 0.0


@pytest.mark.slow
def test_bfloat16_compute_and_remat_run_whole_iterations_like_float32():
    """The TPU/GPU settings (bfloat16 compute, remat) through sampling, reference forward and update on CPU:
    the same sampled tokens' log-probs as float32 within bfloat16 precision, and the same kind of update."""
    low = make_trainer(beta=0.04, model_config=dataclasses.replace(MODEL, dtype="bfloat16", remat=True))
    high = make_trainer(beta=0.04)
    rollout = fixed_rollout(low)
    low_batch, high_batch = low.batch(rollout), high.batch(rollout)  # the reference is the initial policy
    got, want = low_batch["ref_logprobs"], high_batch["ref_logprobs"]
    mask = np.asarray(low_batch["completion_mask"])
    assert got.dtype == jnp.float32 and mask.sum() > 0
    np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, want, 0), atol=0.05)
    low.state, step_low = low.train_step(low.state, low_batch)  # donates the state
    _, step_high = high.train_step(high.state, high_batch)
    assert float(step_low["grad_norm"]) == pytest.approx(float(step_high["grad_norm"]), rel=0.05)
    metrics = low.iteration()  # bfloat16 sampling too
    assert all(np.isfinite(metrics[name]) for name in ("loss", "grad_norm", "kl"))
    assert metrics["skipped_updates"] == 0.0 and metrics["completion_length_mean"] > 0


@pytest.mark.slow
def test_mu_two_second_epoch_moves_ratio_and_clips():
    trainer = make_trainer(mu=2, learning_rate=5e-2)
    assert "old_logprobs" in trainer.batch(fixed_rollout(trainer))  # once per batch, before any update
    metrics = [trainer.iteration() for _ in range(2)]
    # Epoch 1 of each batch: ratio exactly 1 (no update yet); epoch 2: the policy moved and clipping engages.
    assert all(m["clip_fraction_last_epoch"] > 0 for m in metrics)
    plain = make_trainer(mu=1, learning_rate=5e-2)
    assert "old_logprobs" not in plain.batch(fixed_rollout(plain))
    first = plain.iteration()
    assert first["clip_fraction"] == 0.0 and first["ratio_max"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [dict(), dict(pipeline="one_step_off", rollout_correction="tis")])
def test_learns_the_toy_task(pipeline):
    trainer = make_trainer(learning_rate=1e-2, **pipeline)
    rewards = [trainer.iteration()["reward_mean"] for _ in range(12)]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3


@pytest.mark.slow
def test_one_step_off_trains_each_step_on_the_rollout_the_previous_params_sampled():
    """Step 1 is the synchronous step; step 2 trains on the rollout sampled from the params before step 1's
    update (with step 2's key and the next examples), sampled while that update ran."""
    off = make_trainer(pipeline="one_step_off", rollout_correction="tis")
    sync = make_trainer(rollout_correction="tis")  # tis weights ~1 on policy, not exactly 1: the same loss
    before = make_trainer()  # the initial params, to sample what step 2 should train on
    first, sync_first = off.iteration(), sync.iteration()
    for a, b in zip(jax.tree.leaves(off.state.params), jax.tree.leaves(sync.state.params), strict=True):
        np.testing.assert_array_equal(a, b)  # step 1 is the same update
    assert first["rollout_staleness"] == 0 and sync_first["rollout_staleness"] == 0
    before.data_position = FIELDS["num_prompts"]
    expected = before.collect(before.sample_key(1)[0])
    second = off.iteration()
    np.testing.assert_array_equal(off.last_rollout.tokens, expected.tokens)
    np.testing.assert_array_equal(off.last_rollout.rewards, expected.rewards)
    assert [e["id"] for e in off.last_rollout.examples] == [e["id"] for e in expected.examples]
    assert second["rollout_staleness"] == 1
    assert second["rollout_kl"] > 1e-6 and second["rollout_logprob_diff_max"] > 1e-3  # stale: off-policy
    assert 0 < second["is_weight_mean"] and second["is_ratio_max"] > 1.0
    # Without prefetch nothing is sampled ahead: the next step samples its own rollout from current params.
    off.iteration(prefetch=False)
    assert off.iteration()["rollout_staleness"] == 0
    position = off.data_position  # past step 4's prompts only: step 5's are taken when it trains on them
    off.drain()  # drops the rollout sampled ahead for step 5
    assert off.data_position == position == 4 * FIELDS["num_prompts"]
    assert off.iteration()["rollout_staleness"] == 0
    assert [e["id"] for e in off.last_rollout.examples] == [
        e["id"] for e in off.examples_at(position, FIELDS["num_prompts"])]


@pytest.mark.slow
def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    # Reward 1 only for prompts with an even id: odd-id groups are all-zero (degenerate) whatever is sampled;
    # even-id groups vary because the completions differ.
    def reward(examples, completions):
        rewards = np.array([float(e["id"] % 2 == 0 and TARGET in c)
                            for e, c in zip(examples, completions, strict=True)], np.float32)
        return rewards, {"hits": rewards, "errors/hits": 1}

    trainer = make_trainer(dynamic_sampling=True, max_resample_rounds=6, reward_fn=reward, temperature=1.5)
    rollout = trainer.collect(jax.random.key(0))
    groups = rollout.rewards.reshape(8, 4)
    assert all(g.max() > g.min() for g in groups)
    assert rollout.prompts_sampled > 8 and rollout.resample_rounds >= 1
    assert all(e["id"] % 2 == 0 for e in rollout.examples)
    # Per-completion reward metrics describe the kept groups; per-call counts add up over the rounds.
    assert rollout.reward_metrics["hits"] == pytest.approx(rollout.rewards.mean())
    assert rollout.reward_metrics["errors/hits"] == rollout.resample_rounds + 1
    # The device arrays are those of the kept groups: their tokens, and the prompts of their examples.
    np.testing.assert_array_equal(np.asarray(rollout.sample.tokens), rollout.tokens)
    prompts = np.asarray(rollout.sample.prompt_tokens)
    masks = np.asarray(rollout.sample.prompt_mask)
    for example, row, row_mask in zip(rollout.examples, prompts, masks, strict=True):
        assert row[row_mask].tolist() == example["prompt_tokens"]
    metrics = trainer.iteration()  # the gathered batch trains
    assert np.isfinite(metrics["loss"]) and metrics["resample_rounds"] >= 1
    plain = make_trainer(reward_fn=reward, temperature=1.5)
    rollout = plain.collect(jax.random.key(0))
    assert any(g.max() == g.min() for g in rollout.rewards.reshape(8, 4))


def test_overlong_penalty_matches_dapo_eq_13_in_tokens():
    max_len, buffer = 20, 4
    lengths = np.array([1, 16, 17, 18, 20, 21])
    want = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]  # ((L_max - L_cache) - |y|) / L_cache, -1 past L_max
    np.testing.assert_allclose(overlong_penalty(lengths, max_len, buffer), want)
    # In the trainer: no stop tokens -> every completion truncated at 6 tokens -> penalty -1 each.
    trainer = make_trainer(overlong_buffer=2, stop_tokens=(), reward_fn=lambda e, c: np.zeros(len(c)))
    rollout = trainer.collect(jax.random.key(0))
    np.testing.assert_allclose(rollout.rewards, -1.0)
    np.testing.assert_allclose(rollout.task_rewards, 0.0)


def test_mask_truncated_removes_truncated_completions_from_the_loss():
    trainer = make_trainer(mask_truncated=True, stop_tokens=())
    rollout = trainer.collect(jax.random.key(0))
    assert rollout.truncated.all() and np.asarray(rollout.sample.truncated).all()
    batch = trainer.batch(rollout)
    assert not bool(batch["completion_mask"].any())


@pytest.mark.slow
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
    batch = trainer.batch(trainer.collect(jax.random.key(0)))
    batch["advantages"] = batch["advantages"].at[0].set(jnp.nan)
    before = jax.device_get(trainer.state.params)
    state, metrics = trainer.train_step(trainer.state, batch)
    assert float(metrics["skipped_updates"]) == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fields, message", [
    (dict(num_prompts=8, num_minibatches=3), "config.updates.num_minibatches=3 must divide config.rollout"),
    (dict(num_prompts=8, grad_accum_steps=3), "config.updates.grad_accum_steps=3"),
    (dict(loss_type="ppo"), "config.loss.loss_type='ppo'"),
    (dict(max_new_tokens=128, overlong_buffer=200), "config.rollout.overlong_buffer=200"),
    (dict(learning_rate=-1e-3), "config.optimizer.learning_rate=-0.001"),
    (dict(learning_rate=0.0), "config.optimizer.learning_rate=0.0"),
    (dict(beta=-0.04), "config.loss.beta=-0.04"),
    (dict(beta=float("nan")), "config.loss.beta=nan"),
    (dict(epsilon=float("nan")), "config.loss.epsilon=nan"),
    (dict(temperature=0.0), "config.sampling.temperature=0.0 must be > 0 to train"),
    (dict(group_size=1), "config.sampling.group_size=1 must be >= 2 for GRPO"),
    (dict(mu=0), "config.updates.mu=0"),
    (dict(dual_clip=0.5), "config.loss.dual_clip=0.5"),
    (dict(kl_in_reward=True), "config.ppo.kl_in_reward=True needs config.algo='ppo'"),
    (dict(algo="a2c"), "config.algo='a2c'"),
    (dict(gae_lambda=1.5), "config.ppo.gae_lambda=1.5"),
    (dict(pipeline="async"), "config.rollout.pipeline='async' is not supported; use one of ('sync', "
                             "'one_step_off')"),
    (dict(rollout_correction="is"), "config.loss.rollout_correction='is'"),
    (dict(correction_cap=0.0), "config.loss.correction_cap=0.0 must be a number > 0"),
])
def test_config_errors_name_the_path_the_value_and_the_fix(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_config(**{"max_new_tokens": 16, "group_size": 4, **fields})
    with pytest.raises(ValueError, match=re.escape("config.loss has no field(s) ['betta']")):
        GRPOConfig.from_dict({"loss": {"betta": 0.1}})


# ----------------------------------------------------------------------------- rollout/training agreement


@pytest.mark.slow
def test_rollout_and_training_log_probs_agree_on_policy_and_the_metric_sees_a_mismatch():
    """The sampler's log-probs of its tokens equal the training forward's on the same params (the invariant
    off-policy schedules rely on), and the metric reports a difference once the params moved."""
    trainer = make_trainer(mu=2, num_minibatches=2, beta=0.04)
    for _ in range(2):
        metrics = trainer.iteration()
        assert metrics["rollout_kl"] < 1e-7 and metrics["rollout_logprob_diff_max"] < 1e-4
    stale = trainer.collect(jax.random.key(11))
    trainer.iteration()  # the params move
    _, metrics = trainer.train_step(trainer.state, trainer.batch(stale))
    assert float(metrics["rollout_logprob_diff_max"]) > 1e-3 and float(metrics["rollout_kl"]) > 0


@pytest.mark.slow
def test_an_iteration_makes_no_implicit_transfer_and_only_the_rollout_reaches_the_host():
    """big_vision's rule for host<->device traffic: with implicit transfers disallowed both ways an
    iteration runs (every copy is explicit); the only device->host copies before the metrics are the
    rollout's tokens and mask. (Device-to-device copies, e.g. a key onto the 8-device mesh, are not
    host round trips.)"""
    trainer = make_trainer(beta=0.04, mu=2, num_minibatches=2, dynamic_sampling=True)
    trainer.iteration()  # compiles
    with jax.transfer_guard_host_to_device("disallow"), jax.transfer_guard_device_to_host("disallow"):
        metrics = trainer.iteration()
    assert np.isfinite(metrics["loss"])
    rollout = trainer.collect(jax.random.key(3))
    with jax.transfer_guard_device_to_host("disallow_explicit"):
        step_metrics = trainer.update(trainer.batch(rollout), jax.random.key(4))
    assert isinstance(step_metrics[0]["loss"], jax.Array) and len(step_metrics) == 4


@pytest.mark.slow
def test_with_a_vocab_limit_the_trained_distribution_is_the_sampled_one():
    """A tokenizer smaller than the model's vocabulary: the sampler draws from the ids below the limit, and
    its log-probs, the training forward's and the reference's are those of that distribution, not of the
    whole padded vocabulary (which would differ by log Z, the mass on the allowed ids)."""
    limit = 20
    trainer = make_trainer(vocab_limit=limit, beta=0.04)
    rollout = trainer.collect(jax.random.key(5))
    assert rollout.tokens[rollout.mask].max() < limit
    s, mask = rollout.sample, rollout.mask
    fields = (s.prompt_tokens, s.prompt_mask, s.tokens, s.mask)
    limited = completion_logprobs(trainer.policy(), *fields, vocab_limit=limit)
    whole = completion_logprobs(trainer.policy(), *fields)
    np.testing.assert_allclose(np.where(mask, s.logprobs, 0), np.where(mask, limited, 0), atol=2e-5)
    assert np.all(np.asarray(limited - whole)[mask] > 1e-3)  # log Z < 0 on every token
    batch = trainer.batch(rollout)
    reference = batch["ref_logprobs"]  # the reference is the initial policy
    np.testing.assert_allclose(np.where(mask, reference, 0), np.where(mask, limited, 0), atol=2e-5)
    _, metrics = trainer.train_step(trainer.state, batch)
    assert float(metrics["rollout_logprob_diff_max"]) < 1e-4


@pytest.mark.slow
def test_bfloat16_params_with_gradient_accumulation_and_remat_with_microbatched_log_probs_train():
    """bfloat16 params: gradients are summed over microbatches in float32 and the params stay bfloat16.
    remat with the reference/old log-probs computed in parts: the model is built inside the mapped part."""
    bf16 = ModelConfig(**{**MODEL.__dict__, "param_dtype": "bfloat16", "dtype": "bfloat16", "remat": True})
    trainer = make_trainer(model_config=bf16, grad_accum_steps=2, num_minibatches=2, mu=2, beta=0.04)
    before = jax.device_get(trainer.state.params)
    for _ in range(2):
        metrics = trainer.iteration()
    assert np.isfinite(metrics["loss"]) and metrics["skipped_updates"] == 0 and metrics["kl"] > 0
    after = trainer.state.params
    assert {x.dtype for x in jax.tree.leaves(after)} == {jnp.dtype("bfloat16")}
    moved = [float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]
    assert max(moved) > 0
