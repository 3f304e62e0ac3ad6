"""Hugging Face checkpoints in and out: `config.json` <-> `ModelConfig`, `*.safetensors` <-> parameters.

No torch: safetensors files are read through `numpy.memmap`, one tensor at a time, straight into the
parameter it belongs to, so a checkpoint never exists twice in host memory. Sharded checkpoints are
followed through `model.safetensors.index.json`. Supported: LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM (config.json in the transformers 4.x or 5.x layout).
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from grpo_jax.models.config import ModelConfig, RopeScaling
from grpo_jax.models.transformer import Transformer

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------- config


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """`config.json` (as a dict) -> ModelConfig; `overrides` set e.g. dtype="bfloat16", remat=True."""
    architecture = (hf_config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"config.json architectures={hf_config.get('architectures')} is not supported; grpo_jax loads "
            f"{ARCHITECTURES}.")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json hidden_act={hf_config['hidden_act']!r}: only 'silu' (SwiGLU) is supported.")
    # transformers 5 nests RoPE settings in rope_parameters; 4.x has rope_theta + rope_scaling.
    rope = dict(hf_config.get("rope_parameters") or {})
    legacy = hf_config.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = None
    if rope_type == "llama3":
        params = {**legacy, **rope}
        scaling = RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ValueError(f"config.json rope type {rope_type!r} is not supported; use 'default' or 'llama3'.")
    if hf_config.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true is not supported; set it to false.")
    if architecture == "LlamaForCausalLM" and hf_config.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported.")
    num_heads = hf_config["num_attention_heads"]
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads,
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=architecture == "Qwen2ForCausalLM" or bool(hf_config.get("attention_bias", False)),
        qk_norm=architecture == "Qwen3ForCausalLM",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> `config.json` dict (transformers 4.x layout, which 5.x also reads)."""
    architecture, model_type = (("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else
                                ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else
                                ("LlamaForCausalLM", "llama"))
    hf = dict(
        architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.qkv_bias, torch_dtype=cfg.param_dtype,
    )
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = dict(rope_type="llama3", **vars(cfg.rope_scaling))
    return hf


# ----------------------------------------------------------------------------- safetensors


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header, 8 + size


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    return files


def iter_safetensors(directory: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, memory-mapped array) for every tensor of a (possibly sharded) checkpoint directory."""
    for path in _safetensors_files(pathlib.Path(directory)):
        header, data_start = _read_header(path)
        header.pop("__metadata__", None)
        for name, info in header.items():
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            count = (end - begin) // dtype.itemsize
            yield name, np.memmap(path, dtype, "r", data_start + begin, (count,)).reshape(info["shape"])


def write_safetensors(path: str | pathlib.Path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write `tensors` (C-contiguous numpy arrays) to one safetensors file."""
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = dict(dtype=_ST_NAMES[array.dtype], shape=list(array.shape),
                            data_offsets=[offset, offset + array.nbytes])
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


# ----------------------------------------------------------------------------- parameters


def _param_map(cfg: ModelConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (path of our nnx.Param, transpose?). HF Linear weights are `[out, in]`."""
    names = {
        "model.embed_tokens.weight": (("embed",), False),
        "model.norm.weight": (("final_norm", "scale"), False),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        names[hf + "input_layernorm.weight"] = ((*ours, "attn_norm", "scale"), False)
        names[hf + "post_attention_layernorm.weight"] = ((*ours, "mlp_norm", "scale"), False)
        for proj in ("q", "k", "v", "o"):
            names[hf + f"self_attn.{proj}_proj.weight"] = ((*ours, "attn", proj, "kernel"), True)
        if cfg.qkv_bias:
            for proj in ("q", "k", "v"):
                names[hf + f"self_attn.{proj}_proj.bias"] = ((*ours, "attn", proj, "bias"), False)
        if cfg.qk_norm:
            names[hf + "self_attn.q_norm.weight"] = ((*ours, "attn", "q_norm", "scale"), False)
            names[hf + "self_attn.k_norm.weight"] = ((*ours, "attn", "k_norm", "scale"), False)
        for proj in ("gate", "up", "down"):
            names[hf + f"mlp.{proj}_proj.weight"] = ((*ours, "mlp", proj, "kernel"), True)
    return names


def _variable(model: Transformer, path: tuple) -> nnx.Variable:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def load_hf_checkpoint(directory: str | pathlib.Path, **overrides) -> Transformer:
    """A Transformer with the weights of a Hugging Face checkpoint directory (config.json + safetensors).

    `overrides` go to the ModelConfig (e.g. param_dtype="bfloat16", dtype="bfloat16", remat=True).
    Raises ValueError naming unsupported architectures, missing tensors and shape mismatches.
    """
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: pass a Hugging Face checkpoint directory.")
    cfg = config_from_hf(json.loads(config_path.read_text()), **overrides)
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))  # shapes only, no memory
    expected = _param_map(cfg)
    seen = set()
    for name, array in iter_safetensors(directory):
        if name not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints store the (identical) head anyway
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"{directory}: tensor {name!r} has no place in a {cfg.num_layers}-layer model "
                             "of this config; is config.json from the same checkpoint?")
        path, transpose = expected[name]
        variable = _variable(model, path)
        value = array.T if transpose else array
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{directory}: tensor {name!r} has shape {array.shape}, expected "
                             f"{tuple(reversed(variable.shape)) if transpose else variable.shape}.")
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"({len(missing)} in all).")
    return model


def save_hf_checkpoint(model: Transformer, directory: str | pathlib.Path,
                       max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`) for transformers."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    shards, current, size = [], {}, 0
    for name, (path, transpose) in _param_map(cfg).items():
        array = np.asarray(jax.device_get(_variable(model, path)[...]))
        array = np.ascontiguousarray(array.T if transpose else array)
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / filename, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(a.nbytes for shard in shards for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
