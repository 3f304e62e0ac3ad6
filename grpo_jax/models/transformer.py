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
    """Keys and values of one layer, heads-major: `[B, num_kv_heads, S, head_dim]` each."""

    k: jax.Array
    v: jax.Array


class Prefix(NamedTuple):
    """Shared prefix of N prompts: per-layer KV `[N, KVH, P, Dh]`, `mask` `[N, P]` (false on left padding)."""

    kv: tuple[KV, ...]
    mask: jax.Array


class Cache(NamedTuple):
    """A row-wise KV cache of fixed capacity T: per-layer KV `[B, KVH, T, Dh]`; `mask` `[B, T]` marks slots
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


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32 (as Llama and Qwen do)."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, name: str = "norm"):
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), cfg.param_dtype, (name,))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * x32).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, rotate-half convention: x `[B, S, H, Dh]`, positions `[B, S]`."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(q: jax.Array, own: KV, own_mask: jax.Array, prefix_kv: KV | None = None,
           prefix_mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v over the row's own keys and, optionally, its group's shared prefix.

    Keys and values are stored heads-major, `[B, KVH, T, Dh]`, and the R = H / KVH query heads sharing a
    key head are folded into the query axis, so every contraction is a plain batched matmul that needs no
    transpose of the (large) cache. With a prefix, the softmax runs over both key sets at once through a
    shared maximum and denominator, without concatenating them.

    Args:
      q: `[B, S, H, Dh]` queries.
      own: KV `[B, KVH, T, Dh]`, keys of the row itself (its cache or the call's own tokens).
      own_mask: `[B, S, T]` bool, which own keys each query may see (causality and padding).
      prefix_kv: KV `[N, KVH, P, Dh]` with B = N * G: keys every row of a group sees.
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
    scores = einsum_f32("bkqd,bktd->bkqt", q, own.k)
    scores = jnp.where(visible, scores, neg)
    top = scores.max(axis=-1, keepdims=True)
    if prefix_kv is not None:
        num_prompts = prefix_kv.k.shape[0]
        group = batch // num_prompts
        grouped_q = q.reshape(num_prompts, group, *q.shape[1:])  # [N, G, KVH, S * R, Dh]
        prefix_scores = einsum_f32("ngkqd,nkpd->ngkqp", grouped_q, prefix_kv.k)
        prefix_scores = jnp.where(prefix_mask[:, None, None, None, :], prefix_scores, neg)
        top = jnp.maximum(top, prefix_scores.max(axis=-1, keepdims=True).reshape(top.shape))
    weights = jnp.where(visible, jnp.exp(scores - top), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    out = einsum_f32("bkqt,bktd->bkqd", weights.astype(own.v.dtype), own.v)
    if prefix_kv is not None:
        grouped_top = top.reshape(num_prompts, group, *top.shape[1:])
        prefix_weights = jnp.where(prefix_mask[:, None, None, None, :], jnp.exp(prefix_scores - grouped_top),
                                   0.0)
        total += prefix_weights.sum(axis=-1, keepdims=True).reshape(total.shape)
        out += einsum_f32("ngkqp,nkpd->ngkqd", prefix_weights.astype(prefix_kv.v.dtype),
                          prefix_kv.v).reshape(out.shape)
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

    def __call__(self, x, positions, own_mask, cache_kv, cache_index, prefix_kv, prefix_mask):
        batch, length, _ = x.shape
        q = self.q(x).reshape(batch, length, self.num_heads, self.head_dim)
        k = self.k(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = jnp.asarray(self.config.rope_inv_freq())  # a trace-time constant
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq).transpose(0, 2, 1, 3)  # [B, KVH, S, Dh]
        v = v.transpose(0, 2, 1, 3)
        if cache_kv is None:
            own = KV(k, v)
        else:  # write this call's keys into the cache and attend to all of it
            start = (0, 0, cache_index, 0)
            own = KV(jax.lax.dynamic_update_slice(cache_kv.k, k.astype(cache_kv.k.dtype), start),
                     jax.lax.dynamic_update_slice(cache_kv.v, v.astype(cache_kv.v.dtype), start))
        out = attend(q, own, own_mask, prefix_kv, prefix_mask)
        return self.o(out.reshape(batch, length, -1)), own


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs)
        self.up = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs)
        self.down = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, own_mask, cache_kv, cache_index, prefix_kv, prefix_mask):
        attn_out, kv = self.attn(self.attn_norm(x), positions, own_mask, cache_kv, cache_index, prefix_kv,
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
        kvs = []
        for i, block in enumerate(self.layers):
            x, kv = block_fn(
                block, x, positions, own_mask,
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
    dtype = dtype or cfg.dtype
    kv = tuple(KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
    return Cache(kv, jnp.zeros((batch, capacity), bool), jnp.zeros((), jnp.int32))


def forward_logits(model: Transformer, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Plain full-vocabulary logits `[B, S, V]` of left-padded rows; for tests and small models."""
    hidden, _ = model(tokens, positions_from_mask(token_mask), causal_mask(token_mask))
    return einsum_f32("bsd,dv->bsv", hidden, model.unembedding())
