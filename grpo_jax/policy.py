"""The policy's forward over completions, and the strided split of a batch into parts of whole groups.

Every forward over completions (rollout scoring, reference and old log-probs, the update, the critic, the
supervised warm start) runs the prompt once per group: the prompt's keys/values are a shared prefix for its
G completions, so gradients reach the prompt positions through the broadcast.

Two masks describe a completion. `completion_mask` marks the tokens that are trained on (the policy's own);
`sequence_mask` marks every token of the sequence the model reads. They differ in multi-turn episodes
(`grpo_jax.multiturn`): an observation's tokens are read by the later turns but were not written by the
policy, so they get no loss. When a batch has no `sequence_mask`, the completion mask is both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.logprobs import token_logprobs
from grpo_jax.models.transformer import Prefix, Transformer, causal_mask, positions_from_mask

LOGPROB_FIELDS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")


def sequence_mask(batch: dict[str, jax.Array]) -> jax.Array:
    """The batch's `[B, T]` mask of the tokens the model reads (policy and observation tokens): its
    `sequence_mask`, or the completion mask when the completions are the policy's alone."""
    return batch.get("sequence_mask", batch["completion_mask"])


def completion_hidden(model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      completion_tokens: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """`[B, T, D]` final hidden states at the positions that predict each completion token (the state
    before token t is chosen).

    The N prompts `[N, P]` (left-padded) run once; their keys/values are the shared prefix of the
    B = N * G completion rows `[B, T]` (right-padded). `completion_mask` here is the mask of the tokens
    read (a multi-turn batch's sequence mask).
    """
    num_prompts = prompt_tokens.shape[0]
    group = completion_tokens.shape[0] // num_prompts
    prompt_positions = positions_from_mask(prompt_mask)
    hidden_prompt, prompt_kv = model(prompt_tokens, prompt_positions, causal_mask(prompt_mask))
    inputs, input_mask = completion_tokens[:, :-1], completion_mask[:, :-1]
    start = jnp.repeat(prompt_mask.sum(axis=1), group)[:, None]  # [B, 1]
    positions = start + jnp.arange(inputs.shape[1])[None]
    hidden, _ = model(inputs, positions, causal_mask(input_mask), prefix=Prefix(prompt_kv, prompt_mask))
    # The prompt's last hidden state predicts the first completion token.
    return jnp.concatenate([jnp.repeat(hidden_prompt[:, -1:], group, axis=0), hidden], axis=1)


def completion_logprobs(
    model: Transformer,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    vocab_limit: int = 0,
    sequence_mask: jax.Array | None = None,
):
    """log pi(completion tokens | prompt) `[B, T]` (and the entropy `[B, T]` with `return_entropy`), each
    prompt computed once for its G completions: equal to the plain forward over [prompt ; completion] rows,
    at a fraction of the prompt cost.

    `sequence_mask` (default: `completion_mask`) marks the tokens attended to; a multi-turn episode's
    observation tokens are in it and not in `completion_mask` (the result is computed at every position;
    the caller's loss reads it under `completion_mask`).

    `vocab_limit` > 0: the distribution over the ids below it, the one the sampler draws from when the
    model's vocabulary is padded past the tokenizer's (`SamplingConfig.vocab_limit`). Over the whole
    padded vocabulary the trained policy would not be the sampled one: log pi(y) = log pi_sampled(y) +
    log Z, with Z the mass on the ids the sampler may emit, and a negative advantage would also push mass
    onto the never-sampled ids.
    """
    attended = completion_mask if sequence_mask is None else sequence_mask
    hidden = completion_hidden(model, prompt_tokens, prompt_mask, completion_tokens, attended)
    unembedding = model.unembedding()
    if vocab_limit:
        unembedding = unembedding[:, :vocab_limit]
    return token_logprobs(hidden, unembedding, completion_tokens, temperature=temperature,
                          chunk_size=chunk_size, return_entropy=return_entropy)


def split_groups(x: jax.Array, parts: int, rows_per_prompt: int) -> jax.Array:
    """`[n * rows_per_prompt, ...]` -> `[parts, n / parts * rows_per_prompt, ...]`, whole groups per part.

    Part j holds prompts j, parts + j, 2 * parts + j, ... (with their rows): strided, not contiguous, so that
    each data shard of the batch (a contiguous block of prompts) holds its equal share of every part and
    splitting moves nothing between devices. `merge_groups` puts the rows back in order.
    """
    prompts = x.shape[0] // rows_per_prompt
    x = x.reshape(prompts // parts, parts, rows_per_prompt, *x.shape[1:])
    return x.swapaxes(0, 1).reshape(parts, (prompts // parts) * rows_per_prompt, *x.shape[3:])


def merge_groups(x: jax.Array, rows_per_prompt: int) -> jax.Array:
    """The inverse of `split_groups`: `[parts, rows, ...]` -> `[parts * rows, ...]` in the batch's order."""
    parts, rows = x.shape[:2]
    x = x.reshape(parts, rows // rows_per_prompt, rows_per_prompt, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(parts * rows, *x.shape[3:])


def split_batch(batch: dict[str, jax.Array], parts: int, group_size: int) -> dict[str, jax.Array]:
    """`split_groups` of every field: prompt fields have one row per prompt, the others `group_size`."""
    return {k: split_groups(v, parts, 1 if k.startswith("prompt_") else group_size) for k, v in batch.items()}


def batch_logprobs(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], *,
                   group_size: int, parts: int = 1, temperature: float = 1.0, chunk_size: int = 1024,
                   vocab_limit: int = 0) -> jax.Array:
    """`[B, T]` log-probs of a whole batch's completions under `params`, computed in `parts` sequential
    parts of whole groups (`lax.map`), so memory is that of one part: the reference and old log-probs of a
    batch, in the update's microbatches."""
    def logprobs(part):
        # The model is built inside the mapped function, with variables of its own: NNX transforms (remat)
        # cannot update variables made in an outer trace.
        return completion_logprobs(nnx.merge(graphdef, params, copy=True), *(part[k] for k in LOGPROB_FIELDS),
                                   temperature=temperature, chunk_size=chunk_size, vocab_limit=vocab_limit,
                                   sequence_mask=part["sequence_mask"])

    fields = {**{k: batch[k] for k in LOGPROB_FIELDS}, "sequence_mask": sequence_mask(batch)}
    if parts == 1:
        return logprobs(fields)
    split = split_batch(fields, parts, group_size)
    return merge_groups(jax.lax.map(logprobs, split), group_size)  # [parts, rows, T] -> [B, T]
