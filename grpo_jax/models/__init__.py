"""Flax NNX decoder family (Llama 3.x / Qwen2 / Qwen3), KV cache, Hugging Face import/export."""

from grpo_jax.models.config import ModelConfig, RopeScaling
from grpo_jax.models.hf import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint
from grpo_jax.models.transformer import (
    KV,
    Cache,
    Prefix,
    Transformer,
    causal_mask,
    forward_logits,
    init_cache,
    positions_from_mask,
)

__all__ = [
    "KV",
    "Cache",
    "ModelConfig",
    "Prefix",
    "RopeScaling",
    "Transformer",
    "causal_mask",
    "config_from_hf",
    "config_to_hf",
    "forward_logits",
    "init_cache",
    "load_hf_checkpoint",
    "positions_from_mask",
    "save_hf_checkpoint",
]
