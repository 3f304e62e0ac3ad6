"""GGUF in and out on tiny random models of each architecture (llama, qwen2, qwen3), and bad GGUF files:
each refused with the file, the tensor or metadata key, and the fix, before any weight is used."""

import dataclasses
import json
import pathlib

import gguf
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from gguf_fixtures import CHATML, VOCAB, TinyTokenizer, tiny  # noqa: E402

from grpo_jax.models import (
    forward_logits,
    load_gguf_checkpoint,
    load_pretrained,
    read_gguf,
    save_gguf_checkpoint,
)
from grpo_jax.models.gguf import gguf_name
from grpo_jax.tokenizers import HFTokenizer, load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def logits(model, ids=(3, 17, 40, 41, 60, 5, 9)):
    tokens = jnp.asarray([ids])
    return np.asarray(forward_logits(model, tokens, jnp.ones_like(tokens, bool)))


def flat(model):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
        nnx.split(model)[1])}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_round_trip_is_exact_and_keeps_config_and_tokenizer(tmp_path, arch):
    model = tiny(arch)
    path = tmp_path / "m.gguf"
    save_gguf_checkpoint(model, path, TinyTokenizer(), file_type="F32")
    assert read_gguf(path).architecture == arch
    back = load_gguf_checkpoint(path)
    # GGUF stores floats as float32: the epsilon comes back as float32(1e-5).
    assert back.config == dataclasses.replace(model.config, rms_norm_eps=float(np.float32(1e-5)))
    for name, value in flat(model).items():
        np.testing.assert_array_equal(flat(back)[name], value, err_msg=name)
    np.testing.assert_array_equal(logits(back), logits(model))
    tokenizer = load_tokenizer(str(path))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == VOCAB
    assert tokenizer.encode(" the") == [94, 95]  # "Ġ t" then "h e": two merged tokens
    assert tokenizer.decode(tokenizer.encode("<|im_start|>x the<|im_end|>"), skip_special=False) == \
        "<|im_start|>x the<|im_end|>"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_llama_q_and_k_rows_are_stored_in_llama_cpp_order(tmp_path):
    """llama.cpp pairs rotary dimensions (2i, 2i+1) where grpo_jax (and Hugging Face) pair (i, i + Dh/2):
    the file holds the permuted rows, which loading undoes."""
    model = tiny("llama")
    save_gguf_checkpoint(model, tmp_path / "m.gguf", TinyTokenizer(), file_type="F32")
    stored = read_gguf(tmp_path / "m.gguf").tensors["blk.0.attn_k.weight"]
    rows = np.asarray(stored.data).reshape(-1, 64)  # [out, in] = [2 kv heads * 32, 64]
    ours = np.asarray(model.layers[0].attn.k.kernel[...]).T  # [out, in], rotate-half order
    head = ours[:32]
    np.testing.assert_array_equal(rows[0], head[0])
    np.testing.assert_array_equal(rows[1], head[16])  # the partner of dimension 0 is dimension Dh/2
    np.testing.assert_array_equal(rows[2], head[1])
    np.testing.assert_array_equal(rows[32 + 1], ours[32 + 16])


@pytest.mark.parametrize("file_type", ["F16", "BF16", "Q8_0"])
def test_quantized_export_holds_exactly_the_quantized_weights(tmp_path, file_type):
    """Each matrix reads back as gguf's own quantize -> dequantize of the trained one (1-D tensors stay
    F32); the logits move by the quantization's error only."""
    model = tiny("qwen2")
    save_gguf_checkpoint(model, tmp_path / "m.gguf", TinyTokenizer(), file_type=file_type)
    file = read_gguf(tmp_path / "m.gguf")
    qtype = gguf.GGMLQuantizationType[file_type]
    back = load_gguf_checkpoint(tmp_path / "m.gguf")
    kernel = np.asarray(model.layers[1].mlp.up.kernel[...]).T  # [out, in] as stored
    expected = gguf.quants.dequantize(gguf.quants.quantize(kernel, qtype), qtype)
    np.testing.assert_array_equal(np.asarray(back.layers[1].mlp.up.kernel[...]).T, expected)
    assert file.tensors[gguf_name("model.layers.1.mlp.up_proj.weight")].tensor_type == qtype
    assert file.tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    error = np.abs(logits(back) - logits(model)).max()
    bound = {"F16": 1e-2, "BF16": 1e-1, "Q8_0": 1e-1}[file_type]
    assert 0 < error < bound


def test_load_pretrained_takes_a_directory_or_a_gguf(tmp_path):
    from grpo_jax.models import save_hf_checkpoint

    model = tiny("qwen3")
    save_hf_checkpoint(model, tmp_path / "hf")
    save_gguf_checkpoint(load_pretrained(tmp_path / "hf"), tmp_path / "m.gguf", TinyTokenizer(), "F32")
    np.testing.assert_array_equal(logits(load_pretrained(tmp_path / "m.gguf")), logits(model))


# ----------------------------------------------------------------------------- bad files


def write(tmp_path, arch="llama", name="m.gguf", **tokenizer_changes):
    path = tmp_path / name
    save_gguf_checkpoint(tiny(arch), path, TinyTokenizer(**tokenizer_changes), file_type="F32")
    return path


def rewrite(path, out, *, drop_tensor=None, retype=None, metadata=None):
    """A copy of the GGUF at `path` with a tensor dropped or given another type, or metadata changed."""
    file = read_gguf(path)
    writer = gguf.GGUFWriter(str(out), metadata.pop("general.architecture", file.architecture) if metadata
                             else file.architecture)
    for key, field in file.reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = (metadata or {}).get(key, field.contents())
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    for tensor in file.reader.tensors:
        if tensor.name == drop_tensor:
            continue
        if tensor.name == retype:
            kind = gguf.GGMLQuantizationType.IQ2_XXS
            shape = gguf.quants.quant_shape_to_byte_shape((64, 256), kind)
            writer.add_tensor(tensor.name, np.zeros(shape, np.uint8), raw_dtype=kind)
            continue
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_not_a_gguf_and_truncated_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "x.gguf").write_text("{\"not\": \"gguf\"}")
    with pytest.raises(ValueError, match=r"x\.gguf is not a GGUF file .* pass a \.gguf file"):
        load_gguf_checkpoint(tmp_path / "x.gguf")
    path = write(tmp_path)
    data = path.read_bytes()
    for cut in (len(data) - 1000, 300):  # in the last tensor's data, in the metadata
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.gguf: .*truncated or corrupt.*re-download"):
            load_gguf_checkpoint(tmp_path / "cut.gguf")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_and_tensor_type_are_refused(tmp_path):
    path = write(tmp_path)
    other = rewrite(path, tmp_path / "arch.gguf", metadata={"general.architecture": "gpt2"})
    with pytest.raises(ValueError, match=r"general\.architecture='gpt2' is not supported.*llama"):
        load_gguf_checkpoint(other)
    retyped = rewrite(path, tmp_path / "iq.gguf", retype="blk.0.ffn_up.weight")
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ffn_up\.weight' is of type IQ2_XXS.*Q8_0"):
        load_gguf_checkpoint(retyped)
    dropped = rewrite(path, tmp_path / "drop.gguf", drop_tensor="blk.1.attn_v.weight")
    with pytest.raises(ValueError, match=r"missing tensors \['blk\.1\.attn_v\.weight'\]"):
        load_gguf_checkpoint(dropped)


def test_missing_tokenizer_metadata_and_a_broken_chat_template_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'tokenizer\.ggml\.merges' \(the BPE merges\) is missing"):
        load_tokenizer(str(write(tmp_path, name="a.gguf", **{"tokenizer.ggml.merges": None})))
    with pytest.raises(ValueError, match=r"'tokenizer\.ggml\.eos_token_id' is missing"):
        load_tokenizer(str(write(tmp_path, name="b.gguf", **{"tokenizer.ggml.eos_token_id": None})))
    with pytest.raises(ValueError, match=r"'tokenizer\.ggml\.model'='llama'.*--config\.tokenizer="):
        load_tokenizer(str(write(tmp_path, name="c.gguf", **{"tokenizer.ggml.model": "llama"})))
    with pytest.raises(ValueError, match=r"'tokenizer\.ggml\.tokens' and 'tokenizer\.ggml\.merges' do not"):
        load_tokenizer(str(write(tmp_path, name="f.gguf", **{"tokenizer.ggml.merges": ["Ġ t", "q z"]})))
    with pytest.raises(ValueError, match=r"'tokenizer\.ggml\.pre'='mystery'.*known"):
        load_tokenizer(str(write(tmp_path, name="d.gguf", **{"tokenizer.ggml.pre": "mystery"})))
    broken = "{{ messages[3]['content'] }}"  # fails for a one-message conversation
    with pytest.raises(ValueError, match=r"'tokenizer\.chat_template' fails to render.*template=plain"):
        load_tokenizer(str(write(tmp_path, name="e.gguf", **{"tokenizer.chat_template": broken})))


def test_a_vocabulary_that_is_not_the_models_is_refused(tmp_path):
    short = TinyTokenizer().fields["tokenizer.ggml.tokens"][:-6]
    path = write(tmp_path, **{"tokenizer.ggml.tokens": short,
                              "tokenizer.ggml.token_type": [3, 3] + [1] * (len(short) - 2)})
    with pytest.raises(ValueError, match=r"'tokenizer\.ggml\.tokens' holds 90 tokens but tensor "
                                         r"'token_embd\.weight' has 96 rows"):
        load_gguf_checkpoint(path)


@pytest.mark.slow
def test_export_py_writes_a_runs_policy_as_gguf(tmp_path):
    """A run that started from a GGUF (its tokenizer and chat template from the file) exports as a Q8_0
    GGUF: the weights of the run's checkpoint quantized, the same tokenizer and template, readable again."""
    from configs_for_tests import default_config

    from grpo_jax import experiment

    save_gguf_checkpoint(tiny("qwen2"), tmp_path / "base.gguf", TinyTokenizer(), file_type="F32")
    cfg = default_config(**{"checkpoint": str(tmp_path / "base.gguf"), "tokenizer": "",
                            "template": "chat_default",
                            "warm_start.steps": 0, "num_steps": 1, "eval_examples": 0,
                            "sampling.buckets": (64,), "max_prompt_tokens": 64,
                            "rollout.num_prompts": 8, "sampling.group_size": 2})
    cfg.model = ml_collections.ConfigDict({"max_position_embeddings": 96})
    experiment.run(cfg, tmp_path / "run")
    result = experiment.export(cfg, tmp_path / "run", tmp_path / "out", file_format="gguf", gguf_type="Q8_0")
    assert result == {"step": 1, "out": str(tmp_path / "out" / "model.gguf"), "format": "gguf"}
    trained, _, _, _ = experiment.load_run(cfg, tmp_path / "run")
    exported = load_gguf_checkpoint(tmp_path / "out" / "model.gguf", max_position_embeddings=96)
    kernel = np.asarray(trained.layers[0].attn.q.kernel[...]).T
    q8 = gguf.GGMLQuantizationType.Q8_0
    np.testing.assert_array_equal(np.asarray(exported.layers[0].attn.q.kernel[...]).T,
                                  gguf.quants.dequantize(gguf.quants.quantize(kernel, q8), q8))
    original, written = (load_tokenizer(str(p)) for p in (tmp_path / "base.gguf", result["out"]))
    text = "<|im_start|>user\nWhat is 12 + 34?<|im_end|>"
    assert written.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert written.apply_chat_template(messages) == original.apply_chat_template(messages)
    with pytest.raises(ValueError, match="CharTokenizer cannot be written into a GGUF"):
        experiment.export(default_config(), tmp_path / "run", tmp_path / "out2", file_format="gguf")


def test_a_hugging_face_tokenizer_is_described_in_gguf_metadata(tmp_path):
    """A tokenizer.json directory whose pre-tokenizer llama.cpp knows (here the GGUF tokenizer's own, saved
    as tokenizer.json) gives the same GGUF metadata back: vocabulary, merges, token types, special ids and
    chat template; one whose pre-tokenizer is not one of them is refused, naming the known ones."""
    original = load_tokenizer(str(write(tmp_path)))
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "tokenizer.json").write_text(original._backend.to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "bos_token": "<|im_start|>",
         "chat_template": CHATML}))
    described = HFTokenizer.from_dir(directory).gguf_metadata()
    expected = TinyTokenizer().gguf_metadata()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        assert described[key] == expected[key], key
    with pytest.raises(ValueError, match="pre-tokenizer is one of"):
        load_tokenizer(str(ROOT / "tests" / "fixtures" / "hf" / "tokenizer")).gguf_metadata()
