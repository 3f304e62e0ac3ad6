"""The group sampler against full forward recomputation: greedy, log-probs, filters, stops, keys, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import sampling
from grpo_jax.models import ModelConfig, Transformer, forward_logits
from grpo_jax.sampling import SamplingConfig, sample

VOCAB = 48


CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, qkv_bias=True, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, nnx.Rngs(0))


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


@jax.jit
def _full_forward(state, ids):
    graphdef = nnx.graphdef(Transformer(CONFIG, nnx.Rngs(0)))
    return forward_logits(nnx.merge(graphdef, state), ids, jnp.ones_like(ids, bool))


def recompute_logits(model, prompt, completion, width=64):
    """Full-vocabulary logits predicting each completion token, from one plain forward pass (right padding
    to a fixed width keeps it one compilation; causality makes the padding invisible)."""
    sequence = list(prompt) + list(completion)
    ids = jnp.asarray([sequence + [0] * (width - len(sequence))])
    logits = _full_forward(nnx.state(model), ids)[0]
    return np.asarray(logits[len(prompt) - 1: len(prompt) - 1 + len(completion)])


def rows(out, group_size):
    """(prompt index, completion tokens, completion log-probs) per sample row."""
    for b in range(out.tokens.shape[0]):
        n = int(out.lengths[b])
        yield b // group_size, np.asarray(out.tokens[b, :n]), np.asarray(out.logprobs[b, :n])


def test_greedy_equals_stepwise_argmax_of_full_forward(model):
    # 40 new tokens: the decode cache grows from 32 slots to 40 on the way (sampling.cache_phases).
    cfg = SamplingConfig(max_new_tokens=40, group_size=2, temperature=0.0, buckets=(8, 16))
    out = sample(model, PROMPTS, jax.random.PRNGKey(0), cfg)
    for i, prompt in enumerate(PROMPTS):
        sequence = list(prompt)
        for _ in range(cfg.max_new_tokens):
            sequence.append(int(recompute_logits(model, sequence, [0])[0].argmax()))
        want = sequence[len(prompt):]
        np.testing.assert_array_equal(out.tokens[2 * i], want)
        np.testing.assert_array_equal(out.tokens[2 * i + 1], want)
    assert bool(out.truncated.all()) and bool(out.mask.all())


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_recomputed_logprobs(model, temperature):
    cfg = SamplingConfig(max_new_tokens=50, group_size=3, temperature=temperature, stop_tokens=(7,))
    out = sample(model, PROMPTS, jax.random.PRNGKey(1), cfg)
    assert int(out.lengths.max()) > sampling.FIRST_CACHE_PHASE  # some rows decode past the cache's growth
    for i, tokens, logprobs in rows(out, 3):
        logits = recompute_logits(model, PROMPTS[i], tokens) / temperature
        want = jax.nn.log_softmax(logits)[np.arange(len(tokens)), tokens]
        np.testing.assert_allclose(logprobs, want, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out.logprobs)[~np.asarray(out.mask)], 0.0)


def test_cache_phases_double_up_to_max_new_tokens():
    assert sampling.cache_phases(8) == (8,)
    assert sampling.cache_phases(32) == (32,)
    assert sampling.cache_phases(128) == (32, 64, 128)
    assert sampling.cache_phases(100) == (32, 64, 100)


def allowed_sets(logits, cfg):
    """NumPy reference of the top-k -> top-p -> min-p filters, from logits already / temperature."""
    allowed = np.ones_like(logits, bool)
    if cfg.top_k:
        kth = np.sort(logits, axis=-1)[:, -cfg.top_k][:, None]
        allowed &= logits >= kth
    if cfg.top_p < 1:
        for r in range(len(logits)):
            order = np.argsort(-np.where(allowed[r], logits[r], -np.inf))
            probs = np.exp(logits[r] - logits[r][allowed[r]].max()) * allowed[r]
            probs /= probs.sum()
            keep, mass = [], 0.0
            for token in order:
                if mass >= cfg.top_p or not allowed[r, token]:
                    break
                keep.append(token)
                mass += probs[token]
            allowed[r] = np.isin(np.arange(logits.shape[1]), keep)
    if cfg.min_p:
        probs = np.where(allowed, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
        allowed &= probs >= cfg.min_p * probs.max(-1, keepdims=True)
    return allowed


@pytest.mark.parametrize("filters", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3),
                                     dict(top_k=8, top_p=0.7, min_p=0.1)], ids=str)
def test_filters_only_emit_tokens_inside_their_sets(model, filters):
    cfg = SamplingConfig(max_new_tokens=6, group_size=16, temperature=0.8, **filters)
    out = sample(model, PROMPTS, jax.random.PRNGKey(2), cfg)
    sizes, distinct = [], set()
    for i, tokens, _ in rows(out, cfg.group_size):
        allowed = allowed_sets(recompute_logits(model, PROMPTS[i], tokens) / cfg.temperature, cfg)
        assert allowed[np.arange(len(tokens)), tokens].all(), filters
        sizes.extend(allowed.sum(-1))
        distinct.update((i, t, tok) for t, tok in enumerate(tokens))
    # The sets really restrict (smaller than the vocabulary) and sampling within them is not degenerate.
    assert max(sizes) < VOCAB
    assert len(distinct) > 2 * len(PROMPTS) * cfg.max_new_tokens // 3


@pytest.mark.slow
def test_stop_tokens_end_sequences_and_the_mask(model):
    stops = (3, 17, 30)
    cfg = SamplingConfig(max_new_tokens=16, group_size=8, temperature=1.5, stop_tokens=stops, pad_id=0)
    out = sample(model, PROMPTS, jax.random.PRNGKey(3), cfg)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    saw_stop = saw_full = False
    for b in range(tokens.shape[0]):
        hits = np.flatnonzero(np.isin(tokens[b], stops) & mask[b])
        if hits.size:
            end = hits[0] + 1
            saw_stop = True
            assert not out.truncated[b]
        else:
            end = cfg.max_new_tokens
            saw_full = True
            assert out.truncated[b]
        assert int(out.lengths[b]) == end
        np.testing.assert_array_equal(mask[b], np.arange(cfg.max_new_tokens) < end)
        np.testing.assert_array_equal(tokens[b, end:], cfg.pad_id)
    assert saw_stop and saw_full


def test_samples_differ_within_group_and_across_keys(model):
    cfg = SamplingConfig(max_new_tokens=8, group_size=4)
    a = np.asarray(sample(model, PROMPTS, jax.random.PRNGKey(4), cfg).tokens)
    b = np.asarray(sample(model, PROMPTS, jax.random.PRNGKey(5), cfg).tokens)
    again = np.asarray(sample(model, PROMPTS, jax.random.PRNGKey(4), cfg).tokens)
    np.testing.assert_array_equal(a, again)  # a key determines the samples
    assert not np.array_equal(a, b)
    for i in range(len(PROMPTS)):
        group = a[4 * i: 4 * i + 4]
        assert len({tuple(row) for row in group}) == 4


@pytest.mark.slow
def test_compilations_bounded_by_buckets(model):
    buckets = (4, 8, 16)
    cfg = SamplingConfig(max_new_tokens=4, group_size=2, buckets=buckets)
    rng = np.random.default_rng(0)
    keys = [jax.random.PRNGKey(100 + call) for call in range(20)]
    compiles = []  # XLA compilations, counted through JAX's public monitoring events

    def count(event, seconds, fun_name="", **_):
        if event.endswith("backend_compile_duration") and "_generate" in fun_name:  # the decoder itself
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(count)
    for key in keys:
        lengths = rng.integers(1, 17, size=4)
        prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]
        sample(model, prompts, key, cfg)
    assert 1 <= len(compiles) <= len(buckets)


@pytest.mark.slow
def test_batch_sharded_over_a_mesh_gives_the_same_samples(model):
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    prompts = PROMPTS * 2  # 8 prompts over 8 data shards
    cfg = SamplingConfig(max_new_tokens=6, group_size=2)
    plain = sample(model, prompts, jax.random.PRNGKey(6), cfg)
    sharded = sample(model, prompts, jax.random.PRNGKey(6), cfg, mesh=mesh)
    np.testing.assert_array_equal(plain.tokens, sharded.tokens)
    np.testing.assert_allclose(plain.logprobs, sharded.logprobs, atol=1e-5)
    assert sharded.tokens.sharding.spec[0] == ("data", "fsdp")
    with pytest.raises(ValueError, match="cannot be split over the mesh"):
        sample(model, PROMPTS[:3], jax.random.PRNGKey(6), cfg, mesh=mesh)


def test_errors_name_the_field(model):
    with pytest.raises(ValueError, match="config.sampling.top_p=0"):
        SamplingConfig(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="config.sampling.temperature=-1"):
        SamplingConfig(max_new_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="config.sampling.buckets"):
        SamplingConfig(max_new_tokens=4, buckets=(8, 4))
    with pytest.raises(ValueError, match="larger bucket"):
        sample(model, [[1] * 20], jax.random.PRNGKey(0), SamplingConfig(max_new_tokens=4, buckets=(8, 16)))
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        sample(model, [[1, 2]], jax.random.PRNGKey(0), SamplingConfig(max_new_tokens=200))
    with pytest.raises(ValueError, match="stop_tokens"):
        sample(model, [[1, 2]], jax.random.PRNGKey(0), SamplingConfig(max_new_tokens=4, stop_tokens=(VOCAB,)))
    with pytest.raises(ValueError, match="non-empty"):
        sample(model, [[1, 2], []], jax.random.PRNGKey(0), SamplingConfig(max_new_tokens=4))


@pytest.mark.slow
def test_vocab_limit_keeps_samples_inside_the_tokenizer(model):
    limit = VOCAB // 2
    free = sample(model, PROMPTS, jax.random.PRNGKey(8), SamplingConfig(max_new_tokens=8, group_size=8))
    assert int(free.tokens.max()) >= limit  # without the limit the model does emit such ids
    for temperature in (1.0, 0.0):
        cfg = SamplingConfig(max_new_tokens=8, group_size=8, temperature=temperature, vocab_limit=limit)
        out = sample(model, PROMPTS, jax.random.PRNGKey(8), cfg)
        assert int(out.tokens.max()) < limit


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [7, 256, 1000])
def test_draw_follows_the_softmax_and_never_draws_zero_probability_ids(vocab):
    """The inverse-CDF draw against its distribution: a chi-square test over 200k draws (vocabularies
    below, at and across the draw's block size), with a fifth of the ids filtered out (-inf-like logits)."""
    rng = np.random.default_rng(vocab)
    logits = rng.normal(0.0, 2.0, vocab).astype(np.float32)
    filtered = rng.choice(vocab, max(1, vocab // 5), replace=False)
    logits[filtered] = np.finfo(np.float32).min
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    draw = jax.jit(lambda key: sampling.draw(jnp.broadcast_to(jnp.asarray(logits), (20_000, vocab)), key))
    counts = np.zeros(vocab)
    for i in range(10):
        counts += np.bincount(np.asarray(draw(jax.random.key(i))), minlength=vocab)
    assert counts.sum() == 200_000 and counts[filtered].sum() == 0
    expected = probs * counts.sum()
    kept = expected > 5  # the chi-square approximation's usual rule; the rare ids are checked in bulk
    chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    dof = kept.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)
    rare = (~kept).nonzero()[0]
    assert abs(counts[rare].sum() - expected[rare].sum()) <= 6 * np.sqrt(expected[rare].sum()) + 1


def test_draw_finds_a_single_id_in_any_block():
    """One id of probability 1 among 49152 (the SmolLM2 vocabulary): every draw returns it, wherever it is."""
    vocab, ids = 49152, np.array([0, 255, 256, 30001, 49151])
    logits = np.full((len(ids), vocab), np.finfo(np.float32).min, np.float32)
    logits[np.arange(len(ids)), ids] = 0.0
    for i in range(3):
        np.testing.assert_array_equal(sampling.draw(jnp.asarray(logits), jax.random.key(i)), ids)
