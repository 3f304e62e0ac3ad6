"""`ModelConfig`: one frozen dataclass for the Llama 3.x / Qwen2 / Qwen2.5 / Qwen3 decoder family."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x "llama3" RoPE frequency scaling (long-context extension of Llama 3.1)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

    Llama 3.x: rope_scaling=RopeScaling(...), untied embeddings (1B/3B tie them).
    Qwen2 / 2.5: qkv_bias=True. Qwen3: qk_norm=True (RMSNorm on each head of q and k), head_dim set.
    Frozen and hashable, so it can be a static argument of jitted functions and is saved with checkpoints.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    param_dtype: str = "float32"  # storage dtype of the parameters
    dtype: str = "float32"  # compute dtype of activations and matmuls (bfloat16 on TPU/GPU)
    remat: bool = False  # recompute each layer's activations in the backward pass

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r} must be a positive int.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (GQA).")
        if self.head_dim < 0 or self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(
                f"ModelConfig head_dim={self.head_dim}, rms_norm_eps={self.rms_norm_eps} and rope_theta="
                f"{self.rope_theta} must be positive (head_dim=0 means hidden_size // num_heads).")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig.num_heads={self.num_heads} must divide hidden_size={self.hidden_size}, "
                    "or set head_dim explicitly.")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE.")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} must be one of {DTYPES}.")

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attention = d * hd * (h + 2 * kv) + h * hd * d
        if self.qkv_bias:
            attention += hd * (h + 2 * kv)
        if self.qk_norm:
            attention += 2 * hd
        layer = attention + 3 * d * self.intermediate_size + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + d

    def rope_inv_freq(self) -> np.ndarray:
        """`[head_dim / 2]` float32 inverse frequencies, with llama3 scaling when configured."""
        inv_freq = 1.0 / self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        scaling = self.rope_scaling
        if scaling is not None:
            old_len = scaling.original_max_position_embeddings
            low_wavelen = old_len / scaling.low_freq_factor
            high_wavelen = old_len / scaling.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
            smooth = (old_len / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv_freq = np.where(medium, smoothed, scaled)
        return inv_freq.astype(np.float32)
