"""GGUF files (llama.cpp, Ollama) in and out: metadata <-> `ModelConfig`, tensors <-> parameters.

Read and written with the `gguf` package, llama.cpp's own reader, writer and (de)quantizers. A GGUF holds the
model's config, its tokenizer (`grpo_jax.tokenizers.HFTokenizer.from_gguf`) and its chat template in one file.

  read_gguf            the file opened and checked: magic, version, every tensor inside the file
  config_from_gguf     the `{arch}.*` metadata -> ModelConfig (architectures llama, qwen2, qwen3)
  load_gguf_checkpoint a Transformer with the file's weights, dequantized one tensor at a time
  save_gguf_checkpoint a Transformer (and its tokenizer) -> a GGUF that llama.cpp and Ollama run

Tensors are read one at a time from the memory-mapped file and dequantized straight into the parameter they
belong to, so the model never exists twice in host memory. Readable tensor types: F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K..Q6_K; written: F32, F16, BF16, Q8_0.

llama.cpp's converter permutes the rows of a llama model's q and k projections (interleaved RoPE pairs, its
layout) and not those of qwen2/qwen3 (rotate-half, ours and Hugging Face's); loading undoes the
permutation and saving applies it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax.models.config import ModelConfig
from grpo_jax.models.hf import _param_map, _variable
from grpo_jax.models.transformer import Transformer

ARCHITECTURES = ("llama", "qwen2", "qwen3")
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K")
WRITE_TYPES = ("F32", "F16", "BF16", "Q8_0")
_REDOWNLOAD = "re-download the file or convert the model again"

# Hugging Face names (hf._param_map) -> llama.cpp's: the model-level tensors, then a decoder layer's parts.
_TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER_PARTS = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf(module: str = "gguf") -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError("GGUF files need the `gguf` package (llama.cpp's reader): pip install gguf") from e


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face tensor name (`model.layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`)."""
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    _, _, index, part = hf_name.split(".", 3)
    return f"blk.{index}.{_LAYER_PARTS[part]}"


# ----------------------------------------------------------------------------- reading


class GGUFFile:
    """An opened, checked GGUF: its metadata through `get` / `require` (values decoded: strings as str,
    arrays as lists) and `tensors` (name -> the gguf package's ReaderTensor, memory-mapped). Build it with
    `read_gguf`."""

    def __init__(self, path: pathlib.Path, reader: Any):
        self.path = path
        self.reader = reader
        self.tensors = {t.name: t for t in reader.tensors}
        self._metadata: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key` (arrays as lists), or `default` when the file lacks it."""
        if key not in self._metadata:
            field = self.reader.fields.get(key)
            if field is None:
                return default
            try:
                self._metadata[key] = field.contents()
            except (UnicodeDecodeError, ValueError, IndexError) as e:
                raise ValueError(f"{self.path}: metadata key {key!r} cannot be read ({e}); "
                                 f"{_REDOWNLOAD}.") from e
        return self._metadata[key]

    def require(self, key: str, what: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: metadata key {key!r} ({what}) is missing; every GGUF that "
                             f"llama.cpp writes for this architecture has it: {_REDOWNLOAD}.")
        return value

    @property
    def architecture(self) -> str:
        return self.require("general.architecture", "the architecture")


def read_gguf(path: str | pathlib.Path) -> GGUFFile:
    """Open `path` with the gguf package and check it: a GGUF of a supported version, every tensor's data
    inside the file. Raises ValueError naming the file and what is wrong (not a GGUF, truncated, ...)."""
    gguf = _gguf()
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file: pass the path of a .gguf file.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf "
                         "file, or a Hugging Face model directory.")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises many types on a cut or corrupt file
        raise ValueError(f"{path}: the gguf package cannot read it ({type(e).__name__}: {e}); the file is "
                         f"truncated or corrupt ({size} bytes): {_REDOWNLOAD}.") from None
    for tensor in reader.tensors:
        end = tensor.data_offset + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise ValueError(f"{path}: tensor {tensor.name!r} ends at byte {end} but the file has {size} "
                             f"bytes; the file is truncated or corrupt: {_REDOWNLOAD}.")
    return GGUFFile(path, reader)


def config_from_gguf(file: GGUFFile, **overrides) -> ModelConfig:
    """The `{arch}.*` metadata of a llama / qwen2 / qwen3 GGUF -> ModelConfig; `overrides` as in
    `config_from_hf` (dtype="bfloat16", remat=True, ...)."""
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(f"{file.path}: general.architecture={arch!r} is not supported; grpo_jax loads GGUF "
                         f"files of the architectures {ARCHITECTURES}.")
    scaling = file.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in file.tensors:
        raise ValueError(f"{file.path}: RoPE scaling ({arch}.rope.scaling.type={scaling!r}, or a "
                         "rope_freqs.weight tensor) is not supported from GGUF; load the Hugging Face "
                         "checkpoint directory instead.")
    if "token_embd.weight" not in file.tensors:
        raise ValueError(f"{file.path}: tensor 'token_embd.weight' is missing; {_REDOWNLOAD}.")
    embedding_rows = int(file.tensors["token_embd.weight"].shape[-1])  # GGML order: [D, V]
    hidden = int(file.require(f"{arch}.embedding_length", "hidden size"))
    heads = int(file.require(f"{arch}.attention.head_count", "attention heads"))
    fields = dict(
        vocab_size=embedding_rows,
        hidden_size=hidden,
        intermediate_size=int(file.require(f"{arch}.feed_forward_length", "MLP size")),
        num_layers=int(file.require(f"{arch}.block_count", "layers")),
        num_heads=heads,
        num_kv_heads=int(file.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(file.get(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(file.require(f"{arch}.attention.layer_norm_rms_epsilon", "RMSNorm epsilon")),
        rope_theta=float(file.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(file.get(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in file.tensors,
        qkv_bias="blk.0.attn_q.bias" in file.tensors,
        qk_norm=arch == "qwen3",
    )
    tokens = file.reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != embedding_rows:
        raise ValueError(f"{file.path}: metadata key 'tokenizer.ggml.tokens' holds {len(tokens.data)} tokens "
                         f"but tensor 'token_embd.weight' has {embedding_rows} rows; the tokenizer is not "
                         f"this model's: {_REDOWNLOAD}.")
    declared = file.get(f"{arch}.vocab_size")
    if declared is not None and int(declared) != embedding_rows:
        raise ValueError(f"{file.path}: {arch}.vocab_size={declared} but tensor 'token_embd.weight' has "
                         f"{embedding_rows} rows; {_REDOWNLOAD}.")
    fields.update(overrides)
    return ModelConfig(**fields)


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order from rotate-half order: per head, rows (i, i + Dh/2) become (2i, 2i + 1)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `_permute_rows`: llama.cpp's interleaved q/k rows back to rotate-half order."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_heads(arch: str, cfg: ModelConfig, hf_name: str) -> int | None:
    """Heads whose rows llama.cpp permutes in this tensor (llama q and k), else None."""
    if arch != "llama":
        return None
    if ".self_attn.q_proj." in hf_name:
        return cfg.num_heads
    if ".self_attn.k_proj." in hf_name:
        return cfg.num_kv_heads
    return None


def dequantized(file: GGUFFile, name: str) -> np.ndarray:
    """Tensor `name` as float32 in numpy (row-major, Hugging Face) order."""
    gguf = _gguf()
    tensor = file.tensors[name]
    kind = tensor.tensor_type.name
    if kind not in READ_TYPES:
        raise ValueError(f"{file.path}: tensor {name!r} is of type {kind}, which grpo_jax does not read; "
                         f"supported: {', '.join(READ_TYPES)}. Requantize the file (llama-quantize) to one "
                         "of them, e.g. Q8_0.")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(values, np.float32).reshape(shape)


def load_gguf_checkpoint(path: str | pathlib.Path, **overrides) -> Transformer:
    """A Transformer with the weights of a GGUF file (llama / qwen2 / qwen3, any READ_TYPES tensor type).

    `overrides` go to the ModelConfig (e.g. param_dtype="bfloat16", remat=True). Raises ValueError naming
    the file and the tensor or metadata key for unsupported architectures and tensor types, missing or
    misshapen tensors and truncated files.
    """
    file = read_gguf(path)
    cfg = config_from_gguf(file, **overrides)
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))  # shapes only, no memory
    expected = {gguf_name(hf_name): (hf_name, *entry) for hf_name, entry in _param_map(cfg).items()}
    unknown = sorted(set(file.tensors) - set(expected))
    if unknown:
        raise ValueError(f"{file.path}: tensors {unknown[:4]} have no place in a {cfg.num_layers}-layer "
                         f"{file.architecture} model of this file's metadata; {_REDOWNLOAD}.")
    missing = sorted(set(expected) - set(file.tensors))
    if missing:
        raise ValueError(f"{file.path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"({len(missing)} in all); {_REDOWNLOAD}.")
    for name, (hf_name, param_path, transpose) in expected.items():
        variable = _variable(model, param_path)
        value = dequantized(file, name)
        want = tuple(reversed(variable.shape)) if transpose else tuple(variable.shape)
        if value.shape != want:
            raise ValueError(f"{file.path}: tensor {name!r} has shape {value.shape} (numpy order), expected "
                             f"{want} from the file's metadata; {_REDOWNLOAD}.")
        heads = _rope_heads(file.architecture, cfg, hf_name)
        if heads is not None:
            value = _unpermute_rows(value, heads)
        variable.set_value(jnp.asarray(value.T if transpose else value, dtype=variable.dtype))
    return model


# ----------------------------------------------------------------------------- writing


def save_gguf_checkpoint(model: Transformer, path: str | pathlib.Path, tokenizer: Any,
                         file_type: str = "F16", name: str = "grpo_jax") -> None:
    """Write `model` and `tokenizer` (an HFTokenizer: its vocabulary, merges, special tokens and chat
    template) as one GGUF file that llama.cpp and Ollama run.

    `file_type`: "F32", "F16", "BF16" or "Q8_0" for the matrices (norms, biases and 1-D tensors stay F32,
    as llama.cpp's converter keeps them). The architecture is llama, qwen2 or qwen3 from the model's config.
    """
    gguf = _gguf()
    if file_type not in WRITE_TYPES:
        raise ValueError(f"file_type={file_type!r} is not written by grpo_jax; use one of {WRITE_TYPES}.")
    cfg = model.config
    if cfg.rope_scaling is not None:
        raise ValueError("a model with llama3 RoPE scaling cannot be written as GGUF by grpo_jax; export it "
                         "as a Hugging Face directory (--format=hf).")
    arch = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    fields = tokenizer_fields(tokenizer)  # checked before anything is written
    qtype = gguf.GGMLQuantizationType[file_type]
    path = pathlib.Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{file_type}"]) if file_type != "F32"
                         else int(gguf.LlamaFileType.ALL_F32))
    for key, (kind, value) in fields.items():
        writer.add_key_value(key, value, kind, sub_type=_sub_type(gguf, kind, value))
    for hf_name, (param_path, transpose) in _param_map(cfg).items():
        array = np.asarray(jax.device_get(_variable(model, param_path)[...]), np.float32)
        array = array.T if transpose else array
        heads = _rope_heads(arch, cfg, hf_name)
        if heads is not None:
            array = _permute_rows(array, heads)
        array = np.ascontiguousarray(array)
        kind = qtype if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 values of a row
        data = gguf.quants.quantize(array, kind)
        writer.add_tensor(gguf_name(hf_name), data, raw_shape=data.shape if data.dtype != np.uint8 else None,
                          raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _value_type(gguf: Any, value: Any) -> Any:
    T = gguf.GGUFValueType
    return {str: T.STRING, bool: T.BOOL, int: T.UINT32, float: T.FLOAT32}[type(value)]


def _sub_type(gguf: Any, kind: Any, value: Any) -> Any:
    if kind != gguf.GGUFValueType.ARRAY:
        return None
    if isinstance(value[0], int):
        return gguf.GGUFValueType.INT32  # token types, as llama.cpp writes them
    return _value_type(gguf, value[0])


def tokenizer_fields(tokenizer: Any) -> dict[str, tuple[Any, Any]]:
    """The `tokenizer.*` metadata (key -> (GGUFValueType, value)) that describes `tokenizer` in a GGUF."""
    gguf = _gguf()
    describe = getattr(tokenizer, "gguf_metadata", None)
    if describe is None:
        raise ValueError(f"a {type(tokenizer).__name__} cannot be written into a GGUF file; export a model "
                         "whose tokenizer is a Hugging Face or GGUF tokenizer (HFTokenizer).")
    return {key: (gguf.GGUFValueType.ARRAY if isinstance(value, list) else _value_type(gguf, value), value)
            for key, value in describe().items() if not isinstance(value, list) or value}
