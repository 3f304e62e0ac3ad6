"""The jit-compiled group sampler: G completions per prompt, each prompt prefilled once.

  1. Host: prompts (lists of token ids) are left-padded into the smallest length bucket that fits them, so
     a run compiles once per bucket, not once per prompt length.
  2. Device, one jitted call: prefill the N prompts once (batch N); their keys/values become a shared
     `Prefix` that the N * G sample rows attend to without copying it G times; then `lax.while_loop`s
     decode one token per step for all rows through a KV cache that grows by doubling (32, 64, ... slots,
     one loop per size, so a step reads at most twice the filled length), and exit as soon as every row
     has emitted a stop token (or after `max_new_tokens`).

Randomness: the caller passes a fresh key per call (the trainer splits one per step); inside, every
decode step folds its index into that key, so no key is ever used twice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax._numerics import einsum_f32
from grpo_jax._validation import check_fields, finite
from grpo_jax.models.transformer import (
    KV,
    Cache,
    Prefix,
    Transformer,
    causal_mask,
    init_cache,
    positions_from_mask,
)
from grpo_jax.sharding import put_global

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Frozen (hashable): it is a static argument of the compiled sampler.

    temperature=0 is greedy decoding. top_k=0, top_p=1 and min_p=0 switch those filters off; when several
    are set they apply in the order top-k, top-p, min-p, each on the distribution the previous one left.
    Completions end after any of `stop_tokens` (the stop token is part of the completion). Log-probs are
    those of the distribution sampled from (at the temperature, over the ids below `vocab_limit`) before the
    top-k/p/min-p filters, as the training forward computes them.
    """

    max_new_tokens: int
    group_size: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    vocab_limit: int = 0  # > 0: only ids below it are sampled (a tokenizer smaller than the model's vocab)

    def __post_init__(self):
        check_fields("config.sampling", [
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "must be >= 1"),
            ("group_size", self.group_size, self.group_size >= 1, "must be >= 1"),
            ("temperature", self.temperature, finite(self.temperature) and self.temperature >= 0,
             "must be a number >= 0 (0 is greedy)"),
            ("top_k", self.top_k, self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", self.top_p, finite(self.top_p) and 0 < self.top_p <= 1,
             "must be in (0, 1] (1 disables it)"),
            ("min_p", self.min_p, finite(self.min_p) and 0 <= self.min_p < 1,
             "must be in [0, 1) (0 disables it)"),
            ("vocab_limit", self.vocab_limit, self.vocab_limit >= 0, "must be >= 0 (0 disables it)"),
            ("buckets", self.buckets,
             len(self.buckets) > 0 and list(self.buckets) == sorted(set(self.buckets)),
             "must be a non-empty increasing tuple of prompt lengths"),
        ])
        object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


class SampleOutput(NamedTuple):
    """Completions of N prompts x G samples, B = N * G rows, the G samples of a prompt contiguous."""

    tokens: jax.Array  # [B, T] int32 completion tokens, pad_id after the end
    mask: jax.Array  # [B, T] bool, true on completion tokens (up to and including the stop token)
    lengths: jax.Array  # [B] int32 number of completion tokens
    truncated: jax.Array  # [B] bool, no stop token within max_new_tokens
    logprobs: jax.Array  # [B, T] float32 log pi(token) at `temperature` before top-k/p/min-p; 0 off mask
    prompt_tokens: jax.Array  # [N, P] int32, left-padded to the bucket P
    prompt_mask: jax.Array  # [N, P] bool, false on padding
    # Multi-turn episodes (`grpo_jax.multiturn`): [B, T] bool, true on every token of the episode (the
    # policy's and the observations'); `mask` then marks the policy's tokens only. None: `mask` is both.
    sequence_mask: jax.Array | None = None


def _filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Set logits outside the top-k / top-p / min-p sets to -inf. logits `[B, V]` already / temperature."""
    neg_inf = jnp.finfo(logits.dtype).min
    if cfg.top_k:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if cfg.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays when the mass
        # of the tokens strictly more likely than it is < top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        num_kept = jnp.sum(mass_before < cfg.top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    if cfg.min_p > 0.0:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        cutoff = jnp.max(log_probs, axis=-1, keepdims=True) + np.log(cfg.min_p)
        logits = jnp.where(log_probs < cutoff, neg_inf, logits)
    return logits


DRAW_BLOCK = 256  # ids per block of the two-level inverse-CDF draw


def draw(logits: jax.Array, key: jax.Array) -> jax.Array:
    """One exact draw per row from softmax(logits `[B, V]`), `[B]` int32, by inverse CDF in two levels.

    The Gumbel-max trick (`jax.random.categorical`) draws V random numbers per row and takes an argmax
    over V: at a 49152-word vocabulary that is most of a decode step on a CPU. One uniform per row is
    enough: pick the block of `DRAW_BLOCK` ids whose cumulative mass first exceeds u * total, then the id
    within it. Cumulative sums stay short (V / 256 blocks, 256 ids), so float32 rounding stays ~1e-7 of
    the mass. An id of probability 0 (a -inf logit, a filtered one) is never drawn.
    """
    batch, vocab = logits.shape
    blocks = -(-vocab // DRAW_BLOCK)
    logits = logits.astype(jnp.float32)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.pad(probs, ((0, 0), (0, blocks * DRAW_BLOCK - vocab))).reshape(batch, blocks, DRAW_BLOCK)
    mass = probs.sum(axis=-1)  # [B, blocks]
    cumulative = jnp.cumsum(mass, axis=-1)
    target = jax.random.uniform(key, (batch, 1)) * cumulative[:, -1:]

    def first_above(cum, values, target):
        """Index of the first entry whose cumulative value exceeds target (clamped to the last entry of
        positive value, for a target at the total after rounding)."""
        index = jnp.sum(cum <= target, axis=-1)
        last = jnp.max(jnp.where(values > 0, jnp.arange(values.shape[-1]), 0), axis=-1)
        return jnp.minimum(index, last)

    block = first_above(cumulative, mass, target)  # [B]
    within = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [B, DRAW_BLOCK]
    before = jnp.take_along_axis(cumulative - mass, block[:, None], axis=1)  # mass of earlier blocks
    offset = first_above(jnp.cumsum(within, axis=-1), within, jnp.maximum(target - before, 0.0))
    return (block * DRAW_BLOCK + offset).astype(jnp.int32)


def next_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """The sampler's draw from float32 logits `[B, V]` under `cfg` (temperature, vocab_limit, top-k/p,
    min-p): (token `[B]`, its log-prob at the temperature before the filters `[B]`)."""
    logits = logits / (cfg.temperature or 1.0)
    if cfg.vocab_limit:  # the model's vocabulary is padded past the tokenizer's: never emit those ids
        allowed = jnp.arange(logits.shape[-1]) < cfg.vocab_limit
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # of the distribution sampled from (before filters)
    if cfg.temperature == 0.0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        token = draw(_filter_logits(logits, cfg), key)
    return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


class _DecodeState(NamedTuple):
    step: jax.Array  # [] int32
    logits: jax.Array  # [B, V] float32, next-token logits
    cache: Cache
    tokens: jax.Array  # [B, T]
    logprobs: jax.Array  # [B, T]
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, ended by a stop token


def _row_sharding(sharding: NamedSharding, ndim: int) -> NamedSharding:
    """The batch-axis sharding of `sharding` for an array of rank `ndim`."""
    return NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0], *([None] * (ndim - 1))))


def _generate(graphdef, state, prompt_tokens, prompt_mask, key, cfg: SamplingConfig,
              sharding: NamedSharding | None):
    model: Transformer = nnx.merge(graphdef, state)
    num_prompts = prompt_tokens.shape[0]
    batch, length = num_prompts * cfg.group_size, cfg.max_new_tokens

    def shard(x):  # keep the batch axis on the mesh's data axes
        return x if sharding is None else jax.lax.with_sharding_constraint(x, _row_sharding(sharding, x.ndim))

    # Prefill once per prompt: its keys/values become the prefix shared by its G samples.
    hidden, prompt_kv = model(prompt_tokens, positions_from_mask(prompt_mask), causal_mask(prompt_mask))
    prefix = Prefix(prompt_kv, prompt_mask)
    unembedding = model.unembedding()
    first_logits = einsum_f32("nd,dv->nv", hidden[:, -1], unembedding)  # [N, V]
    start = jnp.repeat(prompt_mask.sum(axis=1), cfg.group_size)[:, None]  # [B, 1] first completion position

    def cond(s: _DecodeState):
        return (s.step < length) & ~jnp.all(s.done)

    def body(s: _DecodeState) -> _DecodeState:
        token, logprob = next_token(s.logits, jax.random.fold_in(key, s.step), cfg)
        token = jnp.where(s.done, cfg.pad_id, token)
        logprob = jnp.where(s.done, 0.0, logprob)
        stop = jnp.isin(token, jnp.asarray(cfg.stop_tokens, jnp.int32)) & ~s.done
        # This step's token enters the cache of the rows still running; it attends to the prefix and to
        # the row's earlier completion tokens.
        cache_mask = s.cache.mask.at[:, s.step].set(~s.done)
        cache = Cache(s.cache.kv, cache_mask, s.step)
        hidden, kv = model(token[:, None], start + s.step, cache_mask[:, None, :], cache=cache, prefix=prefix)
        logits = einsum_f32("bd,dv->bv", hidden[:, 0], unembedding)
        return _DecodeState(
            step=s.step + 1,
            logits=shard(logits),
            cache=Cache(kv, cache_mask, s.step + 1),
            tokens=jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step)),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step)),
            done=s.done | stop,
            stopped=s.stopped | stop,
        )

    phases = cache_phases(length)
    state = _DecodeState(
        step=jnp.zeros((), jnp.int32),
        logits=shard(jnp.repeat(first_logits, cfg.group_size, axis=0)),
        cache=init_cache(model.config, batch, phases[0]),
        tokens=shard(jnp.full((batch, length), cfg.pad_id, jnp.int32)),
        logprobs=shard(jnp.zeros((batch, length), jnp.float32)),
        done=jnp.zeros((batch,), bool),
        stopped=jnp.zeros((batch,), bool),
    )
    # The cache grows by doubling: each phase decodes up to its capacity, then the cache is padded to the
    # next one. Every step reads a cache at most twice as long as its filled part, not max_new_tokens long.
    for capacity in phases:
        state = state._replace(cache=grow_cache(state.cache, capacity))
        state = jax.lax.while_loop(lambda s, end=capacity: cond(s) & (s.step < end), body, state)
    final = state
    mask = final.cache.mask  # a slot is filled exactly when its token belongs to the completion
    lengths = mask.sum(axis=1).astype(jnp.int32)
    return final.tokens, mask, lengths, ~final.stopped, final.logprobs


_generate_jit = jax.jit(_generate, static_argnums=(0, 5, 6))

FIRST_CACHE_PHASE = 32


def cache_phases(max_new_tokens: int) -> tuple[int, ...]:
    """Capacities of the growing decode cache: 32, 64, ... doubling, the last one max_new_tokens."""
    phases = [min(FIRST_CACHE_PHASE, max_new_tokens)]
    while phases[-1] < max_new_tokens:
        phases.append(min(2 * phases[-1], max_new_tokens))
    return tuple(phases)


def grow_cache(cache: Cache, capacity: int) -> Cache:
    """`cache` with empty slots appended up to `capacity` (unchanged when it already has that many)."""
    extra = capacity - cache.mask.shape[1]
    if extra == 0:
        return cache
    key_pad, value_pad = ((0, 0), (0, 0), (0, 0), (0, extra)), ((0, 0), (0, 0), (0, extra), (0, 0))
    kv = tuple(KV(jnp.pad(layer.k, key_pad), jnp.pad(layer.v, value_pad)) for layer in cache.kv)
    return Cache(kv, jnp.pad(cache.mask, ((0, 0), (0, extra))), cache.index)


def fold_key(key: jax.Array, index: jax.Array | int) -> jax.Array:
    """`jax.random.fold_in(key, index)`, folded in jit: a step, round, turn or minibatch index (an int below
    2**31) goes in as a device scalar put there once per value (`device_index`), with no transfer or eager
    op per call."""
    return _fold_in(key, device_index(index) if isinstance(index, int | np.integer) else index)


_fold_in = jax.jit(jax.random.fold_in)


@functools.lru_cache(maxsize=4096)
def device_index(index: int) -> jax.Array:
    """The int32 scalar `index` on the default device: put there explicitly the first time a value is asked
    for and kept, so the loop's indices (rounds, turns, minibatches) cost no transfer after the first
    iteration."""
    return jax.device_put(np.int32(index))


def pad_prompts(prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int):
    """Left-pad token lists into `[N, P]` with P the smallest bucket that fits the longest prompt."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists.")
    longest = max(len(p) for p in prompts)
    fitting = [b for b in buckets if b >= longest]
    if not fitting:
        raise ValueError(f"a prompt has {longest} tokens, more than the largest bucket {max(buckets)}; "
                         "truncate prompts or add a larger bucket to SamplingConfig.buckets.")
    tokens = np.full((len(prompts), fitting[0]), pad_id, np.int32)
    mask = np.zeros((len(prompts), fitting[0]), bool)
    for i, prompt in enumerate(prompts):
        tokens[i, fitting[0] - len(prompt):] = prompt
        mask[i, fitting[0] - len(prompt):] = True
    return tokens, mask


def prompt_sharding(mesh: Mesh | None, num_prompts: int) -> NamedSharding | None:
    """`[N, P]` prompts split over the mesh's "data" and "fsdp" axes."""
    if mesh is None:
        return None
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    if num_prompts % shards:
        raise ValueError(f"{num_prompts} prompts cannot be split over the mesh's {axes} axes ({shards} "
                         "shards); pass a multiple of that many prompts.")
    return NamedSharding(mesh, PartitionSpec(axes, None))


def sample(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    config: SamplingConfig,
    *,
    mesh: Mesh | None = None,
) -> SampleOutput:
    """Sample `config.group_size` completions for each prompt.

    Args:
      model: the policy.
      prompts: N token-id lists (no padding).
      key: a PRNG key used for this call only; pass a new one every call.
      config: sampling settings (static: one compilation per bucket and config).
      mesh: when given, prompts and samples are sharded over its "data"/"fsdp" axes (N must divide).

    Returns:
      SampleOutput with B = N * G rows, the G samples of prompt i in rows i*G .. i*G+G-1.
    """
    cfg = model.config
    if any(not 0 <= t < cfg.vocab_size for t in config.stop_tokens):
        raise ValueError(f"config.sampling.stop_tokens={config.stop_tokens} must be ids < vocab_size="
                         f"{cfg.vocab_size}.")
    tokens, mask = pad_prompts(prompts, config.buckets, config.pad_id)
    if tokens.shape[1] + config.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt bucket {tokens.shape[1]} + max_new_tokens={config.max_new_tokens} exceeds the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}; shorten prompts or completions.")
    if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={cfg.vocab_size}).")
    sharding = prompt_sharding(mesh, len(prompts))
    if sharding is None:
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    else:  # every process holds the same prompts; each places the shards of its own devices
        tokens, mask = put_global(tokens, sharding), put_global(mask, sharding)
    graphdef, state = nnx.split(model)
    out = _generate_jit(graphdef, state, tokens, mask, key, config, sharding)
    return SampleOutput(*out, prompt_tokens=tokens, prompt_mask=mask)
