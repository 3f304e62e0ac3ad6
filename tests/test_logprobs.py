"""token_logprobs against the naive full-vocabulary log_softmax, values, gradients and memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import token_logprobs


def naive(hidden, unembedding, targets, temperature=1.0):
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, unembedding) / temperature)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], entropy


def inputs(seed, batch=3, length=11, dim=16, vocab=97, scale=1.0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = (scale * jax.random.normal(k[0], (batch, length, dim))).astype(dtype)
    unembedding = (jax.random.normal(k[1], (dim, vocab)) / np.sqrt(dim)).astype(dtype)
    targets = jax.random.randint(k[2], (batch, length), 0, vocab)
    weights = jax.random.normal(k[3], (2, batch, length))
    return hidden, unembedding, targets, weights


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 33, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_values_match_naive(chunk_size, temperature):
    hidden, unembedding, targets, _ = inputs(0, scale=3.0)
    got_lp, got_ent = token_logprobs(hidden, unembedding, targets, temperature=temperature,
                                     chunk_size=chunk_size, return_entropy=True)
    want_lp, want_ent = naive(hidden, unembedding, targets, temperature)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ent, want_ent, rtol=1e-5, atol=1e-5)
    only_lp = token_logprobs(hidden, unembedding, targets, temperature=temperature, chunk_size=chunk_size)
    np.testing.assert_array_equal(only_lp, got_lp)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk_size", [2, 8, 1000])
def test_gradients_match_naive(with_entropy, chunk_size):
    hidden, unembedding, targets, weights = inputs(1, scale=2.0)

    def objective(fn):
        def f(h, w):
            lp, ent = fn(h, w)
            return jnp.sum(weights[0] * lp) + with_entropy * jnp.sum(weights[1] * ent)
        return f

    ours = objective(lambda h, w: token_logprobs(h, w, targets, temperature=0.8, chunk_size=chunk_size,
                                                 return_entropy=True))
    reference = objective(lambda h, w: naive(h, w, targets, 0.8))
    got = jax.grad(ours, argnums=(0, 1))(hidden, unembedding)
    want = jax.grad(reference, argnums=(0, 1))(hidden, unembedding)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    hidden, unembedding, targets, weights = inputs(2, dtype=jnp.bfloat16)
    lp = token_logprobs(hidden, unembedding, targets, chunk_size=4)
    assert lp.dtype == jnp.float32
    want, _ = naive(hidden.astype(jnp.float32), unembedding.astype(jnp.float32), targets)
    np.testing.assert_allclose(lp, want, atol=1e-4)
    grads = jax.grad(lambda h, w: jnp.sum(weights[0] * token_logprobs(h, w, targets, chunk_size=4)),
                     argnums=(0, 1))(hidden, unembedding)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16


def test_under_jit_and_vmap():
    hidden, unembedding, targets, _ = inputs(3)
    fn = jax.jit(lambda h, w, t: token_logprobs(h, w, t, chunk_size=5, return_entropy=True))
    stacked = jax.vmap(fn, in_axes=(0, None, 0))(jnp.stack([hidden, -hidden]), unembedding,
                                                 jnp.stack([targets, targets[::-1]]))
    want = naive(-hidden, unembedding, targets[::-1])
    np.testing.assert_allclose(stacked[0][1], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stacked[1][1], want[1], rtol=1e-5, atol=1e-5)


def temp_bytes(fn, *shapes):
    return fn.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_loss_and_grad_never_hold_the_full_logits():
    """Compiled temp memory of loss+grad: the chunked version stays well under one [B*T, V] f32 buffer."""
    batch, length, dim, vocab = 2, 512, 64, 8192
    shapes = (jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
              jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
              jax.ShapeDtypeStruct((batch, length), jnp.int32))

    def loss_and_grad(fn):
        return jax.jit(jax.value_and_grad(lambda h, w, t: -jnp.mean(fn(h, w, t)), argnums=(0, 1)))

    chunked = temp_bytes(loss_and_grad(lambda h, w, t: token_logprobs(h, w, t, chunk_size=128)), *shapes)
    full = temp_bytes(loss_and_grad(lambda h, w, t: naive(h, w, t)[0]), *shapes)
    logits_bytes = batch * length * vocab * 4
    assert full >= logits_bytes
    assert chunked <= full / 4
    assert chunked < logits_bytes / 2


def test_errors_name_the_field():
    hidden, unembedding, targets, _ = inputs(4)
    with pytest.raises(ValueError, match="temperature=0"):
        token_logprobs(hidden, unembedding, targets, temperature=0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        token_logprobs(hidden, unembedding, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"must be \[B, T, D\], \[D, V\] and \[B, T\]"):
        token_logprobs(hidden, unembedding.T, targets)
    with pytest.raises(AssertionError, match="targets must hold integer"):
        token_logprobs(hidden, unembedding, targets.astype(jnp.float32))
