"""The update stage on its own, on tiny arrays and a model of under a thousand params (no Trainer):
`init_train_state` / `abstract_train_state` / `train_state_shardings`, `prepare_batch`, `minibatch` and
`train_step`, checked against plain forwards, numpy and optax computed here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from grpo_jax import advantages as advantages_lib
from grpo_jax import lora, sharding, update
from grpo_jax.config import GRPOConfig, config_sections
from grpo_jax.models import ModelConfig, Transformer, forward_logits

MODEL = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, max_position_embeddings=32)
N, G, P, T = 4, 2, 4, 3  # prompts, group size, prompt width, completion width
BASE_SECTIONS = {"sampling": dict(max_new_tokens=T, group_size=G), "rollout": dict(num_prompts=N)}


def make_cfg(algo="grpo", **sections) -> GRPOConfig:
    """A GRPOConfig of `config_sections` with `sections` overriding the tiny defaults above."""
    merged = {name: {**BASE_SECTIONS.get(name, {}), **sections.get(name, {})}
              for name in {*BASE_SECTIONS, *sections}}
    return GRPOConfig.from_dict({**config_sections(**merged), "algo": algo})


def make_params(seed=0):
    """(graphdef, params) of a fresh tiny model."""
    return nnx.split(Transformer(MODEL, nnx.Rngs(seed)))


def leaves(tree):
    """Host copies of the leaves (copies: a numpy view of a CPU buffer would keep it from being donated)."""
    return [np.array(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def init_state(params, cfg):
    """`init_train_state` with the run's optimizers."""
    optimizer, critic_optimizer = update.make_optimizers(cfg)
    return update.init_train_state(params, cfg, jax.random.key(0), optimizer=optimizer,
                                   critic_optimizer=critic_optimizer)


GATE = ("layers", 0, "mlp", "gate", "kernel")  # [embed=8, mlp=16]: ("fsdp", "tensor") on a 2x2x2 mesh


def value(tree, path):
    """The value of the Variable at `path` (an array, or an Int8Kernel of a quantized base)."""
    for name in path:
        tree = tree[name]
    return tree.get_value()


# ----------------------------------------------------------------------------- init_train_state

VARIANTS = {  # name -> (algo, sections)
    "full": ("grpo", {}),
    "reference": ("grpo", {"loss": dict(beta=0.1)}),
    "lora": ("grpo", {"lora": dict(rank=2), "loss": dict(beta=0.1)}),
    "qlora": ("grpo", {"lora": dict(rank=2, quantize="int8")}),
    "ppo": ("ppo", {}),
}


def variant(name):
    """(cfg, optimizer, critic optimizer or None) of a VARIANTS entry."""
    algo, sections = VARIANTS[name]
    cfg = make_cfg(algo, **sections)
    return (cfg, *update.make_optimizers(cfg))


def test_full_fine_tuning_trains_the_params_from_optax_initial_state_with_no_reference_at_beta_0():
    """rank 0, beta 0: the trained params are the params, the optimizer state is optax's init of them, and
    there is no reference, critic or base."""
    cfg, optimizer, _ = variant("full")
    _, params = make_params()
    state, reference = update.init_train_state(params, cfg, jax.random.key(0), optimizer=optimizer)
    assert reference is None
    assert state.critic is None and state.critic_opt_state is None and state.base is None
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.opt_state, optimizer.init(params))
    assert_trees_equal(optax.tree_utils.tree_get(state.opt_state, "mu"), jax.tree.map(jnp.zeros_like, params))


@pytest.mark.parametrize("jitted", [False, True])
def test_the_reference_at_positive_beta_is_an_equal_copy_that_survives_donating_the_params(jitted):
    """beta > 0: the reference has the params' values in buffers of its own, so a jitted function that
    donates the trained params (as the train step does) leaves it readable and unchanged."""
    cfg, optimizer, _ = variant("reference")
    _, params = make_params()
    expected = leaves(params)
    init = functools.partial(update.init_train_state, cfg=cfg, optimizer=optimizer)
    state, reference = (jax.jit(init) if jitted else init)(params, key=jax.random.key(0))
    assert reference is not None
    assert_trees_equal(reference, params)
    consume = jax.jit(lambda p: jax.tree.map(lambda x: x * 2.0, p), donate_argnums=0)
    doubled = consume(state.params)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params))  # donation really happened
    assert not any(x.is_deleted() for x in jax.tree.leaves(reference))
    for x, e, d in zip(leaves(reference), expected, leaves(doubled), strict=True):
        np.testing.assert_array_equal(x, e)
        np.testing.assert_array_equal(d, 2.0 * e)


def test_lora_trains_zero_initialised_adapters_over_the_params_as_base_with_no_reference():
    """rank > 0: the trained params are adapters (A `[in, rank]`, B zeros `[rank, out]`) of every targeted
    kernel, their optimizer state optax's init of them; the base is the params; no reference even at
    beta > 0 (the base is the reference)."""
    cfg, optimizer, _ = variant("lora")
    _, params = make_params()
    state, reference = update.init_train_state(params, cfg, jax.random.key(0), optimizer=optimizer)
    assert reference is None and state.critic is None
    kernels = {f"layers.0.{block}.{proj}": value(params, ("layers", 0, block, proj, "kernel"))
               for block, proj in lora.TARGETS.values()}
    assert set(state.params) == set(kernels)
    for name, kernel in kernels.items():
        a, b = state.params[name]["a"], state.params[name]["b"]
        assert a.shape == (kernel.shape[0], 2) and b.shape == (2, kernel.shape[1])
        assert a.dtype == b.dtype == kernel.dtype
        np.testing.assert_array_equal(b, 0.0)
        assert np.abs(np.asarray(a)).max() > 0
    assert_trees_equal(state.base, params)
    assert_trees_equal(state.opt_state, optimizer.init(state.params))
    # Another key draws other A's.
    other, _ = update.init_train_state(params, cfg, jax.random.key(1), optimizer=optimizer)
    assert not np.array_equal(other.params["layers.0.attn.q"]["a"], state.params["layers.0.attn.q"]["a"])


def test_qlora_base_holds_the_targeted_kernels_as_int8_within_half_a_step_of_the_params():
    """quantize="int8": every targeted kernel of the base is an Int8Kernel (int8 values, one scale per
    output column, max |W| of a column at 127) within half a quantization step of W; other params equal."""
    cfg, optimizer, _ = variant("qlora")
    _, params = make_params()
    state, reference = update.init_train_state(params, cfg, jax.random.key(0), optimizer=optimizer)
    assert reference is None
    for block, proj in lora.TARGETS.values():
        path = ("layers", 0, block, proj, "kernel")
        quantized, w = value(state.base, path), np.asarray(value(params, path))
        assert lora.is_int8_kernel(quantized) and quantized.q.dtype == jnp.int8
        scale = np.abs(w).max(axis=0) / 127.0
        np.testing.assert_allclose(quantized.scale, scale, rtol=1e-6)
        np.testing.assert_array_equal(np.abs(np.asarray(quantized.q)).max(axis=0), 127)
        assert np.all(np.abs(np.asarray(quantized.dequantize()) - w) <= scale / 2 + 1e-7)
    base = jax.tree.leaves(state.base, is_leaf=lora.is_int8_kernel)
    untouched = [(x, p) for x, p in zip(base, jax.tree.leaves(params), strict=True)
                 if not lora.is_int8_kernel(x)]
    assert len(base) - len(untouched) == len(lora.TARGETS)
    assert len(untouched) == 5  # embed, final norm, the layer's two norms, lm_head
    for x, p in untouched:
        np.testing.assert_array_equal(x, p)


def test_ppo_adds_a_critic_copied_from_the_policy_with_a_zero_head_and_its_optimizer_state():
    """algo="ppo": the critic's backbone equals the params, its head is zero, and its optimizer state is the
    critic optimizer's init of the critic; without a critic optimizer init refuses."""
    cfg, optimizer, critic_optimizer = variant("ppo")
    _, params = make_params()
    state, reference = update.init_train_state(params, cfg, jax.random.key(0), optimizer=optimizer,
                                               critic_optimizer=critic_optimizer)
    assert reference is None and state.base is None
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.critic["backbone"], params)
    np.testing.assert_array_equal(state.critic["head"]["kernel"], np.zeros(MODEL.hidden_size))
    np.testing.assert_array_equal(state.critic["head"]["bias"], 0.0)
    assert_trees_equal(state.critic_opt_state, critic_optimizer.init(state.critic))
    with pytest.raises(ValueError, match="critic_optimizer"):
        update.init_train_state(params, cfg, jax.random.key(0), optimizer=optimizer)


@functools.lru_cache
def mesh_2x2x2():
    return sharding.make_mesh((2, 2, 2))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_init_train_state_traces_under_eval_shape_to_the_shapes_it_computes(name):
    """`jax.eval_shape` of init gives the shapes and dtypes of the state and reference it computes."""
    cfg, optimizer, critic_optimizer = variant(name)
    _, params = make_params()
    init = functools.partial(update.init_train_state, cfg=cfg, key=jax.random.key(0), optimizer=optimizer,
                             critic_optimizer=critic_optimizer)
    abstract, concrete = jax.eval_shape(init, params), init(params)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (c.shape, c.dtype)


@functools.lru_cache
def jitted_init(name):
    """init_train_state jitted with out_shardings from `train_state_shardings` (and the params' shardings
    for the reference), on params placed on a 2x2x2 mesh of the 8 CPU devices: (state, reference, wanted
    shardings, eager result). Cached: the tests only read it."""
    mesh = mesh_2x2x2()
    cfg, optimizer, critic_optimizer = variant(name)
    _, params = make_params()
    init = functools.partial(update.init_train_state, cfg=cfg, optimizer=optimizer,
                             critic_optimizer=critic_optimizer)
    key = jax.random.key(0)
    shapes, reference_shapes = jax.eval_shape(init, params, key=key)
    param_shardings = sharding.param_shardings(params, mesh)
    wanted = update.train_state_shardings(shapes, param_shardings, mesh, optimizer=optimizer,
                                          critic_optimizer=critic_optimizer)
    wanted_reference = None if reference_shapes is None else param_shardings
    state, reference = jax.jit(init, out_shardings=(wanted, wanted_reference))(
        sharding.place(params, param_shardings), key=key)
    return state, reference, (wanted, wanted_reference), init(params, key=key)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_jitted_init_on_an_8_device_mesh_puts_every_leaf_where_train_state_shardings_asks(name):
    """On a 2x2x2 mesh of the 8 CPU devices: every output leaf has exactly its requested sharding, the
    values are those of the eager init, and the layout is the documented one (params and Adam moments split
    like the params, LoRA adapters / counters / critic head replicated, an int8 scale split like its
    kernel's columns)."""
    assert mesh_2x2x2().devices.size == 8
    state, reference, (wanted, wanted_reference), eager = jitted_init(name)
    outputs = (state, reference)
    assert jax.tree.structure(outputs) == jax.tree.structure(eager)
    shardings = jax.tree.leaves((wanted, wanted_reference))
    assert len(jax.tree.leaves(outputs)) == len(shardings)
    for x, s in zip(jax.tree.leaves(outputs), shardings, strict=True):
        assert x.sharding == s
    for x, e in zip(leaves(outputs), leaves(eager), strict=True):  # LoRA's A: to an ulp (fused division)
        np.testing.assert_allclose(x, e, rtol=1e-6, atol=0)

    split, replicated = PartitionSpec("fsdp", "tensor"), PartitionSpec()
    counts = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert counts and all(x.sharding.spec == replicated for x in counts)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    if state.base is None:
        assert value(state.params, GATE).sharding.spec == split
        assert value(mu, GATE).sharding.spec == split
    else:
        assert all(x.sharding.spec == replicated for x in jax.tree.leaves((state.params, mu)))
        kernel = value(state.base, GATE)
        if name == "qlora":
            assert kernel.q.sharding.spec == split and kernel.scale.sharding.spec == PartitionSpec("tensor")
            assert kernel.q.addressable_shards[0].data.shape == (4, 8)
        else:
            assert kernel.sharding.spec == split
    if reference is not None:
        assert value(reference, GATE).sharding.spec == split
    if state.critic is not None:
        assert value(state.critic["backbone"], GATE).sharding.spec == split
        assert state.critic["head"]["kernel"].sharding.spec == replicated
        critic_mu = optax.tree_utils.tree_get(state.critic_opt_state, "mu")
        assert value(critic_mu["backbone"], GATE).sharding.spec == split


@pytest.mark.parametrize("name", list(VARIANTS))
def test_abstract_train_state_has_the_shapes_dtypes_and_shardings_of_the_jitted_state(name):
    """`abstract_train_state` (default optimizers, concrete or abstract params) is a tree of
    ShapeDtypeStructs matching the really initialised, sharded state leaf for leaf."""
    mesh = mesh_2x2x2()
    state, reference, _, _ = jitted_init(name)
    cfg, _, _ = variant(name)
    _, params = make_params()
    abstract = update.abstract_train_state(params, cfg, mesh)
    from_abstract_params = update.abstract_train_state(jax.eval_shape(lambda: params), cfg, mesh)
    for candidate in (abstract, from_abstract_params):
        assert jax.tree.structure(candidate) == jax.tree.structure((state, reference))
        for a, x in zip(jax.tree.leaves(candidate), jax.tree.leaves((state, reference)), strict=True):
            assert isinstance(a, jax.ShapeDtypeStruct)
            assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)


# ----------------------------------------------------------------------------- a hand-made batch


def make_batch(rewards, *, seed=0, truncated=None):
    """N left-padded prompts (lengths 4, 2, 3, 1) and N * G right-padded completions (lengths 1-3)."""
    rng = np.random.default_rng(seed)
    prompt_mask = np.arange(P)[None] >= (P - np.array([4, 2, 3, 1]))[:, None]
    completion_mask = np.arange(T)[None] < np.array([3, 1, 2, 3, 1, 2, 3, 2])[:, None]
    return dict(
        prompt_tokens=jnp.asarray(np.where(prompt_mask, rng.integers(2, 16, (N, P)), 0), jnp.int32),
        prompt_mask=jnp.asarray(prompt_mask),
        completion_tokens=jnp.asarray(np.where(completion_mask, rng.integers(2, 16, (N * G, T)), 0),
                                      jnp.int32),
        completion_mask=jnp.asarray(completion_mask),
        sample_logprobs=jnp.zeros((N * G, T), jnp.float32),
        rewards=jnp.asarray(rewards, jnp.float32),
        truncated=jnp.asarray(np.zeros(N * G, bool) if truncated is None else truncated))


def plain_logprobs(graphdef, params, batch):
    """`[B, T]` log-probs of the completion tokens (0 off the mask) by one plain causal forward over the
    rows [prompt ; completion] without padding in between, each left-padded to P + T; differentiable in
    `params`."""
    host = {k: np.asarray(v) for k, v in batch.items()}
    width = P + T
    tokens, mask = np.zeros((N * G, width), np.int32), np.zeros((N * G, width), bool)
    gather_rows, gather_positions, gather_tokens, targets = [], [], [], []
    for row in range(N * G):
        prompt = host["prompt_tokens"][row // G][host["prompt_mask"][row // G]]
        completion = host["completion_tokens"][row][host["completion_mask"][row]]
        sequence = np.concatenate([prompt, completion])
        tokens[row, width - len(sequence):], mask[row, width - len(sequence):] = sequence, True
        for t, token in enumerate(completion):  # predicted by the position before it
            gather_rows.append(row)
            gather_positions.append(width - len(completion) + t - 1)
            gather_tokens.append(token)
            targets.append((row, t))
    logits = forward_logits(nnx.merge(graphdef, params), jnp.asarray(tokens), jnp.asarray(mask))
    logp = jax.nn.log_softmax(logits, axis=-1)[np.array(gather_rows), np.array(gather_positions),
                                               np.array(gather_tokens)]
    rows, columns = np.array(targets).T
    return jnp.zeros((N * G, T)).at[rows, columns].set(logp)


@functools.lru_cache
def prepare_fn(cfg):
    graphdef, _ = make_params()
    return jax.jit(functools.partial(update.prepare_batch, graphdef=graphdef, options=cfg.step_options()))


def numpy_grpo_advantages(rewards, eps=1e-6):
    grouped = np.asarray(rewards, np.float64).reshape(-1, G)
    std = grouped.std(axis=1, keepdims=True)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    return np.where(std > 0, centred / (std + eps), 0.0).reshape(-1)


REWARDS = [0.0, 1.0, 0.5, 0.5, 2.0, -1.0, 0.25, 1.0]  # group 1 has no signal


@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("rloo", "none"), ("grpo", "batch")])
def test_prepare_batch_advantages_are_the_group_advantages_of_the_rewards(estimator, scale):
    """GRPO at beta=0, mu=1: the prepared batch is the input minus rewards/truncated plus the
    advantages of `group_advantages` (for grpo/group: (r - mean) / (std + eps) per group, 0 without
    signal); no reference or old log-probs are computed."""
    cfg = make_cfg(advantages=dict(estimator=estimator, scale=scale))
    _, params = make_params()
    state, reference = update.init_train_state(params, cfg, jax.random.key(0),
                                               optimizer=update.make_optimizers(cfg)[0])
    batch = make_batch(REWARDS)
    prepared = prepare_fn(cfg)(state, reference, batch)
    assert set(prepared) == set(batch) - {"rewards", "truncated"} | {"advantages"}
    for name in set(batch) - {"rewards", "truncated"}:
        np.testing.assert_array_equal(prepared[name], batch[name])
    expected = advantages_lib.group_advantages(jnp.asarray(REWARDS), G, estimator=estimator, scale=scale,
                                               eps=cfg.advantages.eps)
    np.testing.assert_allclose(prepared["advantages"], expected, rtol=1e-6)
    if (estimator, scale) == ("grpo", "group"):
        np.testing.assert_allclose(prepared["advantages"], numpy_grpo_advantages(REWARDS), rtol=1e-5)
    if (estimator, scale) == ("rloo", "none"):  # r_i minus the other member of its pair
        pairs = np.asarray(REWARDS).reshape(-1, 2)
        np.testing.assert_allclose(prepared["advantages"], (pairs - pairs[:, ::-1]).reshape(-1), rtol=1e-6)


def test_prepare_batch_masks_truncated_completions_with_mask_truncated():
    """rollout.mask_truncated: the truncated rows' completion mask becomes all false, the others stay."""
    cfg = make_cfg(rollout=dict(mask_truncated=True))
    _, params = make_params()
    state, _ = init_state(params, cfg)
    truncated = np.array([0, 1, 0, 0, 1, 0, 0, 1], bool)
    batch = make_batch(REWARDS, truncated=truncated)
    prepared = prepare_fn(cfg)(state, None, batch)
    expected = np.asarray(batch["completion_mask"]) & ~truncated[:, None]
    np.testing.assert_array_equal(prepared["completion_mask"], expected)
    assert expected[~truncated].any() and not prepared["completion_mask"][truncated].any()


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_prepare_batch_reference_and_old_logprobs_are_those_of_a_plain_forward(grad_accum_steps):
    """beta > 0 and mu > 1: ref_logprobs are the reference params' log-probs and old_logprobs the trained
    params', each equal to a plain per-row forward (whatever the number of parts they are computed in)."""
    cfg = make_cfg(loss=dict(beta=0.1), updates=dict(mu=2, grad_accum_steps=grad_accum_steps))
    graphdef, params = make_params(0)
    _, other = make_params(1)
    state, _ = init_state(params, cfg)
    batch = make_batch(REWARDS)
    prepared = prepare_fn(cfg)(state, other, batch)
    mask = np.asarray(batch["completion_mask"])
    ref, old = (np.where(mask, prepared[k], 0.0) for k in ("ref_logprobs", "old_logprobs"))
    np.testing.assert_allclose(ref, plain_logprobs(graphdef, other, batch), atol=1e-5)
    np.testing.assert_allclose(old, plain_logprobs(graphdef, params, batch), atol=1e-5)
    assert np.abs(ref - old).max() > 1e-3  # the two policies really differ


# ----------------------------------------------------------------------------- minibatch


def indexed_batch(num_prompts=8):
    """A batch whose entries name their prompt (prompt fields) or row (the others)."""
    rows = np.arange(num_prompts * G)
    return dict(prompt_tokens=jnp.asarray(np.repeat(np.arange(num_prompts)[:, None], 2, 1), jnp.int32),
                prompt_mask=jnp.asarray(np.arange(num_prompts)[:, None] % 2 == np.arange(2)),
                completion_tokens=jnp.asarray(np.repeat(rows[:, None], T, 1), jnp.int32),
                advantages=jnp.asarray(rows, jnp.float32))


@functools.lru_cache
def minibatch_fn(options):
    return jax.jit(functools.partial(update.minibatch, options=options))


def minibatches(cfg, key):
    """[epoch][minibatch] -> the sorted prompt indices of `minibatch(batch, key, index)` for every index
    of mu * num_minibatches, after checking each holds whole groups of its prompts."""
    options = cfg.step_options()
    k, mu = cfg.updates.num_minibatches, cfg.updates.mu
    batch = indexed_batch()
    take = minibatch_fn(options)
    epochs = []
    for epoch in range(mu):
        parts = []
        for j in range(k):
            part = {name: np.asarray(x) for name, x in take(batch, key, jnp.int32(epoch * k + j)).items()}
            prompts = part["prompt_tokens"][:, 0]
            assert len(prompts) == 8 // k
            np.testing.assert_array_equal(part["prompt_tokens"], np.asarray(batch["prompt_tokens"])[prompts])
            np.testing.assert_array_equal(part["prompt_mask"], np.asarray(batch["prompt_mask"])[prompts])
            rows = (prompts[:, None] * G + np.arange(G)).reshape(-1)  # each prompt's whole group, in order
            np.testing.assert_array_equal(part["completion_tokens"][:, 0], rows)
            np.testing.assert_array_equal(part["advantages"], rows)
            parts.append(tuple(prompts.tolist()))
        epochs.append(tuple(parts))
    return epochs


def test_minibatches_are_whole_groups_and_cover_every_group_once_per_epoch():
    """mu=3, 4 minibatches of 8 prompts: minibatch i holds whole groups (prompt rows with their G
    completion rows), and each epoch's minibatches partition the prompts."""
    cfg = make_cfg(rollout=dict(num_prompts=8), updates=dict(mu=3, num_minibatches=4))
    for epoch in minibatches(cfg, jax.random.key(0)):
        assert sorted(p for part in epoch for p in part) == list(range(8))


def test_minibatch_order_is_a_function_of_the_key_and_the_epoch():
    """The same key gives the same minibatches; other keys and other epochs give other orders."""
    cfg = make_cfg(rollout=dict(num_prompts=8), updates=dict(mu=2, num_minibatches=2))
    runs = [minibatches(cfg, jax.random.key(seed)) for seed in range(4)]
    assert minibatches(cfg, jax.random.key(0)) == runs[0]
    assert len({run[0] for run in runs}) > 1
    assert any(run[0] != run[1] for run in runs)


# ----------------------------------------------------------------------------- train_step


@functools.lru_cache
def step_fn(cfg):
    graphdef, _ = make_params()
    optimizer, critic_optimizer = update.make_optimizers(cfg)
    return jax.jit(functools.partial(update.train_step, graphdef=graphdef, optimizer=optimizer,
                                     loss_fn=cfg.default_loss(), options=cfg.step_options(),
                                     critic_optimizer=critic_optimizer))


def prepared_batch(cfg, state, rewards, sample_logprobs=None):
    batch = make_batch(rewards)
    if sample_logprobs is not None:
        batch["sample_logprobs"] = jnp.asarray(sample_logprobs, jnp.float32)
    return prepare_fn(cfg)(state, None, batch)


LR = 1e-2
# No clipping; a large eps keeps Adam's first step g / (|g| + eps) a smooth function of g, so float noise in
# tiny gradients cannot flip the sign of an update.
OPTIMIZER = dict(learning_rate=LR, adam_eps=1e-3, max_grad_norm=1e6)


# (aggregation, grad_accum_steps, weight_decay): two compilations of the step serve every test below.
STEP_CASES = [("seq-mean-token-mean", 1, 0.0), ("token-mean", 2, 0.1)]
STEP_IDS = ["seq-mean-token-mean-1-microbatch", "token-mean-2-microbatches-decay"]


def step_cfg(aggregation, grad_accum_steps, weight_decay):
    return make_cfg(optimizer=dict(OPTIMIZER, weight_decay=weight_decay), loss=dict(aggregation=aggregation),
                    updates=dict(grad_accum_steps=grad_accum_steps))


@pytest.mark.parametrize("case", STEP_CASES, ids=STEP_IDS)
def test_a_zero_advantage_step_changes_the_params_by_weight_decay_alone(case):
    """Rewards equal within every group: zero advantages, a zero gradient, so AdamW's first step is
    p * (1 - lr * weight_decay): exactly no change at weight_decay 0. The loss is finite (0)."""
    cfg = step_cfg(*case)
    weight_decay = cfg.optimizer.weight_decay
    _, params = make_params()
    before = leaves(params)
    state, _ = init_state(params, cfg)
    batch = prepared_batch(cfg, state, [0.3, 0.3, 1.0, 1.0, 0.0, 0.0, -2.0, -2.0])
    np.testing.assert_array_equal(batch["advantages"], 0.0)
    new_state, metrics = step_fn(cfg)(state, batch)
    assert np.isfinite(metrics["loss"]) and float(metrics["loss"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0 and float(metrics["skipped_updates"]) == 0.0
    for x, p in zip(leaves(new_state.params), before, strict=True):
        if weight_decay == 0.0:
            np.testing.assert_array_equal(x, p)
        else:
            np.testing.assert_allclose(x, p * (1 - LR * weight_decay), rtol=1e-6, atol=1e-9)
            assert np.any(x != p) or not np.any(p)


def independent_gradient(graphdef, params, batch, aggregation):
    """The GRPO loss's gradient at ratio 1 (mu=1, beta=0), from plain forwards: -sum_i A_i * (mean over
    o_i of log pi) / B' (seq-mean-token-mean) or -sum_i A_i * (sum over o_i of log pi) / |tokens|."""
    mask = np.asarray(batch["completion_mask"])
    a = np.asarray(batch["advantages"])

    def surrogate(p):
        logp = plain_logprobs(graphdef, p, batch)
        if aggregation == "token-mean":
            return -jnp.sum(a[:, None] * logp) / mask.sum()
        return -jnp.sum(a * logp.sum(axis=1) / mask.sum(axis=1)) / len(a)

    return jax.jit(jax.grad(surrogate))(params), plain_logprobs(graphdef, params, batch)


@pytest.mark.parametrize("case", STEP_CASES, ids=STEP_IDS)
def test_a_step_is_adamw_first_step_on_the_independently_computed_gradient(case):
    """With signal: the new params are p - lr * (g / (|g| + eps) + weight_decay * p) (AdamW's
    bias-corrected first step), g the loss gradient from a plain forward, whatever the microbatch split;
    grad_norm is |g|, the loss finite, and the sampler/trainer mismatch metrics ~0 when the sampler's
    log-probs are the policy's."""
    aggregation, _, weight_decay = case
    cfg = step_cfg(*case)
    eps = OPTIMIZER["adam_eps"]
    graphdef, params = make_params()
    before = leaves(params)
    state, _ = init_state(params, cfg)
    batch = prepare_fn(cfg)(state, None, make_batch(REWARDS))
    grads, logp = independent_gradient(graphdef, params, batch, aggregation)
    batch["sample_logprobs"] = logp
    new_state, metrics = step_fn(cfg)(state, batch)
    assert np.isfinite(metrics["loss"])
    assert float(metrics["skipped_updates"]) == 0.0
    g = leaves(grads)
    assert float(metrics["grad_norm"]) == pytest.approx(np.sqrt(sum((x ** 2).sum() for x in g)), rel=1e-4)
    assert float(metrics["rollout_kl"]) < 1e-6 and float(metrics["rollout_logprob_diff_max"]) < 1e-5
    moved = 0
    for x, p, gx in zip(leaves(new_state.params), before, g, strict=True):
        expected = p - LR * (gx / (np.abs(gx) + eps) + weight_decay * p)
        np.testing.assert_allclose(x, expected, rtol=0, atol=LR * 1e-3)
        moved += int(np.sum(np.abs(x - p) > LR * 0.1))
    assert moved > 100  # a real step, not a handful of entries


def test_under_lora_a_step_moves_only_the_b_adapters_and_never_the_base():
    """rank > 0, zero-initialised B: the first step's gradient reaches B only (A's is B^T-weighted, so 0),
    so every A and the whole base stay bit-identical while every B moves."""
    cfg = make_cfg(lora=dict(rank=2), optimizer=dict(learning_rate=LR))
    _, params = make_params()
    base = leaves(params)
    state, _ = init_state(params, cfg)
    adapters = jax.tree.map(np.array, state.params)
    new_state, metrics = step_fn(cfg)(state, prepared_batch(cfg, state, REWARDS))
    assert np.isfinite(metrics["loss"]) and float(metrics["grad_norm"]) > 0
    for x, b in zip(leaves(new_state.base), base, strict=True):
        np.testing.assert_array_equal(x, b)
    for name, pair in adapters.items():
        np.testing.assert_array_equal(new_state.params[name]["a"], pair["a"])
        assert np.abs(np.asarray(new_state.params[name]["b"])).max() > 0, name
