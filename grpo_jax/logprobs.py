"""Per-token log-probs and entropy from hidden states, without materialising `[B, T, V]` logits.

At V=151936 (Qwen2.5) the float32 logits of 4096 tokens alone are 2.5 GB, and autodiff of a plain
`log_softmax` keeps several such buffers alive. `token_logprobs` walks the time axis in chunks with
`lax.scan`, so only one chunk of logits exists at a time, and its custom VJP recomputes each chunk's logits
in the backward pass instead of storing them: forward and backward both peak at O(chunk x V), plus the
`[D, V]` gradient of the unembedding.

Scanning over time (not over flattened tokens) keeps the batch axis intact, so a batch sharded over a
mesh stays sharded inside the loop.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from grpo_jax._numerics import einsum_f32


def _chunk_logits(hidden: jax.Array, unembedding: jax.Array, temperature: float) -> jax.Array:
    """`[B, C, D] x [D, V] -> [B, C, V]` float32 logits / temperature."""
    logits = einsum_f32("bcd,dv->bcv", hidden, unembedding)
    return logits / temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan_logprobs(hidden, unembedding, targets, temperature, with_entropy):
    """hidden `[K, B, C, D]`, targets `[K, B, C]` -> (logprobs, entropy) `[K, B, C]` each."""
    outputs, _ = _scan_forward(hidden, unembedding, targets, temperature, with_entropy)
    return outputs


def _scan_forward(hidden, unembedding, targets, temperature, with_entropy):
    def chunk(_, xs):
        h, t = xs  # [B, C, D], [B, C]
        logits = _chunk_logits(h, unembedding, temperature)  # [B, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
        logprobs = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse
        if with_entropy:
            # -sum p log p over log p = z - lse; lse - sum p z is the same but cancels catastrophically.
            log_p = logits - lse[..., None]
            entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
        else:
            entropy = jnp.zeros_like(lse)
        return None, (logprobs, entropy, lse)

    _, (logprobs, entropy, lse) = jax.lax.scan(chunk, None, (hidden, targets))
    return (logprobs, entropy), (hidden, unembedding, targets, lse, entropy)


def _scan_backward(temperature, with_entropy, residuals, cotangents):
    """Recompute each chunk's logits; accumulate d unembedding in float32 across chunks.

    With z = logits / T, p = softmax(z), logprob = z_y - lse(z) and H = -sum p log p:
      d logprob / dz = onehot(y) - p,      dH / dz = -p * (log p + H).
    """
    hidden, unembedding, targets, lse, entropy = residuals
    g_logprobs, g_entropy = cotangents  # [K, B, C] each

    def chunk(d_unembedding, xs):
        h, t, lse_c, ent_c, g_lp, g_ent = xs
        logits = _chunk_logits(h, unembedding, temperature)  # [B, C, V]
        log_p = logits - lse_c[..., None]
        probs = jnp.exp(log_p)
        d_logits = -g_lp[..., None] * probs
        d_logits += g_lp[..., None] * jax.nn.one_hot(t, logits.shape[-1], dtype=d_logits.dtype)
        if with_entropy:
            d_logits -= g_ent[..., None] * probs * (log_p + ent_c[..., None])
        d_logits = d_logits / temperature
        d_hidden = einsum_f32("bcv,dv->bcd", d_logits, unembedding)
        d_unembedding += einsum_f32("bcd,bcv->dv", h, d_logits)
        return d_unembedding, d_hidden.astype(h.dtype)

    d_unembedding = jnp.zeros(unembedding.shape, jnp.float32)
    d_unembedding, d_hidden = jax.lax.scan(
        chunk, d_unembedding, (hidden, targets, lse, entropy, g_logprobs, g_entropy))
    return d_hidden, d_unembedding.astype(unembedding.dtype), None


_scan_logprobs.defvjp(_scan_forward, _scan_backward)


def token_logprobs(
    hidden: chex.Array,
    unembedding: chex.Array,
    targets: chex.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log pi(y_t | h_t) = z_{t, y_t} - logsumexp_v z_{t, v}, with z = h_t W / temperature, in chunks.

    Equal to `jax.nn.log_softmax(hidden @ unembedding / temperature)` gathered at `targets` (and its
    entropy -sum p log p), but with at most `chunk_size` tokens' logits in memory at once, in the forward
    pass and under `jax.grad` alike. Logits are computed in float32 whatever the input dtype.

    Args:
      hidden: `[B, T, D]` final hidden states (after the last norm).
      unembedding: `[D, V]` output projection (the transposed embedding table for tied embeddings).
      targets: `[B, T]` int token ids whose log-probs are wanted (the next tokens).
      temperature: sampling temperature the log-probs refer to (a Python float > 0).
      chunk_size: tokens per chunk, across the batch: each chunk covers max(1, chunk_size // B) time steps.
        Only memory and speed depend on it, never the result.
      return_entropy: also return the per-token entropy of pi(. | h_t).

    Returns:
      `[B, T]` float32 log-probs, and `[B, T]` float32 entropies when `return_entropy`.
    """
    chex.assert_rank(hidden, 3, custom_message="hidden must be [B, T, D]")
    chex.assert_rank(unembedding, 2, custom_message="unembedding must be [D, V]")
    chex.assert_rank(targets, 2, custom_message="targets must be [B, T]")
    chex.assert_type(targets, int, custom_message="targets must hold integer token ids")
    batch, length, dim = hidden.shape
    if targets.shape != (batch, length) or unembedding.shape[0] != dim:
        raise ValueError(
            f"hidden {hidden.shape}, unembedding {unembedding.shape} and targets {targets.shape} must be "
            "[B, T, D], [D, V] and [B, T].")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy decoding for temperature 0).")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (tokens per chunk).")

    steps = min(length, max(1, chunk_size // batch))  # time steps per chunk
    num_chunks = -(-length // steps)
    pad = num_chunks * steps - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [B, K * C, ...] -> [K, B, C, ...]: the scan runs over K chunks of C time steps.
    hidden = hidden.reshape(batch, num_chunks, steps, dim).transpose(1, 0, 2, 3)
    targets = targets.reshape(batch, num_chunks, steps).transpose(1, 0, 2)

    logprobs, entropy = _scan_logprobs(hidden, unembedding, targets, float(temperature), return_entropy)

    def unchunk(x):  # [K, B, C] -> [B, T]
        return x.transpose(1, 0, 2).reshape(batch, num_chunks * steps)[:, :length]

    if return_entropy:
        return unchunk(logprobs), unchunk(entropy)
    return unchunk(logprobs)
