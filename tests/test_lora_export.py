"""LoRA export: the merged model as a Hugging Face checkpoint (parity with transformers: committed fixtures,
and live when torch is installed), the adapters in PEFT's layout (names, shapes, config, PEFT's merge
formula; PEFT-saved adapters read back), and experiments/export.py on a short LoRA run (its base saved in
the workdir, or config.checkpoint) and on a full fine-tuning run."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from grpo_jax import lora, sharding
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.models import ModelConfig, Transformer, forward_logits, load_hf_checkpoint
from grpo_jax.models.hf import iter_safetensors
from grpo_jax.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "fixtures" / "hf"
FIXTURES = ROOT / "tests" / "fixtures" / "lora"  # tests/fixtures/make_lora_fixtures.py
from configs_for_tests import default_config, set_fields  # noqa: E402

from grpo_jax import experiment  # noqa: E402

logits_of = nnx.jit(forward_logits)
# The merge as the trainer runs it (compiled): the export writes these weights bit for bit (eager op-by-op
# evaluation may round the last bit differently).
merge = jax.jit(lora.merge, static_argnums=2)


def random_adapters(params, cfg: lora.LoRAConfig, seed: int) -> lora.Adapters:
    """Adapters with B != 0 (init_adapters' B = 0 would export the base unchanged), drawn with numpy."""
    shapes = jax.eval_shape(lambda p: lora.init_adapters(p, cfg, jax.random.key(0)), params)
    rng = np.random.default_rng(seed)
    return {name: {"a": jnp.asarray(rng.standard_normal(ab["a"].shape) / np.sqrt(ab["a"].shape[0]),
                                    jnp.float32),
                   "b": jnp.asarray(0.03 * rng.standard_normal(ab["b"].shape), jnp.float32)}
            for name, ab in shapes.items()}


def flat(model) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(leaf[...]) for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def tokens(seed: int, vocab: int = 128):
    return np.random.default_rng(seed).integers(1, vocab, (2, 12)).astype(np.int32), np.ones((2, 12), bool)


# ----------------------------------------------------------------------------- merged export


@pytest.mark.slow
@pytest.mark.parametrize("name, cfg", [
    ("llama", lora.LoRAConfig(rank=4, alpha=8.0)),
    ("qwen2", lora.LoRAConfig(rank=2, alpha=5.0, targets=("q", "v", "down"))),
    ("qwen3", lora.LoRAConfig(rank=3, alpha=3.0, targets=("k", "o", "gate", "up"))),  # sharded base
])
def test_merged_export_reloads_as_the_merged_model(name, cfg, tmp_path):
    base = load_hf_checkpoint(HF / name)
    graphdef, params = nnx.split(base)
    adapters = random_adapters(params, cfg, seed=1)
    assert lora.export_merged(base, tmp_path, adapters, cfg) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    merged = nnx.merge(graphdef, merge(params, adapters, cfg))
    reloaded = load_hf_checkpoint(tmp_path)
    assert reloaded.config == base.config
    want, got, before = flat(merged), flat(reloaded), flat(base)
    assert got.keys() == want.keys()
    adapted = {(*name.split("."), "kernel") for name in adapters}
    adapted = {tuple(int(p) if p.isdigit() else p for p in path) for path in adapted}
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))  # the weights, bit for bit
        assert (path in adapted) == (not np.array_equal(value, before[path])), path  # only targets moved
    ids, mask = tokens(seed=2)
    np.testing.assert_allclose(logits_of(reloaded, ids, mask), logits_of(merged, ids, mask), atol=1e-5)
    # Without adapters the model is written as it is: the merged in-memory model round trips too.
    lora.export_merged(merged, tmp_path / "plain")
    for path, value in flat(load_hf_checkpoint(tmp_path / "plain")).items():
        np.testing.assert_array_equal(value, want[path], err_msg=str(path))


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_merged_export_matches_the_stored_transformers_logits(case, tmp_path):
    """PEFT-saved adapters (make_lora_fixtures.py) -> load_adapters -> export_merged -> load_hf_checkpoint
    gives the logits transformers computed for PEFT's merge_and_unload of the same adapters."""
    ref = np.load(FIXTURES / case / "reference.npz")
    adapters, cfg = lora.load_adapters(FIXTURES / case)
    base = load_hf_checkpoint(HF / case)
    lora.export_merged(base, tmp_path, adapters, cfg)
    ids, mask = ref["input_ids"], np.ones(ref["input_ids"].shape, bool)
    got = np.asarray(logits_of(load_hf_checkpoint(tmp_path), ids, mask))
    np.testing.assert_allclose(got, ref["logits"], atol=1e-5)
    # The adapters matter: the base alone is far from the reference (and is transformers' base logits).
    base_logits = np.asarray(logits_of(base, ids, mask))
    np.testing.assert_allclose(base_logits, ref["base_logits"], atol=1e-5)
    assert np.abs(ref["logits"] - ref["base_logits"]).max() > 1e-2


@pytest.mark.slow
def test_live_merged_export_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "up", "down"))
    for case in ("llama", "qwen2"):
        base = load_hf_checkpoint(HF / case)
        graphdef, params = nnx.split(base)
        adapters = random_adapters(params, cfg, seed=3)
        lora.export_merged(base, tmp_path / case, adapters, cfg)
        hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / case, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        assert {key: list(value) for key, value in info.items()} == {key: [] for key in info}
        ids, mask = tokens(seed=4)
        with torch.no_grad():
            theirs = hf_model.eval()(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
        merged = nnx.merge(graphdef, merge(params, adapters, cfg))
        np.testing.assert_allclose(logits_of(merged, ids, mask), theirs, atol=1e-5, err_msg=case)


def test_live_exported_adapters_load_in_peft(tmp_path):
    """Optional: PEFT applies grpo_jax's exported adapters to the base as grpo_jax's merge does."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = lora.LoRAConfig(rank=2, alpha=5.0, targets=("q", "v", "gate", "down"))
    base = load_hf_checkpoint(HF / "qwen2")
    graphdef, params = nnx.split(base)
    adapters = random_adapters(params, cfg, seed=5)
    lora.export_adapters(adapters, cfg, tmp_path, base_model=str(HF / "qwen2"))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(HF / "qwen2", dtype=torch.float32,
                                                                attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(hf_base, tmp_path).eval()
    ids, mask = tokens(seed=6)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
    merged = nnx.merge(graphdef, merge(params, adapters, cfg))
    np.testing.assert_allclose(logits_of(merged, ids, mask), theirs, atol=1e-5)


# ----------------------------------------------------------------------------- PEFT layout


def test_exported_adapters_have_peft_names_shapes_config_and_merge_formula(tmp_path):
    """lora_A [r, in] and lora_B [out, r] under PEFT's names; W_hf + (alpha / r) B_hf @ A_hf (PEFT's merge,
    in numpy) is the merged export's weight."""
    cfg = lora.LoRAConfig(rank=4, alpha=12.0, targets=("q", "k", "o", "gate", "down"))
    base = load_hf_checkpoint(HF / "llama")  # q [32 -> 32], k [32 -> 16], mlp 32 <-> 64
    adapters = random_adapters(nnx.split(base)[1], cfg, seed=7)
    lora.export_adapters(adapters, cfg, tmp_path / "adapters", base_model="tests/fixtures/hf/llama")
    lora.export_merged(base, tmp_path / "merged", adapters, cfg)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    tensors = dict(iter_safetensors(tmp_path / "adapters"))
    modules = {"q": ("self_attn.q_proj", 32, 32), "k": ("self_attn.k_proj", 32, 16),
               "o": ("self_attn.o_proj", 32, 32), "gate": ("mlp.gate_proj", 32, 64),
               "down": ("mlp.down_proj", 64, 32)}
    expected = {}
    for layer in range(2):
        for module, fan_in, fan_out in modules.values():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            expected[f"{prefix}.lora_A.weight"] = (4, fan_in)
            expected[f"{prefix}.lora_B.weight"] = (fan_out, 4)
    assert {name: t.shape for name, t in tensors.items()} == expected
    assert all(t.dtype == np.float32 for t in tensors.values())
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 12.0, 0.0)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj"]
    assert (config["bias"], config["fan_in_fan_out"], config["use_rslora"]) == ("none", False, False)
    assert config["base_model_name_or_path"] == "tests/fixtures/hf/llama"

    base_hf, merged_hf = dict(iter_safetensors(HF / "llama")), dict(iter_safetensors(tmp_path / "merged"))
    assert merged_hf.keys() == base_hf.keys()
    for name, weight in merged_hf.items():
        module = name.removesuffix(".weight")
        if f"base_model.model.{module}.lora_A.weight" in tensors:
            a = tensors[f"base_model.model.{module}.lora_A.weight"]
            b = tensors[f"base_model.model.{module}.lora_B.weight"]
            np.testing.assert_allclose(weight, base_hf[name] + (12.0 / 4) * b @ a, rtol=0, atol=1e-6,
                                       err_msg=name)
            assert np.abs(weight - base_hf[name]).max() > 1e-3, name
        else:
            np.testing.assert_array_equal(weight, base_hf[name], err_msg=name)
    # And back: load_adapters reads the export as it was written.
    loaded, loaded_cfg = lora.load_adapters(tmp_path / "adapters")
    assert loaded_cfg == cfg and loaded.keys() == adapters.keys()
    for name, ab in adapters.items():
        for part in ("a", "b"):
            np.testing.assert_array_equal(loaded[name][part], ab[part])


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_export_adapters_writes_what_peft_saves(case, tmp_path):
    """PEFT-saved adapters, read by load_adapters and written by export_adapters, come out with PEFT's
    tensor names, shapes and values, and the config fields that define the update."""
    adapters, cfg = lora.load_adapters(FIXTURES / case)
    peft_saved = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    lora.export_adapters(adapters, cfg, tmp_path, base_model=peft_saved["base_model_name_or_path"])
    theirs, ours = dict(iter_safetensors(FIXTURES / case)), dict(iter_safetensors(tmp_path))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    for field in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out",
                  "use_rslora", "base_model_name_or_path", "inference_mode"):
        assert written[field] == peft_saved[field], field
    assert sorted(written["target_modules"]) == sorted(peft_saved["target_modules"])


@pytest.mark.parametrize("field, value", [("use_rslora", True), ("use_dora", True), ("r", 3),
                                          ("rank_pattern", {"q_proj": 8}), ("target_modules", ["lm_head"])])
def test_load_adapters_refuses_what_grpo_jax_does_not_compute(field, value, tmp_path):
    for source in (FIXTURES / "qwen2").iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field if field != "r" else "r=3"):
        lora.load_adapters(tmp_path)


def test_export_refuses_adapters_that_do_not_fit(tmp_path):
    base = load_hf_checkpoint(HF / "qwen2")
    cfg = lora.LoRAConfig(rank=2, targets=("q", "v"))
    adapters = random_adapters(nnx.split(base)[1], cfg, seed=8)
    with pytest.raises(ValueError, match=r"missing \['layers.0.mlp.down'"):
        lora.export_merged(base, tmp_path, adapters, lora.LoRAConfig(rank=2, targets=("q", "v", "down")))
    with pytest.raises(ValueError, match=r"config.lora.rank=3"):
        lora.export_merged(base, tmp_path, adapters, lora.LoRAConfig(rank=3, targets=("q", "v")))
    with pytest.raises(ValueError, match="not among config.lora.targets"):
        lora.export_adapters(adapters, lora.LoRAConfig(rank=2, targets=("q",)), tmp_path)
    with pytest.raises(ValueError, match="LoRAConfig"):
        lora.export_merged(base, tmp_path, adapters)
    assert not any(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------- experiments/export.py


def run_config(**overrides):
    """arithmetic_tiny scaled down to a few seconds: a 2-layer width-32 model, 8 prompts x 2 completions."""
    cfg = default_config()
    cfg.model.update(hidden_size=32, intermediate_size=64, num_layers=1)
    cfg.update(eval_examples=0, sample_every=0, num_steps=1, checkpoint_every=1)
    cfg.task_args.size = 64
    cfg.warm_start.steps = 0
    cfg.sampling.update(group_size=2, max_new_tokens=4)
    cfg.rollout.num_prompts = 8
    cfg.updates.grad_accum_steps = 1
    cfg.optimizer.learning_rate = 3e-2
    return set_fields(cfg, overrides)


@pytest.fixture(scope="module")
def run_model():
    """config.model's model, its weights drawn with numpy (eager initialisers would compile one by one)."""
    model = nnx.eval_shape(lambda: Transformer(ModelConfig(**run_config().model), nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for _, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.standard_normal(param.shape).astype(np.float32)
        scaled = 1 + 0.1 * noise if len(param.shape) == 1 else noise / np.sqrt(param.shape[0])
        param.set_value(jnp.asarray(scaled))
    return model


def even_share(examples, completions):
    """A reward that differs within groups (a random model never answers right): the adapters move."""
    return np.array([np.mean(np.asarray(c) % 2 == 0) if c else 0.0 for c in completions], np.float32)


@pytest.mark.slow
def test_export_py_writes_a_lora_runs_policy_merged_or_as_adapters(run_model, tmp_path):
    config = run_config(**{"lora.rank": 4, "lora.alpha": 8.0})
    trainer = experiment.build(config, model=run_model)
    trainer.reward_fn = even_share
    workdir = tmp_path / "run"
    train(trainer, workdir, 1, checkpoint_every=1, print_fn=lambda _: None, loggers=())
    assert float(jnp.abs(trainer.state.params["layers.0.attn.q"]["b"]).max()) > 0  # the adapters moved
    with pytest.raises(FileNotFoundError, match="base not found"):  # the run's base is not saved yet
        experiment.export(config, workdir, tmp_path / "none")
    # The main command saves a LoRA run's base (no config.checkpoint) as step 0 of <workdir>/base, holding
    # {"params": trainer.state.base}.
    experiment.save_base(trainer.state.base, workdir / experiment.BASE_DIR)
    with Checkpointer(workdir / "base") as checkpointer:
        assert checkpointer.all_steps() == [0]
        assert {path.split("/")[0] for path in checkpointer.stored_paths()} == {"params"}

    result = experiment.export(config, workdir, tmp_path / "merged")
    assert result == {"step": 1, "out": str(tmp_path / "merged"), "format": "merged"}
    policy, exported = flat(trainer.policy()), flat(load_hf_checkpoint(tmp_path / "merged"))
    assert exported.keys() == policy.keys()
    for path, value in policy.items():
        np.testing.assert_array_equal(exported[path], value, err_msg=str(path))

    result = experiment.export(config, workdir, tmp_path / "adapters", adapters_only=True)
    base_dir = tmp_path / "adapters" / "base"
    assert result["format"] == "adapters" and result["base"] == str(base_dir)
    adapters, cfg = lora.load_adapters(tmp_path / "adapters")
    assert cfg == trainer.cfg.lora and adapters.keys() == trainer.state.params.keys()
    for name, ab in trainer.state.params.items():
        for part in ("a", "b"):
            np.testing.assert_array_equal(adapters[name][part], ab[part], err_msg=name)
    config_json = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == str(base_dir)
    base = flat(load_hf_checkpoint(base_dir))  # the warm-started / random base goes along, in HF format
    for path, leaf in nnx.to_flat_state(trainer.state.base):
        np.testing.assert_array_equal(base[path], leaf[...], err_msg=str(path))

    with pytest.raises(ValueError, match="not an empty directory"):
        experiment.export(config, workdir, tmp_path / "merged")
    with pytest.raises(ValueError, match="lora.rank: 4 -> 8"):  # another config's checkpoint
        experiment.export(run_config(**{"lora.rank": 8, "lora.alpha": 8.0}), workdir, tmp_path / "other")


def test_export_py_writes_a_full_fine_tuning_runs_params(run_model, tmp_path):
    config = run_config()
    trainer = experiment.build(config, model=run_model)
    with Checkpointer(tmp_path / "run" / "checkpoints") as checkpointer:
        trainer.save(checkpointer)  # step 0, as train() saves a fresh run's start
    result = experiment.export(config, tmp_path / "run", tmp_path / "out")
    assert result["step"] == 0 and result["format"] == "merged"
    exported = flat(load_hf_checkpoint(tmp_path / "out"))
    for path, leaf in nnx.to_flat_state(trainer.state.params):
        np.testing.assert_array_equal(exported[path], leaf[...], err_msg=str(path))
    with pytest.raises(ValueError, match="--adapters_only: the run trained every weight"):
        experiment.export(config, tmp_path / "run", tmp_path / "adapters", adapters_only=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        experiment.export(config, tmp_path / "elsewhere", tmp_path / "adapters")


@pytest.mark.slow
def test_export_py_applies_a_lora_runs_adapters_to_config_checkpoint(tmp_path):
    """A run from a Hugging Face checkpoint: its base is config.checkpoint (no <workdir>/base), the adapters
    name it as their base model, and the tokenizer files travel with the export."""
    checkpoint = tmp_path / "tiny-qwen2"
    checkpoint.mkdir()
    for source in ("qwen2/config.json", "qwen2/model.safetensors", "tokenizer/tokenizer.json",
                   "tokenizer/tokenizer_config.json"):
        (checkpoint / pathlib.Path(source).name).write_bytes((HF / source).read_bytes())
    config = run_config(**{"lora.rank": 2, "lora.alpha": 5.0, "lora.targets": ("q", "v", "down"),
                           "checkpoint": str(checkpoint), "tokenizer": ""})
    config.model = ml_collections.ConfigDict()  # config.json's model as it is
    trainer = experiment.build(config)
    adapters = random_adapters(trainer.state.base, trainer.cfg.lora, seed=9)  # as if trained
    trainer.state = trainer.state._replace(params=jax.device_put(adapters, sharding.replicated(trainer.mesh)))
    with Checkpointer(tmp_path / "run" / "checkpoints") as checkpointer:
        trainer.save(checkpointer)

    experiment.export(config, tmp_path / "run", tmp_path / "merged")
    policy, exported = flat(trainer.policy()), flat(load_hf_checkpoint(tmp_path / "merged"))
    for path, value in policy.items():
        np.testing.assert_array_equal(exported[path], value, err_msg=str(path))
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}

    result = experiment.export(config, tmp_path / "run", tmp_path / "adapters", adapters_only=True)
    assert result["base"] == str(checkpoint) and not (tmp_path / "adapters" / "base").exists()
    config_json = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == str(checkpoint)
    assert config_json["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    # After a warm start the base is no longer config.checkpoint's weights: only <workdir>/base has it.
    config.warm_start.steps = 5
    trainer.fingerprint["config.warm_start.steps"] = 5  # as a run of this config records it
    with Checkpointer(tmp_path / "warm" / "checkpoints") as checkpointer:
        trainer.save(checkpointer)
    with pytest.raises(FileNotFoundError, match=r"base not found: the run.s base is not config.checkpoint.s"):
        experiment.export(config, tmp_path / "warm", tmp_path / "warm-out")
