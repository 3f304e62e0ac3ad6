"""Flax NNX decoder family (Llama 3.x / Qwen2 / Qwen3), KV cache, Hugging Face and GGUF import/export."""

from grpo_jax.models.config import ModelConfig, RopeScaling
from grpo_jax.models.gguf import (
    WRITE_TYPES,
    config_from_gguf,
    load_gguf_checkpoint,
    read_gguf,
    save_gguf_checkpoint,
)
from grpo_jax.models.hf import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint
from grpo_jax.models.pretrained import is_gguf, load_pretrained, packaged_file, pretrained_config
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
    "WRITE_TYPES",
    "KV",
    "Cache",
    "ModelConfig",
    "Prefix",
    "RopeScaling",
    "Transformer",
    "causal_mask",
    "config_from_gguf",
    "config_from_hf",
    "config_to_hf",
    "forward_logits",
    "init_cache",
    "is_gguf",
    "load_gguf_checkpoint",
    "load_hf_checkpoint",
    "load_pretrained",
    "packaged_file",
    "positions_from_mask",
    "pretrained_config",
    "read_gguf",
    "save_gguf_checkpoint",
    "save_hf_checkpoint",
]
