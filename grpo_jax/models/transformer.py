"""Flax NNX decoder for the Llama 3.x / Qwen2 / Qwen3 family, with a KV cache and shared-prefix attention.

One attention routine serves every use:
  * plain forward (training, log-probs): causal attention over the call's own tokens;
  * decoding: the call's tokens are written into a fixed-capacity cache and attend to it;
  * shared prefix: B = N * G rows additionally attend to the keys/values of N prompts (each prompt's G
    completions share one prefix), which are never copied G times. The sampler prefills every prompt once
    and decodes its G samples against that prefix; training runs the same way so gradients reach the
    prompt through the broadcast.

Every parameter carries logical axis names (its `out_sharding` metadata) that `grpo_jax.sharding` maps to a
mesh: "vocab", "embed", "q_heads", "kv_heads", "mlp", "head_dim" and "norm".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax._numerics import einsum_f32
from grpo_jax.models.config import ModelConfig


class KV(NamedTuple):
    """Keys and values of one layer, heads-major. Keys are stored feature-major, `k` `[B, num_kv_heads,
    head_dim, S]`, so that q k^T is a plain `[R, Dh] x [Dh, S]` matmul per head (contracting the keys'
    minor axis makes XLA's CPU matmul repack the whole cache every decode step); `v` `[B, num_kv_heads, S,
    head_dim]`."""

    k: jax.Array
    v: jax.Array


class Prefix(NamedTuple):
    """Shared prefix of N prompts: per-layer KV (see `KV`, S = P), `mask` `[N, P]` (false on left padding)."""

    kv: tuple[KV, ...]
    mask: jax.Array


class Cache(NamedTuple):
    """A row-wise KV cache of fixed capacity T: per-layer KV (see `KV`, S = T); `mask` `[B, T]` marks slots
    that hold a real token; `index` is the next slot to write (the same for all rows)."""

    kv: tuple[KV, ...]
    mask: jax.Array
    index: jax.Array


def _param(rngs: nnx.Rngs, init, shape, dtype, names) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel `[in, out]`."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], cfg: ModelConfig, rngs: nnx.Rngs,
                 bias: bool = False):
        init = nnx.initializers.normal(stddev=d_in**-0.5)
        self.kernel = _param(rngs, init, (d_in, d_out), cfg.param_dtype, names)
        self.bias = (_param(rngs, nnx.initializers.zeros, (d_out,), cfg.param_dtype, names[1:])
                     if bias else None)
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # As a 2-D matmul: XLA's CPU backward of a batched [B, T, D] x [D, F] dot is ~2x slower.
        flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = jnp.dot(flat, self.kernel[...].astype(self.dtype)).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def fused_dense(layers: tuple[Dense, ...], x: jax.Array) -> jax.Array:
    """The outputs of several Dense layers of the same input, concatenated: one matmul against their
    kernels side by side (q/k/v, gate/up), which a CPU runs faster than several narrow ones; the
    concatenation of the weights is loop-invariant in the sampler, so XLA hoists it out of the decode loop."""
    dtype = layers[0].dtype
    kernel = jnp.concatenate([d.kernel[...].astype(dtype) for d in layers], axis=1)
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    y = jnp.dot(flat, kernel).reshape(*x.shape[:-1], -1)
    if layers[0].bias is not None:
        y = y + jnp.concatenate([d.bias[...].astype(dtype) for d in layers])
    return y


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32 (as Llama and Qwen do)."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, name: str = "norm"):
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), cfg.param_dtype, (name,))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * x32).astype(x.dtype)


class Rope(NamedTuple):
    """cos and sin of the rotary angles of every token, `[B, S, 1, Dh / 2]` float32: computed once per call
    of the model, shared by its layers."""

    cos: jax.Array
    sin: jax.Array


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> Rope:
    """The rotary tables of `positions` `[B, S]` for frequencies `inv_freq` `[Dh / 2]`."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, Dh/2]
    return Rope(jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :])


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """Rotary embedding, rotate-half convention: x `[B, S, H, Dh]`."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * rope.cos - x2 * rope.sin, x2 * rope.cos + x1 * rope.sin],
                           axis=-1).astype(x.dtype)


def attend(q: jax.Array, own: KV, own_mask: jax.Array, prefix_kv: KV | None = None,
           prefix_mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v over the row's own keys and, optionally, its group's shared prefix.

    Keys and values are stored heads-major (keys feature-major, see `KV`), and the R = H / KVH query heads
    sharing a key head are folded into the query axis, so every contraction is a plain batched matmul that
    needs no transpose of the (large) cache. With a prefix, the softmax runs over both key sets at once
    through a shared maximum and denominator, without concatenating them; the G rows of a group are folded
    into the query axis of their prompt's prefix, so the prefix is read once per group.

    Args:
      q: `[B, S, H, Dh]` queries.
      own: KV (S = T), keys of the row itself (its cache or the call's own tokens).
      own_mask: `[B, S, T]` bool, which own keys each query may see (causality and padding).
      prefix_kv: KV (S = P) of N = B / G prompts: keys every row of a group sees.
      prefix_mask: `[N, P]` bool, false on the prefix's padding.

    Returns:
      `[B, S, H, Dh]` in q's dtype. Softmax in float32; a query with no visible key gets zeros.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = own.k.shape[1]
    repeats = heads // kv_heads
    # [B, S, KVH * R, Dh] -> [B, KVH, S * R, Dh]: query row s * R + r is head (k, r) at position s.
    q = (q * head_dim**-0.5).reshape(batch, length, kv_heads, repeats, head_dim)
    q = q.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, length * repeats, head_dim)
    neg = jnp.finfo(jnp.float32).min
    visible = jnp.repeat(own_mask, repeats, axis=1)[:, None]  # [B, 1, S * R, T]
    scores = einsum_f32("bkqd,bkdt->bkqt", q, own.k)
    scores = jnp.where(visible, scores, neg)
    top = scores.max(axis=-1, keepdims=True)
    if prefix_kv is not None:
        num_prompts = prefix_kv.k.shape[0]
        group = batch // num_prompts

        def by_prompt(x):  # [B, KVH, Q, X] -> [N, KVH, G * Q, X]: a group's rows share their prompt's keys
            x = x.reshape(num_prompts, group, *x.shape[1:]).transpose(0, 2, 1, 3, 4)
            return x.reshape(num_prompts, kv_heads, group * x.shape[3], x.shape[4])

        def by_row(x):  # the inverse of by_prompt
            x = x.reshape(num_prompts, kv_heads, group, -1, x.shape[-1]).transpose(0, 2, 1, 3, 4)
            return x.reshape(batch, kv_heads, -1, x.shape[-1])

        prefix_scores = einsum_f32("nkqd,nkdp->nkqp", by_prompt(q), prefix_kv.k)
        prefix_scores = jnp.where(prefix_mask[:, None, None, :], prefix_scores, neg)
        top = jnp.maximum(top, by_row(prefix_scores.max(axis=-1, keepdims=True)))
    weights = jnp.where(visible, jnp.exp(scores - top), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    out = einsum_f32("bkqt,bktd->bkqd", weights.astype(own.v.dtype), own.v)
    if prefix_kv is not None:
        prefix_weights = jnp.exp(prefix_scores - by_prompt(top))
        prefix_weights = jnp.where(prefix_mask[:, None, None, :], prefix_weights, 0.0)
        total += by_row(prefix_weights.sum(axis=-1, keepdims=True))
        out += by_row(einsum_f32("nkqp,nkpd->nkqd", prefix_weights.astype(prefix_kv.v.dtype), prefix_kv.v))
    out = out / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)  # no visible key: 0 / tiny = 0
    out = out.reshape(batch, kv_heads, length, repeats, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q = Dense(d, cfg.num_heads * hd, ("embed", "q_heads"), cfg, rngs, bias=cfg.qkv_bias)
        self.k = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, rngs, bias=cfg.qkv_bias)
        self.v = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, rngs, bias=cfg.qkv_bias)
        self.o = Dense(cfg.num_heads * hd, d, ("q_heads", "embed"), cfg, rngs)
        self.q_norm = RMSNorm(hd, cfg, rngs, "head_dim") if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg, rngs, "head_dim") if cfg.qk_norm else None
        self.config = cfg

    def __call__(self, x, rope, own_mask, cache_kv, cache_index, prefix_kv, prefix_mask):
        batch, length, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = jnp.split(fused_dense((self.q, self.k, self.v), x), (q_size, q_size + kv_size), axis=-1)
        q = q.reshape(batch, length, self.num_heads, self.head_dim)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope).transpose(0, 2, 3, 1)  # [B, KVH, Dh, S]
        v = v.transpose(0, 2, 1, 3)  # [B, KVH, S, Dh]
        if cache_kv is None:
            own = KV(k, v)
        else:  # write this call's keys into the cache and attend to all of it
            k = jax.lax.dynamic_update_slice(cache_kv.k, k.astype(cache_kv.k.dtype), (0, 0, 0, cache_index))
            v = jax.lax.dynamic_update_slice(cache_kv.v, v.astype(cache_kv.v.dtype), (0, 0, cache_index, 0))
            own = KV(k, v)
        out = attend(q, own, own_mask, prefix_kv, prefix_mask)
        return self.o(out.reshape(batch, length, -1)), own


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs)
        self.up = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs)
        self.down = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x):
        gate, up = jnp.split(fused_dense((self.gate, self.up), x), 2, axis=-1)
        return self.down(jax.nn.silu(gate) * up)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope, own_mask, cache_kv, cache_index, prefix_kv, prefix_mask):
        attn_out, kv = self.attn(self.attn_norm(x), rope, own_mask, cache_kv, cache_index, prefix_kv,
                                 prefix_mask)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), kv


def _run_block(block, *args):
    return block(*args)


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` returns final-norm hidden states; `unembedding()` gives `[D, V]`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        # 1/sqrt(D): with tied embeddings the initial logits then have unit scale, not sqrt(D).
        embed_init = nnx.initializers.normal(stddev=cfg.hidden_size**-0.5)
        self.embed = _param(rngs, embed_init, (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype,
                            ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)

    def unembedding(self) -> jax.Array:
        """`[D, V]` output projection (the transposed embedding when tied), in the compute dtype."""
        table = self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return table.astype(self.config.dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        own_mask: jax.Array,
        *,
        cache: Cache | None = None,
        prefix: Prefix | None = None,
    ) -> tuple[jax.Array, tuple[KV, ...]]:
        """Hidden states of `tokens` and each layer's own keys/values.

        Args:
          tokens: `[B, S]` int token ids.
          positions: `[B, S]` int RoPE positions (with left padding: count of real tokens before).
          own_mask: `[B, S, T]` bool, which own keys each token sees: T = S without a cache (see
            `causal_mask`), T = cache capacity with one (see `Cache`).
          cache: when given, this call's keys/values are written at `cache.index` and attended with it.
          prefix: shared prefix of N = B / G prompts (see `Prefix`).

        Returns:
          (hidden `[B, S, D]` after the final norm, per-layer KV: the updated cache, or the call's own).
        """
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.config.dtype)
        # Remat serves the backward pass; decoding with a cache (inside the sampler's while_loop, whose body
        # closes over these params) has none.
        block_fn = nnx.remat(_run_block) if self.config.remat and cache is None else _run_block
        rope = rope_tables(positions, jnp.asarray(self.config.rope_inv_freq()))  # a trace-time constant
        kvs = []
        for i, block in enumerate(self.layers):
            x, kv = block_fn(
                block, x, rope, own_mask,
                None if cache is None else cache.kv[i], None if cache is None else cache.index,
                None if prefix is None else prefix.kv[i], None if prefix is None else prefix.mask)
            kvs.append(kv)
        return self.final_norm(x), tuple(kvs)


def causal_mask(token_mask: jax.Array) -> jax.Array:
    """`[B, S]` bool (false on padding) -> `[B, S, S]`: token s sees real tokens t <= s."""
    length = token_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & token_mask[:, None, :]


def positions_from_mask(token_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """RoPE positions of left-padded rows: number of real tokens before each token, plus `offset` `[B, 1]`."""
    return jnp.maximum(jnp.cumsum(token_mask, axis=1) - 1, 0) + offset


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> Cache:
    """An empty cache of `capacity` slots per row."""
    shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    key_shape = (batch, cfg.num_kv_heads, cfg.head_dim, capacity)
    dtype = dtype or cfg.dtype
    kv = tuple(KV(jnp.zeros(key_shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
    return Cache(kv, jnp.zeros((batch, capacity), bool), jnp.zeros((), jnp.int32))


def forward_logits(model: Transformer, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Plain full-vocabulary logits `[B, S, V]` of left-padded rows; for tests and small models."""
    hidden, _ = model(tokens, positions_from_mask(token_mask), causal_mask(token_mask))
    return einsum_f32("bsd,dv->bsv", hidden, model.unembedding())
