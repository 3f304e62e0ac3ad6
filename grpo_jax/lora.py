"""Low-rank adapters (LoRA, arXiv 2106.09685) on the policy's projections, as pure functions of param trees.

A target kernel W `[in, out]` is used as W + (alpha / rank) * A @ B, with A `[in, rank]` and B `[rank, out]`
the only trained arrays. B starts at zero, so the adapted policy starts as the base model exactly. The base
params never change: they get no gradient and no optimizer state, and they are the reference policy of the
KL term (the adapters off), so a run with beta > 0 stores no copy of the weights.

    adapters = init_adapters(params, LoRAConfig(rank=16), key)   # {"layers.0.attn.q": {"a", "b"}, ...}
    policy = merge(params, adapters, cfg)                        # the base params with W + s A B

`merge` is what both the sampler (once per iteration) and the training forward use, so they evaluate the
same weights; gradients reach A and B through it. The merged kernels exist only inside the jitted step, but
there they are made for the whole model before the forward pass and live through the backward pass: the
train step holds a second copy of the adapted weights (12 GiB for Qwen2.5-7B in bfloat16,
`experiments/benchmarks/memory.py`). Merging inside each layer would remove it.

Adapters export to the PEFT layout (`peft_tensors`: `lora_A` `[rank, in]`, `lora_B` `[out, rank]` in
Hugging Face's `[out, in]` orientation); the merged model exports as an ordinary Hugging Face checkpoint:

    export_merged(base_model, "out/merged", adapters, cfg)     # config.json + model.safetensors
    export_adapters(adapters, cfg, "out/adapters", base_model="Qwen/Qwen2.5-0.5B")   # PEFT's two files
    adapters, cfg = load_adapters("out/adapters")              # and back (PEFT-saved adapters too)

experiments/export.py does either for a run's latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax._trees import path_names
from grpo_jax._validation import check_fields
from grpo_jax.models.hf import HF_PROJECTIONS, iter_safetensors, save_hf_checkpoint, write_safetensors
from grpo_jax.models.transformer import Transformer

# LoRA target name -> (block, projection) in the model's param tree: layers.<i>.<block>.<projection>.kernel
TARGETS = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
           "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}
# Hugging Face module names of the targets (PEFT's target_modules).
HF_NAMES = {target: HF_PROJECTIONS[path] for target, path in TARGETS.items()}

Adapters = dict[str, dict[str, jax.Array]]
QUANTIZE = ("", "int8")


class Int8Kernel(NamedTuple):
    """A frozen kernel stored as int8 with one scale per output column: W ~ q * scale (QLoRA's base)."""

    q: jax.Array  # int8 [in, out]
    scale: jax.Array  # [out], in the kernel's own dtype, which the dequantized kernel takes

    def dequantize(self) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(self.scale.dtype)


def is_int8_kernel(x) -> bool:
    return isinstance(x, Int8Kernel)


def quantize_base(params: nnx.State, cfg: LoRAConfig) -> nnx.State:
    """`params` with every targeted kernel stored as an Int8Kernel (symmetric, per output column, the
    largest magnitude of a column at 127): a quarter of float32's bytes, half of bfloat16's."""
    def leaf(path, x):
        if _adapter_key(_names(path), cfg) is None:
            return x
        x32 = x.astype(jnp.float32)
        scale = jnp.max(jnp.abs(x32), axis=0) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8)
        return Int8Kernel(q, scale.astype(x.dtype))

    return jax.tree_util.tree_map_with_path(leaf, params)


def dequantize(params: nnx.State) -> nnx.State:
    """`params` with every Int8Kernel as the kernel it stands for (a no-op on unquantized params): the
    reference policy of a QLoRA run."""
    return jax.tree.map(lambda x: x.dequantize() if is_int8_kernel(x) else x, params, is_leaf=is_int8_kernel)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """`config.lora`: train low-rank adapters instead of every weight (rank 0: full fine-tuning)."""

    rank: int = 0  # 0: off (every param is trained)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    quantize: str = ""  # "int8": QLoRA, the frozen targeted kernels stored as int8 (computed dequantized)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        check_fields("config.lora", [
            ("rank", self.rank, isinstance(self.rank, int) and not isinstance(self.rank, bool)
             and self.rank >= 0, "must be an integer >= 0 (0: full fine-tuning; 8-64 are usual)"),
            ("alpha", self.alpha, isinstance(self.alpha, int | float) and math.isfinite(self.alpha)
             and self.alpha > 0, "must be a finite number > 0 (the update is scaled by alpha / rank)"),
            ("targets", self.targets, bool(self.targets) and set(self.targets) <= set(TARGETS),
             f"must be a non-empty tuple of {tuple(TARGETS)}"),
            ("quantize", self.quantize, self.quantize in QUANTIZE,
             f"must be one of {QUANTIZE} ('' keeps the base in its dtype, 'int8' is QLoRA)"),
            ("quantize", self.quantize, not self.quantize or self.rank > 0,
             "needs config.lora.rank > 0 (only a frozen base is quantized)"),
        ])

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _names(path: tuple) -> tuple[str, ...]:
    """A param's path names without nnx's trailing "value": ("layers", "0", "attn", "q", "kernel")."""
    return tuple(n for n in path_names(path) if n != "value")


def _adapter_key(names: tuple[str, ...], cfg: LoRAConfig) -> str | None:
    """"layers.3.attn.q" for a targeted kernel's path names, else None."""
    if len(names) == 5 and names[0] == "layers" and names[-1] == "kernel":
        wanted = {TARGETS[t] for t in cfg.targets}
        if (names[2], names[3]) in wanted:
            return ".".join(names[:4])
    return None


def init_adapters(params: nnx.State, cfg: LoRAConfig, key: jax.Array) -> Adapters:
    """Adapters for every targeted kernel of `params`: A ~ N(0, 1/in) and B = 0, in the kernel's dtype
    (their optimizer moments follow: bfloat16 params give bfloat16 adapters, as full fine-tuning would)."""
    if not cfg.enabled:
        raise ValueError("init_adapters needs config.lora.rank > 0.")
    kernels = [(k, x) for path, x in jax.tree_util.tree_leaves_with_path(params)
               if (k := _adapter_key(_names(path), cfg)) is not None]
    if not kernels:
        raise ValueError(f"config.lora.targets={cfg.targets} matches no kernel of the model.")
    keys = jax.random.split(key, len(kernels))
    return {name: {"a": (jax.random.normal(k, (x.shape[0], cfg.rank), jnp.float32)
                         / math.sqrt(x.shape[0])).astype(x.dtype),
                   "b": jnp.zeros((cfg.rank, x.shape[1]), x.dtype)}
            for (name, x), k in zip(kernels, keys, strict=True)}


def merge(params: nnx.State, adapters: Adapters, cfg: LoRAConfig) -> nnx.State:
    """`params` with every adapted kernel W replaced by W + (alpha / rank) * A @ B (in W's dtype; an
    Int8Kernel is dequantized first)."""
    def leaf(path, x):
        name = _adapter_key(_names(path), cfg)
        if name is None:
            return x.dequantize() if is_int8_kernel(x) else x
        w = x.dequantize() if is_int8_kernel(x) else x
        a, b = (adapters[name][k].astype(jnp.float32) for k in ("a", "b"))
        delta = cfg.scale * (a @ b)
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_int8_kernel)


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


# ----------------------------------------------------------------------------- export and import


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names
ADAPTER_CONFIG = "adapter_config.json"
# PEFT's target_modules (the last part of HF_NAMES) -> LoRA target name.
_PEFT_TARGETS = {hf.split(".")[-1]: target for target, hf in HF_NAMES.items()}
_merge_jit = jax.jit(merge, static_argnums=2)


def check_adapters(params: nnx.State, adapters: Adapters, cfg: LoRAConfig) -> None:
    """Raise ValueError unless `adapters` has exactly one {"a" [in, rank], "b" [rank, out]} pair for every
    kernel of `params` that `cfg.targets` names (what `init_adapters` makes), naming what differs."""
    kernels = {k: x.shape for path, x in jax.tree_util.tree_leaves_with_path(params)
               if (k := _adapter_key(_names(path), cfg)) is not None}
    missing, extra = sorted(set(kernels) - set(adapters)), sorted(set(adapters) - set(kernels))
    if missing or extra:
        raise ValueError(f"the adapters do not fit the model under config.lora.targets={cfg.targets}: "
                         f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected "
                         f"{extra[:4]}{' ...' if len(extra) > 4 else ''}. Pass the LoRAConfig the adapters "
                         "were trained with.")
    for name, (fan_in, fan_out) in kernels.items():
        ab = adapters[name]
        if set(ab) != {"a", "b"}:
            raise ValueError(f"adapter {name!r} has arrays {sorted(ab)}, expected 'a' and 'b'.")
        want = {"a": (fan_in, cfg.rank), "b": (cfg.rank, fan_out)}
        for part in ("a", "b"):
            if tuple(ab[part].shape) != want[part]:
                raise ValueError(f"adapter {name!r}: {part} has shape {tuple(ab[part].shape)}, expected "
                                 f"{want[part]} (config.lora.rank={cfg.rank}).")


def merged(model: Transformer, adapters: Adapters, cfg: LoRAConfig) -> Transformer:
    """`model` with `adapters` merged into its params: the policy a LoRA run samples from (the same
    compiled merge as the trainer's, so the same weights to the last bit)."""
    graphdef, params = nnx.split(model)
    return nnx.merge(graphdef, _merge_jit(params, adapters, cfg))


def export_merged(model: Transformer, directory: str | pathlib.Path, adapters: Adapters | None = None,
                  cfg: LoRAConfig | None = None, *, max_shard_bytes: int = 4 << 30) -> pathlib.Path:
    """Write `model` with `adapters` merged in as an ordinary Hugging Face checkpoint (config.json +
    safetensors, see `save_hf_checkpoint`), loadable by transformers or `load_hf_checkpoint` with no LoRA
    code. Returns `directory`.

    `model` is the base (the frozen params) and `adapters`/`cfg` the trained adapters and their LoRAConfig:
    each targeted kernel is written as W + (alpha / rank) * A @ B in W's dtype, exactly what `merge` (and so
    the trainer's sampler and train step) computes. Without `adapters`, `model` is written as it is, e.g.
    `export_merged(trainer.policy(), out)` (under LoRA the policy is already merged) or a full fine-tuning
    run's model. The adapters are checked against the model first (`check_adapters`).

        lora.export_merged(base_model, "out/merged", trainer.state.params, trainer.cfg.lora)

    Single process: every array must be addressable from this process (gather a multi-host model first).
    """
    if adapters is not None:
        if cfg is None or not cfg.enabled:
            raise ValueError("export_merged(model, directory, adapters, cfg): adapters need the LoRAConfig "
                             f"(rank > 0) they were trained with; got cfg={cfg!r}.")
        graphdef, params = nnx.split(model)
        check_adapters(params, adapters, cfg)
        model = nnx.merge(graphdef, _merge_jit(params, adapters, cfg))
    save_hf_checkpoint(model, directory, max_shard_bytes=max_shard_bytes)
    return pathlib.Path(directory)


def export_adapters(adapters: Adapters, cfg: LoRAConfig, directory: str | pathlib.Path,
                    base_model: str = "") -> pathlib.Path:
    """Write `adapters` in PEFT's layout: `adapter_model.safetensors` (`peft_tensors`: lora_A `[rank, in]`,
    lora_B `[out, rank]`, float32) and `adapter_config.json` (`peft_config`, with `base_model` as
    base_model_name_or_path: the Hugging Face model they apply to). PEFT adds (lora_alpha / r) * B @ A to
    each target's `[out, in]` weight, the same update as `merge`. Returns `directory`.

        lora.export_adapters(trainer.state.params, trainer.cfg.lora, "out/adapters", "Qwen/Qwen2.5-0.5B")
    """
    if not cfg.enabled:
        raise ValueError(f"export_adapters needs the adapters' LoRAConfig (rank > 0); got rank={cfg.rank}.")
    wanted = {TARGETS[t] for t in cfg.targets}
    for name, ab in adapters.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or (parts[2], parts[3]) not in {
                *TARGETS.values()}:
            raise ValueError(f"adapter name {name!r} is not 'layers.<i>.<block>.<projection>' of a LoRA "
                             f"target {tuple(TARGETS)}.")
        if (parts[2], parts[3]) not in wanted:
            raise ValueError(f"adapter {name!r} is not among config.lora.targets={cfg.targets}; pass the "
                             "LoRAConfig the adapters were trained with.")
        if ab["a"].shape[1] != cfg.rank or ab["b"].shape[0] != cfg.rank:
            raise ValueError(f"adapter {name!r}: a {tuple(ab['a'].shape)} and b {tuple(ab['b'].shape)} are "
                             f"not of config.lora.rank={cfg.rank}.")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in peft_tensors(adapters).items()}
    write_safetensors(directory / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
    return directory


def load_adapters(directory: str | pathlib.Path) -> tuple[Adapters, LoRAConfig]:
    """Adapters in PEFT's layout (as `export_adapters` writes them, or PEFT's `save_pretrained` of a LoRA on
    the q/k/v/o/gate/up/down projections of a Llama/Qwen model) -> (adapters, LoRAConfig), for `merge`,
    `export_merged` or to start training from. Raises ValueError for PEFT options grpo_jax does not compute
    (per-module ranks, rsLoRA, DoRA, fan_in_fan_out, biases, other modules)."""
    directory = pathlib.Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a directory of PEFT LoRA adapters.")
    peft = json.loads(config_path.read_text(encoding="utf-8"))
    unsupported = [f"{key}={peft[key]!r}" for key, ok in (
        ("peft_type", lambda v: v == "LORA"), ("use_rslora", lambda v: not v), ("use_dora", lambda v: not v),
        ("fan_in_fan_out", lambda v: not v), ("bias", lambda v: v in (None, "none")),
        ("rank_pattern", lambda v: not v), ("alpha_pattern", lambda v: not v),
        ("modules_to_save", lambda v: not v), ("layers_to_transform", lambda v: v is None),
        ("lora_bias", lambda v: not v), ("layer_replication", lambda v: not v),
        ("target_parameters", lambda v: not v), ("trainable_token_indices", lambda v: not v),
    ) if key in peft and not ok(peft[key])]
    modules = peft.get("target_modules") or []
    if isinstance(modules, str) or any(m not in _PEFT_TARGETS for m in modules):
        unsupported.append(f"target_modules={modules!r} (supported: {sorted(_PEFT_TARGETS)})")
    if unsupported:
        raise ValueError(f"{config_path}: {', '.join(unsupported)} is not supported by grpo_jax's LoRA.")
    cfg = LoRAConfig(rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                     targets=tuple(t for t in TARGETS if HF_NAMES[t].split(".")[-1] in modules))
    inverse = {HF_NAMES[t]: TARGETS[t] for t in cfg.targets}
    adapters: dict[str, dict[str, jax.Array]] = {}
    for tensor_name, array in iter_safetensors(directory):
        parts = tensor_name.split(".")
        # base_model.model.model.layers.<i>.<self_attn|mlp>.<x>_proj.lora_<A|B>[.<adapter>].weight
        lora_part, module = (parts[7], ".".join(parts[5:7])) if len(parts) in (9, 10) else ("", "")
        if (parts[:4] != ["base_model", "model", "model", "layers"] or not parts[4].isdigit()
                or module not in inverse or lora_part not in ("lora_A", "lora_B") or parts[-1] != "weight"):
            raise ValueError(f"{directory / ADAPTER_WEIGHTS}: tensor {tensor_name!r} is not a LoRA A or B "
                             f"of the target modules {modules}.")
        block, projection = inverse[module]
        ab = adapters.setdefault(f"layers.{parts[4]}.{block}.{projection}", {})
        ab["a" if lora_part == "lora_A" else "b"] = jnp.asarray(np.asarray(array, np.float32).T)
    incomplete = sorted(name for name, ab in adapters.items() if set(ab) != {"a", "b"})
    if incomplete or not adapters:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: adapters {incomplete} lack lora_A or lora_B"
                         if incomplete else f"{directory / ADAPTER_WEIGHTS} holds no LoRA tensors.")
    for name, ab in adapters.items():
        if ab["a"].shape[1] != cfg.rank or ab["b"].shape[0] != cfg.rank:
            raise ValueError(f"{directory / ADAPTER_WEIGHTS}: adapter {name!r} has rank "
                             f"{ab['a'].shape[1]}, but {ADAPTER_CONFIG} says r={cfg.rank}.")
    return adapters, cfg
