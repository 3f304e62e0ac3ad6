"""The Llama / Qwen2 / Qwen3 decoder: parity with transformers (committed fixtures, and live when torch is
installed), Hugging Face checkpoint round trips, load errors, KV cache and shared-prefix equivalence with the
plain forward, remat, bfloat16 and the logical axis names of every parameter."""

import dataclasses
import json
import pathlib
import re
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from grpo_jax.models import (
    KV,
    Cache,
    ModelConfig,
    Prefix,
    RopeScaling,
    Transformer,
    causal_mask,
    config_from_hf,
    forward_logits,
    hf,
    init_cache,
    load_hf_checkpoint,
    positions_from_mask,
    save_hf_checkpoint,
)
from grpo_jax.models.hf import iter_safetensors, write_safetensors

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
AXIS_NAMES = {"vocab", "embed", "q_heads", "kv_heads", "mlp", "head_dim", "norm"}


def set_params(model: Transformer, values: dict[tuple, np.ndarray]) -> None:
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        param.set_value(jnp.asarray(np.asarray(values[path]).astype(param.dtype)))


def small_model(seed: int = 0, **overrides) -> Transformer:
    """A random model, norm scales and biases included (a swapped one cannot pass). Drawn with numpy into an
    abstract model: eager jax would compile each initializer (seconds on a small CPU)."""
    model = nnx.eval_shape(lambda: Transformer(ModelConfig(**{**SMALL, **overrides}), nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    values = {}
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.standard_normal(param.shape, np.float32)
        values[path] = (1.0 + 0.1 * noise if path[-1] == "scale" else 0.1 * noise if path[-1] == "bias"
                        else noise if path == ("embed",) else noise / np.sqrt(param.shape[0]))
    set_params(model, values)
    return model


def flat_params(model_or_state) -> dict[tuple, np.ndarray]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {path: np.asarray(leaf[...]) for path, leaf in nnx.to_flat_state(state)}


def left_padded(seed: int, lengths, width: int, vocab: int = SMALL["vocab_size"]):
    """Random ids (never the pad id 0) `[B, width]`, row b left-padded to hold `lengths[b]` real tokens."""
    tokens = np.random.default_rng(seed).integers(1, vocab, (len(lengths), width), np.int32)
    mask = np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]
    return np.where(mask, tokens, 0), mask


@nnx.jit
def run(model: Transformer, tokens, positions, own_mask, cache=None, prefix=None):
    """`model(...)` compiled once per shape: much faster here than eager mode, which compiles every op."""
    return model(tokens, positions, own_mask, cache=cache, prefix=prefix)


@nnx.jit
def hidden_states(model: Transformer, tokens, token_mask, offset=0, prefix=None):
    """The plain forward of left-padded rows, positions and causal mask derived from `token_mask`."""
    return model(tokens, positions_from_mask(token_mask, offset), causal_mask(token_mask), prefix=prefix)


logits_of = nnx.jit(forward_logits)


def assert_grads_close(got: nnx.State, want: nnx.State, rtol: float):
    want = flat_params(want)
    for path, value in flat_params(got).items():
        scale = np.abs(want[path]).max()  # 0 for a parameter the loss does not use (the head)
        error = np.abs(value - want[path]).max()
        np.testing.assert_array_less(error, rtol * scale + 1e-30, err_msg=str(path))


# ----------------------------------------------------------------------------- parity: committed fixtures


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_fixture_logits_match_transformers(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    model = load_hf_checkpoint(FIXTURES / name)
    ones = np.ones(ref["input_ids"].shape, bool)
    np.testing.assert_allclose(logits_of(model, ref["input_ids"], ones), ref["logits"], atol=1e-4)
    mask = ref["attention_mask_padded"].astype(bool)
    np.testing.assert_array_equal(positions_from_mask(mask), ref["position_ids_padded"])
    padded = np.asarray(logits_of(model, ref["input_ids_padded"], mask))
    assert (~mask).sum() == 3
    np.testing.assert_allclose(padded[mask], ref["logits_padded"][mask], atol=1e-4)
    np.testing.assert_allclose(model.config.rope_inv_freq(), ref["rope_inv_freq"], rtol=1e-6)


def test_fixture_configs_read_every_variant():
    llama, qwen2, qwen3 = (load_hf_checkpoint(FIXTURES / name).config for name in ("llama", "qwen2", "qwen3"))
    assert llama.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16) and llama.rope_theta == 500000.0
    assert (llama.tie_word_embeddings, llama.qkv_bias, llama.qk_norm) == (False, False, False)
    assert (qwen2.tie_word_embeddings, qwen2.qkv_bias, qwen2.qk_norm) == (True, True, False)
    assert (qwen3.tie_word_embeddings, qwen3.qkv_bias, qwen3.qk_norm) == (False, False, True)
    assert qwen3.head_dim == 16 != qwen3.hidden_size // qwen3.num_heads
    assert len(list((FIXTURES / "qwen3").glob("model-*.safetensors"))) == 8


def test_llama3_rope_scaling_bands():
    """Wavelengths past original_max_position_embeddings / low_freq_factor are divided by `factor`, those
    between it and original / high_freq_factor blend the two (Llama 3.1)."""
    cfg = ModelConfig(**SMALL, head_dim=8, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))
    plain = dataclasses.replace(cfg, rope_scaling=None).rope_inv_freq()
    np.testing.assert_allclose(plain, 500000.0 ** -(np.arange(4) / 4), rtol=1e-6)
    scaled = cfg.rope_inv_freq()
    smooth = (16 / (2 * np.pi) - 1.0) / (4.0 - 1.0)  # wavelength 2*pi lies in the band [16 / 4, 16 / 1]
    np.testing.assert_allclose(scaled[0], (1 - smooth) / 8.0 + smooth, rtol=1e-6)
    np.testing.assert_allclose(scaled[1:], plain[1:] / 8.0, rtol=1e-6)


# ----------------------------------------------------------------------------- parity: live transformers

LIVE_CASES = {
    "llama-llama3-untied": ("llama", dict(head_dim=8, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=False)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False, use_sliding_window=False)),
    "qwen3-untied": ("qwen3", dict(head_dim=16, tie_word_embeddings=False, use_sliding_window=False)),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True, use_sliding_window=False)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LIVE_CASES))
def test_live_parity_with_transformers(case, tmp_path):
    """transformers -> load_hf_checkpoint and save_hf_checkpoint -> transformers give the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_type, extra = LIVE_CASES[case]
    hf_config = transformers.AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, **extra)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    hf_model = hf_model.float().eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    tokens, mask = left_padded(0, [12, 9, 5], 12)

    def torch_logits(model):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(tokens).long(),
                        attention_mask=torch.from_numpy(mask).long(),
                        position_ids=torch.from_numpy(np.array(positions_from_mask(mask))).long(),
                        use_cache=False)
        return out.logits.float().numpy()[mask]

    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_hf_checkpoint(tmp_path / "hf")
    assert ours.config.tie_word_embeddings == extra["tie_word_embeddings"]
    np.testing.assert_allclose(np.asarray(logits_of(ours, tokens, mask))[mask], torch_logits(hf_model),
                               atol=1e-4)

    fields = ("head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "qkv_bias",
              "qk_norm")
    exported = small_model(seed=1, **{field: getattr(ours.config, field) for field in fields})
    save_hf_checkpoint(exported, tmp_path / "ours")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert type(reloaded) is type(hf_model)
    assert {key: list(value) for key, value in info.items()} == {key: [] for key in info}
    np.testing.assert_allclose(reloaded.model.rotary_emb.inv_freq.numpy(), exported.config.rope_inv_freq(),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logits_of(exported, tokens, mask))[mask],
                               torch_logits(reloaded.eval()), atol=1e-4)


# ----------------------------------------------------------------------------- checkpoint round trip

ROUND_TRIP = {
    "llama-llama3-untied": dict(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
    "llama-tied": dict(tie_word_embeddings=True, rms_norm_eps=1e-5),
    "qwen2-tied": dict(qkv_bias=True, tie_word_embeddings=True),
    "qwen3-untied": dict(qk_norm=True, head_dim=16),
    "llama-bfloat16": dict(param_dtype="bfloat16", rope_scaling=RopeScaling()),
    "qwen3-bfloat16": dict(qk_norm=True, tie_word_embeddings=True, param_dtype="bfloat16"),
}


@pytest.mark.parametrize("max_shard_bytes", [4 << 30, 6000], ids=["single", "sharded"])
@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_save_load_round_trip_is_bit_exact(case, max_shard_bytes, tmp_path):
    model = small_model(seed=3, **ROUND_TRIP[case])
    cfg = model.config
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    index_path = tmp_path / "model.safetensors.index.json"
    tensors = dict(iter_safetensors(tmp_path))
    if max_shard_bytes > 1 << 20:
        assert files == ["model.safetensors"] and not index_path.exists()
    else:
        index = json.loads(index_path.read_text())
        assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
        for file in files:  # a shard is full before it passes the limit, unless one tensor alone does
            sizes = [tensors[name].nbytes for name, f in index["weight_map"].items() if f == file]
            assert sum(sizes) <= max_shard_bytes or len(sizes) == 1, (file, sizes)
    assert ("lm_head.weight" in tensors) == (not cfg.tie_word_embeddings)
    assert ("model.layers.1.self_attn.k_proj.bias" in tensors) == cfg.qkv_bias
    assert ("model.layers.1.self_attn.q_norm.weight" in tensors) == cfg.qk_norm
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (cfg.num_heads * cfg.head_dim, 32)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)  # HF Linear: [out, in]

    loaded = load_hf_checkpoint(tmp_path, param_dtype=cfg.param_dtype)
    assert loaded.config == cfg
    want, got = flat_params(model), flat_params(loaded)
    assert got.keys() == want.keys()
    for path, value in want.items():
        assert got[path].dtype == value.dtype == np.dtype(cfg.param_dtype), path
        assert got[path].tobytes() == value.tobytes(), path


def test_round_trip_qwen3_with_qkv_bias(tmp_path):
    model = small_model(qk_norm=True, qkv_bias=True)
    save_hf_checkpoint(model, tmp_path)
    loaded = load_hf_checkpoint(tmp_path)
    assert loaded.config == model.config
    for path, value in flat_params(model).items():
        assert flat_params(loaded)[path].tobytes() == value.tobytes(), path


# ----------------------------------------------------------------------------- errors


def rewrite_tensors(directory: pathlib.Path, edit) -> None:
    """Apply `edit` to the dict of tensors of a single-file checkpoint and write it back."""
    tensors = {name: np.array(array) for name, array in iter_safetensors(directory)}
    edit(tensors)
    write_safetensors(directory / "model.safetensors", tensors)


def test_unsupported_architecture_is_named(tmp_path):
    hf_config = dict(json.loads((FIXTURES / "llama" / "config.json").read_text()),
                     architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        config_from_hf(hf_config)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("field, value, match", [
    ("rope_parameters", dict(rope_type="yarn", rope_theta=1e4, factor=4.0), "yarn"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("use_sliding_window", True, "use_sliding_window"),
])
def test_unsupported_config_values_are_named(field, value, match):
    hf_config = dict(json.loads((FIXTURES / "qwen2" / "config.json").read_text()), **{field: value})
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf_config)


def test_missing_tensor_is_named(tmp_path):
    save_hf_checkpoint(small_model(), tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    missing = re.escape("missing tensors ['model.layers.1.self_attn.k_proj.weight'] (1 in all)")
    with pytest.raises(ValueError, match=missing):
        load_hf_checkpoint(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    save_hf_checkpoint(small_model(), tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_tensors(tmp_path, lambda t: t.update({name: np.zeros((63, 32), np.float32)}))
    with pytest.raises(ValueError, match=re.escape(f"'{name}' has shape (63, 32), expected (64, 32)")):
        load_hf_checkpoint(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    save_hf_checkpoint(small_model(), tmp_path)
    extra = {"model.layers.2.mlp.up_proj.weight": np.zeros(3, np.float32)}
    rewrite_tensors(tmp_path, lambda t: t.update(extra))
    with pytest.raises(ValueError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' has no place"):
        load_hf_checkpoint(tmp_path)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)


def test_bad_config_json_is_named(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ValueError) as error:
        load_hf_checkpoint(tmp_path)
    assert str(error.value) == (f"{config_path} is not valid UTF-8 JSON (Expecting property name enclosed in "
                                "double quotes: line 1 column 40 (char 39)); re-download the checkpoint's "
                                "config.json.")
    config_path.write_text("[]")
    with pytest.raises(ValueError, match=re.escape(f"{config_path} holds a JSON list, expected an object")):
        load_hf_checkpoint(tmp_path)
    hf_config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    with pytest.raises(ValueError) as error:
        config_from_hf({k: v for k, v in hf_config.items() if k not in ("hidden_size", "vocab_size")})
    assert str(error.value) == ("config.json lacks ['vocab_size', 'hidden_size'], which every "
                                "LlamaForCausalLM config.json has; use the config.json of the checkpoint, "
                                "unedited.")
    with pytest.raises(ValueError) as error:
        config_from_hf(dict(hf_config, rope_parameters=dict(rope_type="llama3", factor=8.0)))
    assert str(error.value) == ("config.json rope type 'llama3' lacks ['low_freq_factor', "
                                "'high_freq_factor', 'original_max_position_embeddings']; give all of "
                                "['factor', 'low_freq_factor', 'high_freq_factor', "
                                "'original_max_position_embeddings'] "
                                "in rope_scaling (or rope_parameters).")


# ----------------------------------------------------------------------------- safetensors validation

F32_4 = dict(dtype="F32", shape=[4], data_offsets=[0, 16])
REEXPORT = "the file is truncated or corrupt; re-download or re-export the checkpoint."


def write_raw(path: pathlib.Path, header, data: bytes = b"", header_len: int | None = None) -> pathlib.Path:
    """A safetensors file written by hand: 8-byte little-endian header length, header bytes, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def read_all(directory: pathlib.Path) -> dict[str, np.ndarray]:
    return {name: np.array(array) for name, array in iter_safetensors(directory)}


def test_safetensors_valid_file_loads_exact_values(tmp_path):
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
               "b": np.array([1.5, -2.25], ml_dtypes.bfloat16), "ids": np.array([-3, 7], np.int64),
               "mask": np.array([True, False]), "scalar": np.array(2.0, np.float16),
               "empty": np.zeros((0, 5), np.float32)}
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    loaded = read_all(tmp_path)
    assert sorted(loaded) == sorted(tensors)  # the writer orders a file's tensors by dtype, then name
    for name, want in tensors.items():
        assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape, name
        assert loaded[name].tobytes() == want.tobytes(), name
    # Written by hand, in an order other than the data's, with header padding: still the right bytes.
    header = {"__metadata__": {"format": "pt"}, "b": dict(dtype="I32", shape=[2], data_offsets=[8, 16]),
              "a": dict(dtype="U8", shape=[2, 4], data_offsets=[0, 8])}
    raw = json.dumps(header).encode() + b"   "
    write_raw(tmp_path / "model.safetensors", raw, bytes(range(8)) + np.array([7, -1], "<i4").tobytes())
    loaded = read_all(tmp_path)
    np.testing.assert_array_equal(loaded["a"], np.arange(8, dtype=np.uint8).reshape(2, 4))
    np.testing.assert_array_equal(loaded["b"], [7, -1])


@pytest.mark.parametrize("keep, message", [
    (5, "5 bytes, shorter than the 8-byte header length of a safetensors file"),
    (20, "the header length field says 56 bytes, but the file has only 12 bytes after it"),
    (-3, "tensor 'a' (F32, shape [4]): data_offsets [0, 16] run past the end of the data section (13 bytes)"),
])
def test_safetensors_truncated_file_is_named(tmp_path, keep, message):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": np.arange(4, dtype=np.float32)})
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError) as error:
        read_all(tmp_path)
    assert str(error.value) == f"{path}: {message}; {REEXPORT}"


def test_truncated_checkpoint_fails_load_hf_checkpoint(tmp_path):
    save_hf_checkpoint(small_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # an interrupted download
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": tensor '[^']+' .* run past the end of "
                       r"the data section .* truncated or corrupt; re-download or re-export"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("header, data, header_len, message", [
    (b"{not json", b"", None, "the 9-byte header is not valid UTF-8 JSON (Expecting property name enclosed "
     "in double quotes: line 1 column 2 (char 1))"),
    (b'\xff{"a": 1}', b"", None, "the 9-byte header is not valid UTF-8 JSON ('utf-8' codec can't decode "
     "byte 0xff in position 0: invalid start byte)"),
    (b'{"a": 1, "a": 2}', b"", None, "the 16-byte header is not valid UTF-8 JSON (duplicate keys ['a'])"),
    (b"[1, 2]", b"", None, "the header is a JSON list, expected an object {tensor name: {dtype, shape, "
     "data_offsets}}"),
    ({"__metadata__": "pt"}, b"", None, "__metadata__ is str 'pt', expected an object"),
    ({"a": F32_4}, bytes(16), 10**6, "the header length field says 1000000 bytes, but the file has only "
     "AFTER bytes after it"),
    ({"a": F32_4}, bytes(16), 2**64 - 1, f"the header length field says {2**64 - 1} bytes, but the file has "
     "only AFTER bytes after it"),
    ({"a": [1, 2]}, b"", None, "tensor 'a': header entry is list [1, 2], expected an object with dtype, "
     "shape and data_offsets"),
    ({"a": dict(dtype="F32", shape=[4])}, bytes(16), None,
     "tensor 'a': header entry lacks ['data_offsets'] (it has ['dtype', 'shape'])"),
    ({"a": dict(shape=[4], data_offsets=[0, 16])}, bytes(16), None,
     "tensor 'a': header entry lacks ['dtype'] (it has ['data_offsets', 'shape'])"),
    ({"a": dict(F32_4, shape=[4, -1])}, bytes(16), None,
     "tensor 'a': shape [4, -1] is not a list of non-negative integers"),
    ({"a": dict(F32_4, shape=[True])}, bytes(16), None,
     "tensor 'a': shape [True] is not a list of non-negative integers"),
    ({"a": dict(F32_4, data_offsets=[0, 16, 32])}, bytes(16), None,
     "tensor 'a': data_offsets [0, 16, 32] is not [begin, end] with non-negative integers"),
    ({"a": dict(F32_4, data_offsets=[0, 16.0])}, bytes(16), None,
     "tensor 'a': data_offsets [0, 16.0] is not [begin, end] with non-negative integers"),
    ({"a": dict(F32_4, data_offsets=[16, 0])}, bytes(16), None,
     "tensor 'a' (F32, shape [4]): data_offsets [16, 0] end before they begin"),
    ({"a": dict(F32_4, data_offsets=[8, 24])}, bytes(16), None,
     "tensor 'a' (F32, shape [4]): data_offsets [8, 24] run past the end of the data section (16 bytes)"),
    # The bytes of the offsets disagree with dtype x shape: never reinterpreted or reshaped.
    ({"a": dict(F32_4, data_offsets=[0, 8])}, bytes(8), None,
     "tensor 'a' (F32, shape [4]): data_offsets [0, 8] hold 8 bytes, but the dtype and shape need 16"),
    ({"a": dict(F32_4, dtype="F16")}, bytes(16), None,
     "tensor 'a' (F16, shape [4]): data_offsets [0, 16] hold 16 bytes, but the dtype and shape need 8"),
    ({"a": dict(dtype="F32", shape=[2], data_offsets=[0, 8]),
      "b": dict(dtype="F32", shape=[2], data_offsets=[4, 12])}, bytes(16), None,
     "tensor 'b': data_offsets [4, 12] overlap tensor 'a' at [0, 8]"),
    ({"a": dict(dtype="F32", shape=[2], data_offsets=[8, 16])}, bytes(16), None,
     "tensor 'a': data_offsets [8, 16] leave bytes [0, 8] of the data section to no tensor"),
    ({"a": F32_4}, bytes(20), None, "the data section has 20 bytes but its tensors cover only 16"),
], ids=["not-json", "not-utf8", "duplicate-key", "not-object", "bad-metadata", "length-past-file",
        "length-2**64-1", "entry-not-object", "no-offsets", "no-dtype", "negative-dim", "bool-dim",
        "three-offsets", "float-offset", "end-before-begin", "offsets-past-data", "bytes-short-of-shape",
        "dtype-disagrees", "overlap", "gap", "trailing-bytes"])
def test_safetensors_bad_header_is_named(tmp_path, header, data, header_len, message):
    path = write_raw(tmp_path / "model.safetensors", header, data, header_len)
    with pytest.raises(ValueError) as error:
        read_all(tmp_path)
    message = message.replace("AFTER", str(path.stat().st_size - 8))
    assert str(error.value) == f"{path}: {message}; {REEXPORT}"


@pytest.mark.parametrize("dtype", ["F8_E4M3", "C64", 5])
def test_safetensors_unknown_dtype_names_the_supported_ones(tmp_path, dtype):
    path = write_raw(tmp_path / "model.safetensors", {"w": dict(F32_4, dtype=dtype)}, bytes(16))
    with pytest.raises(ValueError) as error:
        read_all(tmp_path)
    assert str(error.value) == (
        f"{path}: tensor 'w' has dtype {dtype!r}, which grpo_jax cannot read; supported dtypes: F64, F32, "
        "F16, BF16, I64, I32, I16, I8, U8, BOOL. Convert the checkpoint to one of them (e.g. save it in "
        "bfloat16 or float32).")


def test_safetensors_header_over_the_format_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "MAX_HEADER_BYTES", 32)
    header = json.dumps({"a": F32_4}).encode()
    path = write_raw(tmp_path / "model.safetensors", header, bytes(16))
    with pytest.raises(ValueError) as error:
        read_all(tmp_path)
    assert str(error.value) == (f"{path}: the header length field says {len(header)} bytes, more than the 32 "
                                f"the format allows; {REEXPORT}")


def test_safetensors_corrupt_file_yields_nothing(tmp_path):
    """A shard is validated whole before any of its tensors is yielded."""
    header = {"a": dict(dtype="U8", shape=[1], data_offsets=[0, 1]),
              "b": dict(dtype="U8", shape=[2], data_offsets=[1, 4])}
    write_raw(tmp_path / "model.safetensors", header, bytes(4))
    tensors = iter_safetensors(tmp_path)
    with pytest.raises(ValueError, match=re.escape("tensor 'b' (U8, shape [2]): data_offsets [1, 4] hold 3")):
        next(tensors)


def test_safetensors_index_errors_are_named(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=re.escape(f"{index} is not a safetensors index (JSON with a "
                                                   "'weight_map' object of tensor name -> file name): "
                                                   "JSONDecodeError: Expecting value")):
        read_all(tmp_path)
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=re.escape(f"{index} is not a safetensors index") + ".*KeyError"):
        read_all(tmp_path)
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": np.zeros(2, np.float32)})
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError) as error:
        read_all(tmp_path)
    assert str(error.value) == (f"{index} names shard files ['model-00002-of-00002.safetensors'] that are "
                                f"not in {tmp_path}; download every shard of the checkpoint.")


def test_write_safetensors_rejects_unsupported_dtype(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError) as error:
        write_safetensors(path, {"ok": np.zeros(1, np.float32), "z": np.zeros(2, np.complex64)})
    assert str(error.value).startswith(f"{path}: tensor 'z' has dtype complex64, which safetensors files of "
                                       "grpo_jax cannot hold; cast it to one of [")


@pytest.mark.parametrize("overrides, field", [
    (dict(num_kv_heads=3), "num_kv_heads=3"),
    (dict(head_dim=7), "head_dim=7"),
    (dict(hidden_size=30), "num_heads=4"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(dtype="float64"), "dtype='float64'"),
    (dict(param_dtype="int8"), "param_dtype='int8'"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"ModelConfig.{field}")):
        ModelConfig(**{**SMALL, **overrides})


# ----------------------------------------------------------------------------- KV cache and shared prefix


@pytest.mark.slow
def test_cache_decode_matches_full_forward():
    """Prefill a left-padded batch with the plain forward, then decode 1, 1 and 2 tokens per call through the
    cache: every step's hidden states and the final cache equal the full-sequence forward."""
    model = small_model(seed=4, qk_norm=True, qkv_bias=True)
    batch, prompt_width, new = 3, 5, 4
    lengths = np.array([5, 3, 1])
    prompt, prompt_mask = left_padded(1, lengths, prompt_width)
    suffix = np.random.default_rng(2).integers(1, 64, (batch, new), np.int32)
    tokens = np.concatenate([prompt, suffix], axis=1)
    mask = np.concatenate([prompt_mask, np.ones((batch, new), bool)], axis=1)
    full, full_kv = hidden_states(model, tokens, mask)  # [B, P + new, D]

    capacity = prompt_width + new
    hidden, prompt_kv = hidden_states(model, prompt, prompt_mask)
    np.testing.assert_allclose(hidden[prompt_mask], full[:, :prompt_width][prompt_mask], atol=1e-5)
    empty = init_cache(model.config, batch, capacity)
    assert empty.kv[0].k.shape == (batch, 2, 8, capacity) and empty.kv[0].v.shape == (batch, 2, capacity, 8)
    assert empty.kv[0].k.dtype == jnp.float32
    assert not empty.mask.any() and empty.index == 0 and len(empty.kv) == 2
    # Prefilling through the cache writes the plain forward's keys/values into the first slots.
    prefill_mask = np.pad(causal_mask(prompt_mask), ((0, 0), (0, 0), (0, new)))  # [B, P, T]
    _, cache_kv = run(model, prompt, positions_from_mask(prompt_mask), prefill_mask, cache=empty)
    for written, kv in zip(cache_kv, prompt_kv, strict=True):
        np.testing.assert_allclose(written.k[..., :prompt_width], kv.k, atol=1e-6)
        np.testing.assert_allclose(written.v[:, :, :prompt_width], kv.v, atol=1e-6)
        np.testing.assert_array_equal(written.k[..., prompt_width:], 0.0)
        np.testing.assert_array_equal(written.v[:, :, prompt_width:], 0.0)

    def into_slots(x, axis):  # P -> T slots along `axis` (keys [B, KVH, Dh, P], values [B, KVH, P, Dh])
        return np.pad(np.asarray(x), [(0, new) if a == axis else (0, 0) for a in range(4)])

    cache = Cache(tuple(KV(into_slots(kv.k, 3), into_slots(kv.v, 2)) for kv in prompt_kv),
                  np.pad(prompt_mask, ((0, 0), (0, new))), jnp.int32(prompt_width))
    slots = np.arange(capacity)
    for step in (1, 1, 2):
        index = int(cache.index)
        cache_mask = np.asarray(cache.mask).copy()
        cache_mask[:, index:index + step] = True
        causal = slots[None, None, :] <= index + np.arange(step)[None, :, None]  # [1, S, T]
        positions = lengths[:, None] + index - prompt_width + np.arange(step)  # [B, S]
        hidden, kv = run(model, tokens[:, index:index + step], positions, cache_mask[:, None, :] & causal,
                         cache=Cache(cache.kv, cache_mask, cache.index))
        np.testing.assert_allclose(hidden, full[:, index:index + step], atol=1e-5)
        cache = Cache(kv, cache_mask, cache.index + step)
    assert int(cache.index) == capacity and cache.mask.sum() == lengths.sum() + batch * new
    for layer, kv in zip(cache.kv, full_kv, strict=True):
        np.testing.assert_allclose(layer.k, kv.k, atol=1e-5)
        np.testing.assert_allclose(layer.v, kv.v, atol=1e-5)


@pytest.mark.slow
def test_shared_prefix_matches_full_forward():
    """N prompts x G continuations against a shared prefix == the concatenated rows: values and gradients."""
    model = small_model(seed=5, qk_norm=True, qkv_bias=True)
    num_prompts, group, prompt_width, width = 2, 3, 5, 4
    prompt, prompt_mask = left_padded(3, [5, 2], prompt_width)
    rng = np.random.default_rng(4)
    cont_mask = np.arange(width)[None, :] < np.array([4, 4, 2, 4, 3, 1])[:, None]  # right-padded, [B, C]
    cont = np.where(cont_mask, rng.integers(1, 64, cont_mask.shape, np.int32), 0)
    offset = np.repeat(prompt_mask.sum(axis=1), group)[:, None]  # [B, 1] real prompt length
    weights = rng.standard_normal((num_prompts * group, width, SMALL["hidden_size"]), np.float32)

    def shared(model):
        _, prompt_kv = model(prompt, positions_from_mask(prompt_mask), causal_mask(prompt_mask))
        hidden, _ = model(cont, positions_from_mask(cont_mask, offset), causal_mask(cont_mask),
                          prefix=Prefix(prompt_kv, prompt_mask))
        return hidden

    def full(model):
        rows = np.concatenate([np.repeat(prompt, group, axis=0), cont], axis=1)
        mask = np.concatenate([np.repeat(prompt_mask, group, axis=0), cont_mask], axis=1)
        hidden, _ = model(rows, positions_from_mask(mask), causal_mask(mask))
        return hidden[:, prompt_width:]

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def hidden_and_grads(forward):
        def loss(params):
            hidden = forward(nnx.merge(graphdef, params, rest))
            return jnp.sum(jnp.where(cont_mask[..., None], hidden * weights, 0.0)), hidden
        (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return hidden, grads

    got, got_grads = hidden_and_grads(shared)
    want, want_grads = hidden_and_grads(full)
    np.testing.assert_allclose(got[cont_mask], want[cont_mask], atol=1e-5)
    assert_grads_close(got_grads, want_grads, rtol=1e-5)


# ----------------------------------------------------------------------------- remat, dtypes, axis names


@pytest.mark.slow
def test_remat_gives_identical_logits_and_gradients():
    tokens, mask = left_padded(6, [7, 4], 7)
    weights = np.random.default_rng(7).standard_normal((2, 7, SMALL["vocab_size"]), np.float32)

    def logits_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            logits = forward_logits(nnx.merge(graphdef, params, rest), tokens, mask)
            return jnp.sum(logits * weights), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, flat_params(grads)

    want_logits, want = logits_and_grads(small_model(seed=6, qk_norm=True, qkv_bias=True))
    got_logits, got = logits_and_grads(small_model(seed=6, qk_norm=True, qkv_bias=True, remat=True))
    np.testing.assert_array_equal(got_logits, want_logits)
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7, err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_bfloat16_compute_stays_close_to_float32(param_dtype):
    low = small_model(seed=7, qkv_bias=True, qk_norm=True, param_dtype=param_dtype, dtype="bfloat16")
    assert {v.dtype for v in flat_params(low).values()} == {np.dtype(param_dtype)}
    reference = small_model(qkv_bias=True, qk_norm=True)
    set_params(reference, flat_params(low))  # the same (rounded) values, computed in float32
    tokens, mask = left_padded(8, [9, 6], 9)
    hidden, kvs = hidden_states(low, tokens, mask)
    assert hidden.dtype == kvs[0].k.dtype == jnp.bfloat16
    logits = np.asarray(logits_of(low, tokens, mask))[mask]
    want = np.asarray(logits_of(reference, tokens, mask))[mask]
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    np.testing.assert_array_less(np.abs(logits - want).max(), 0.02 * np.abs(want).max())
    assert np.corrcoef(logits.ravel(), want.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_every_param_has_one_axis_name_per_dimension(tie):
    cfg = ModelConfig(**SMALL, qkv_bias=True, qk_norm=True, tie_word_embeddings=tie)
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    specs = nnx.to_flat_state(nnx.get_partition_spec(params))  # leaves hold PartitionSpec(*names)
    specs = {path: tuple(leaf.get_value()) for path, leaf in specs}
    shapes = {path: leaf.shape for path, leaf in nnx.to_flat_state(params)}
    assert specs.keys() == shapes.keys() and len(specs) == 2 + 14 * cfg.num_layers + (0 if tie else 1)
    for path, names in specs.items():
        assert len(names) == len(shapes[path]) and set(names) <= AXIS_NAMES, (path, names)
    assert specs[("embed",)] == ("vocab", "embed")
    assert specs[("layers", 0, "attn", "q", "kernel")] == ("embed", "q_heads")
    assert specs[("layers", 0, "attn", "k", "bias")] == ("kv_heads",)
    assert specs[("layers", 1, "attn", "o", "kernel")] == ("q_heads", "embed")
    assert specs[("layers", 1, "attn", "k_norm", "scale")] == ("head_dim",)
    assert specs[("layers", 1, "mlp", "down", "kernel")] == ("mlp", "embed")
    assert specs[("final_norm", "scale")] == ("norm",)
    assert specs.get(("lm_head", "kernel")) == (None if tie else ("embed", "vocab"))
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == cfg.num_params()
