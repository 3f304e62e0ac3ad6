"""Hugging Face checkpoints in and out: `config.json` <-> `ModelConfig`, `*.safetensors` <-> parameters.

No torch: safetensors files are read with the safetensors package's numpy framework, one tensor at a time,
straight into the parameter it belongs to, so a checkpoint never exists twice in host memory. Each file's
header is checked against the file first (dtypes, shapes, byte offsets, file length), so a truncated or
corrupt file raises a ValueError naming the file and tensor instead of loading garbage. Sharded checkpoints
are followed through `model.safetensors.index.json`. Supported: LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM (config.json in the transformers 4.x or 5.x layout).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from grpo_jax.models.config import ModelConfig, RopeScaling
from grpo_jax.models.transformer import Transformer

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# (block, projection) of our layers -> the Hugging Face module of a decoder layer.
HF_PROJECTIONS = {("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj",
                  ("attn", "v"): "self_attn.v_proj", ("attn", "o"): "self_attn.o_proj",
                  ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj",
                  ("mlp", "down"): "mlp.down_proj"}
_REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads")


# ----------------------------------------------------------------------------- config


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """`config.json` (as a dict) -> ModelConfig; `overrides` set e.g. dtype="bfloat16", remat=True."""
    architecture = (hf_config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"config.json architectures={hf_config.get('architectures')} is not supported; grpo_jax loads "
            f"{ARCHITECTURES}.")
    missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in hf_config]
    if missing:
        raise ValueError(f"config.json lacks {missing}, which every {architecture} config.json has; use the "
                         "config.json of the checkpoint, unedited.")
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
        keys = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
        if missing := [key for key in keys if key not in params]:
            raise ValueError(f"config.json rope type 'llama3' lacks {missing}; give all of {keys} in "
                             "rope_scaling (or rope_parameters).")
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

# Files are read and written by the safetensors package (numpy framework), one tensor in memory at a time.
# Each file's header is checked here as well before the package opens it: the package rejects most corrupt
# files too, but with errors ("incomplete metadata, file not fully covered") that name neither the tensor nor
# the offending values, and it lets through what grpo_jax cannot load: duplicate header keys (the last one
# wins) and dtypes outside _ST_DTYPES (F8_*, U16, C64, ...). BF16 reads as ml_dtypes.bfloat16, hence the
# safetensors>=0.4.1 requirement (0.4.0's numpy framework fails on BF16).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
_REEXPORT = "the file is truncated or corrupt; re-download or re-export the checkpoint"


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    counts = collections.Counter(key for key, _ in pairs)
    duplicates = sorted(key for key, count in counts.items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates[:4]}")
    return dict(pairs)


def _tensor_entry(path: pathlib.Path, name: str, info: object) -> tuple[str, str, list[int], int, int]:
    """One header entry checked on its own -> (name, dtype, shape, begin, end)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: header entry is {type(info).__name__} {info!r:.80}, expected an object "
                         f"with dtype, shape and data_offsets; {_REEXPORT}.")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise ValueError(f"{where}: header entry lacks {missing} (it has {sorted(info)}); {_REEXPORT}.")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
        raise ValueError(f"{where} has dtype {dtype_name!r}, which grpo_jax cannot read; supported dtypes: "
                         f"{', '.join(_ST_DTYPES)}. Convert the checkpoint to one of them (e.g. save it in "
                         "bfloat16 or float32).")

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(shape, list) or not all(map(is_int, shape)):
        raise ValueError(f"{where}: shape {shape!r:.80} is not a list of non-negative integers; {_REEXPORT}.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))):
        raise ValueError(f"{where}: data_offsets {offsets!r:.80} is not [begin, end] with non-negative "
                         f"integers; {_REEXPORT}.")
    return name, dtype_name, shape, offsets[0], offsets[1]


def _check_header(path: pathlib.Path) -> list[str]:
    """The tensor names of one safetensors file, in header order, once its header is checked against the file.

    Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON `{name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data section. Every entry must have a
    dtype of `_ST_DTYPES`, `end - begin == prod(shape) * itemsize`, and the entries must tile the data section
    exactly (no overlap, no gap, nothing past its end), as the format requires. Raises ValueError naming the
    file, the tensor and the value before any tensor is read.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: {file_size} bytes, shorter than the 8-byte header length of a "
                             f"safetensors file; {_REEXPORT}.")
        size = int.from_bytes(prefix, "little")
        if size > file_size - 8:
            raise ValueError(f"{path}: the header length field says {size} bytes, but the file has only "
                             f"{file_size - 8} bytes after it; {_REEXPORT}.")
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: the header length field says {size} bytes, more than the "
                             f"{MAX_HEADER_BYTES} the format allows; {_REEXPORT}.")
        raw = f.read(size)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: the {size}-byte header is not valid UTF-8 JSON ({e}); {_REEXPORT}.") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is a JSON {type(header).__name__}, expected an object "
                         f"{{tensor name: {{dtype, shape, data_offsets}}}}; {_REEXPORT}.")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: __metadata__ is {type(metadata).__name__} {metadata!r:.80}, expected an "
                         f"object; {_REEXPORT}.")
    entries = [_tensor_entry(path, name, info) for name, info in header.items()]
    data_size = file_size - 8 - size
    for name, dtype_name, shape, begin, end in entries:
        nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[dtype_name]).itemsize
        where = f"{path}: tensor {name!r} ({dtype_name}, shape {shape}): data_offsets [{begin}, {end}]"
        if begin > end:
            raise ValueError(f"{where} end before they begin; {_REEXPORT}.")
        if end - begin != nbytes:
            raise ValueError(f"{where} hold {end - begin} bytes, but the dtype and shape need {nbytes}; "
                             f"{_REEXPORT}.")
        if end > data_size:
            raise ValueError(f"{where} run past the end of the data section ({data_size} bytes); "
                             f"{_REEXPORT}.")
    position, previous = 0, None  # the data section must be covered exactly once, in offset order
    for entry in sorted(entries, key=lambda e: (e[3], e[4])):
        name, _, _, begin, end = entry
        if begin != position:
            what = (f"overlap tensor {previous[0]!r} at [{previous[3]}, {previous[4]}]" if begin < position
                    else f"leave bytes [{position}, {begin}] of the data section to no tensor")
            raise ValueError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] {what}; {_REEXPORT}.")
        position, previous = end, entry
    if position != data_size:
        raise ValueError(f"{path}: the data section has {data_size} bytes but its tensors cover only "
                         f"{position}; {_REEXPORT}.")
    return [entry[0] for entry in entries]


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map' object of "
                             f"tensor name -> file name): {type(e).__name__}: {e}; re-download or "
                             "re-export the checkpoint.") from e
        files = [directory / name for name in names]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files {missing} that are not in {directory}; "
                                    "download every shard of the checkpoint.")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    return files


def iter_safetensors(directory: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a (possibly sharded) checkpoint directory, read one at a time.

    Each file's header is checked against the file (see `_check_header`) before any of its tensors is
    yielded; a truncated or corrupt file raises ValueError naming the file and the tensor.
    """
    for path in _safetensors_files(pathlib.Path(directory)):
        names = _check_header(path)
        try:
            with safetensors.safe_open(path, framework="np") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except safetensors.SafetensorError as e:  # what _check_header lets through (non-string __metadata__)
            raise ValueError(f"{path}: the safetensors package cannot read it ({e}); {_REEXPORT}.") from e


def write_safetensors(path: str | pathlib.Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None):
    """Write `tensors` (numpy arrays of a dtype in `_ST_DTYPES`) to one safetensors file."""
    for name, array in tensors.items():
        if array.dtype not in _ST_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors files of "
                             f"grpo_jax cannot hold; cast it to one of {sorted(map(str, _ST_NAMES))}.")
    # The package writes each array's memory as it lies, so strided views are made C-contiguous first.
    contiguous = {name: np.asarray(array, order="C") for name, array in tensors.items()}
    try:
        safetensors.numpy.save_file(contiguous, path, metadata)
    except safetensors.SafetensorError as e:  # e.g. a missing directory or a full disk
        raise OSError(f"{path}: could not write the safetensors file ({e}); check that its directory "
                      "exists, is writable and has room.") from e


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
        for (block, proj), module in HF_PROJECTIONS.items():
            names[hf + f"{module}.weight"] = ((*ours, block, proj, "kernel"), True)
        if cfg.qkv_bias:
            for proj in ("q", "k", "v"):
                names[hf + f"self_attn.{proj}_proj.bias"] = ((*ours, "attn", proj, "bias"), False)
        if cfg.qk_norm:
            names[hf + "self_attn.q_norm.weight"] = ((*ours, "attn", "q_norm", "scale"), False)
            names[hf + "self_attn.k_norm.weight"] = ((*ours, "attn", "k_norm", "scale"), False)
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
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid UTF-8 JSON ({e}); re-download the checkpoint's "
                         "config.json.") from e
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(hf_config).__name__}, expected an object; "
                         "re-download the checkpoint's config.json.")
    cfg = config_from_hf(hf_config, **overrides)
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
