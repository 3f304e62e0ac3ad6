"""Low-rank adapters (LoRA, arXiv 2106.09685) on the policy's projections, as pure functions of param trees.

A target kernel W `[in, out]` is used as W + (alpha / rank) * A @ B, with A `[in, rank]` and B `[rank, out]`
the only trained arrays. B starts at zero, so the adapted policy starts as the base model exactly. The base
params never change: they get no gradient and no optimizer state, and they are the reference policy of the
KL term (the adapters off), so a run with beta > 0 stores no copy of the weights.

    adapters = init_adapters(params, LoRAConfig(rank=16), key)   # {"layers.0.attn.q": {"a", "b"}, ...}
    policy = merge(params, adapters, cfg)                        # the base params with W + s A B

`merge` is what both the sampler (once per iteration) and the training forward use, so they evaluate the
same weights; gradients reach A and B through it. The merged kernels exist only inside the jitted step
(one layer's worth at a time is what XLA needs live in the backward pass, not a second copy of the model).

Adapters export to the PEFT layout (`peft_tensors`: `lora_A` `[rank, in]`, `lora_B` `[out, rank]` in
Hugging Face's `[out, in]` orientation); the merged model exports as an ordinary Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax._validation import check_fields

# LoRA target name -> (block, projection) in the model's param tree: layers.<i>.<block>.<projection>.kernel
TARGETS = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
           "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}
# Hugging Face module names of the targets (PEFT's target_modules).
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

Adapters = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """`config.lora`: train low-rank adapters instead of every weight (rank 0: full fine-tuning)."""

    rank: int = 0  # 0: off (every param is trained)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        check_fields("config.lora", [
            ("rank", self.rank, isinstance(self.rank, int) and not isinstance(self.rank, bool)
             and self.rank >= 0, "must be an integer >= 0 (0: full fine-tuning; 8-64 are usual)"),
            ("alpha", self.alpha, isinstance(self.alpha, int | float) and math.isfinite(self.alpha)
             and self.alpha > 0, "must be a finite number > 0 (the update is scaled by alpha / rank)"),
            ("targets", self.targets, bool(self.targets) and set(self.targets) <= set(TARGETS),
             f"must be a non-empty tuple of {tuple(TARGETS)}"),
        ])

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _names(path: tuple) -> tuple[str, ...]:
    names = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return tuple(n for n in names if n != "value")


def _adapter_key(names: tuple[str, ...], cfg: LoRAConfig) -> str | None:
    """"layers.3.attn.q" for a targeted kernel's path names, else None."""
    if len(names) == 5 and names[0] == "layers" and names[-1] == "kernel":
        wanted = {TARGETS[t] for t in cfg.targets}
        if (names[2], names[3]) in wanted:
            return ".".join(names[:4])
    return None


def init_adapters(params: nnx.State, cfg: LoRAConfig, key: jax.Array) -> Adapters:
    """Adapters for every targeted kernel of `params`: A ~ N(0, 1/in) and B = 0, in float32."""
    if not cfg.enabled:
        raise ValueError("init_adapters needs config.lora.rank > 0.")
    kernels = [(k, x) for path, x in jax.tree_util.tree_leaves_with_path(params)
               if (k := _adapter_key(_names(path), cfg)) is not None]
    if not kernels:
        raise ValueError(f"config.lora.targets={cfg.targets} matches no kernel of the model.")
    keys = jax.random.split(key, len(kernels))
    return {name: {"a": jax.random.normal(k, (x.shape[0], cfg.rank), jnp.float32) / math.sqrt(x.shape[0]),
                   "b": jnp.zeros((cfg.rank, x.shape[1]), jnp.float32)}
            for (name, x), k in zip(kernels, keys, strict=True)}


def merge(params: nnx.State, adapters: Adapters, cfg: LoRAConfig) -> nnx.State:
    """`params` with every adapted kernel W replaced by W + (alpha / rank) * A @ B (in W's dtype)."""
    def leaf(path, x):
        name = _adapter_key(_names(path), cfg)
        if name is None:
            return x
        delta = cfg.scale * (adapters[name]["a"] @ adapters[name]["b"])
        return (x.astype(jnp.float32) + delta).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


def adapter_bytes(adapters: Adapters) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters)))


def peft_tensors(adapters: Adapters) -> dict[str, Any]:
    """The adapters as PEFT's safetensors names and `[out, in]` orientation (numpy arrays)."""
    tensors = {}
    inverse = {v: k for k, v in TARGETS.items()}
    for name, ab in adapters.items():
        _, layer, block, projection = name.split(".")
        prefix = f"base_model.model.model.layers.{layer}.{HF_NAMES[inverse[(block, projection)]]}"
        tensors[f"{prefix}.lora_A.weight"] = jax.device_get(ab["a"]).T  # [rank, in]
        tensors[f"{prefix}.lora_B.weight"] = jax.device_get(ab["b"]).T  # [out, rank]
    return tensors


def peft_config(cfg: LoRAConfig, base_model: str = "") -> dict[str, Any]:
    """PEFT's adapter_config.json for these adapters."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "target_modules": sorted(HF_NAMES[t].split(".")[-1] for t in cfg.targets),
            "base_model_name_or_path": base_model, "inference_mode": True}
