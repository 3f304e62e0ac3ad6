"""Bad input to the main command fails fast: each of these configs, data files, Hugging Face directories,
workdirs and checkpoints is rejected before the warm start (and, for config mistakes, before any model is
built), with a message naming the config path, the value and the fix."""

import json
import math
import shutil
import struct
import time
from pathlib import Path

import ml_collections
import pytest

ROOT = Path(__file__).resolve().parents[1]
from configs_for_tests import default_config  # noqa: E402
from gguf_fixtures import TinyTokenizer, write_tiny_gguf  # noqa: E402

from grpo_jax import experiment  # noqa: E402
from grpo_jax.checkpoint import Checkpointer  # noqa: E402

LLAMA = ROOT / "tests" / "fixtures" / "hf" / "llama"


def config(**overrides):
    # A warm start is reached only if a check is missing: the guards below fail the test then.
    return default_config(**{"warm_start.steps": 2, **overrides})


def jsonl(tmp, train_lines, test_lines=('{"question": "1 + 1?", "answer": "#### 2"}',)):
    for split, lines in (("train", train_lines), ("test", test_lines)):
        data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines)
        (tmp / f"{split}.jsonl").write_bytes(data)
    return config(task="jsonl", task_args=ml_collections.ConfigDict(
        {"train_path": str(tmp / "train.jsonl"), "test_path": str(tmp / "test.jsonl")}))


GOOD_ROW = '{"question": "What is 2 + 3?", "answer": "#### 5"}'


def hf_dir(tmp, corrupt):
    directory = tmp / "model"
    shutil.copytree(LLAMA, directory)
    corrupt(directory)
    return config(checkpoint=str(directory), tokenizer="char", model=ml_collections.ConfigDict({}))


# Two characters fewer than the model's 96 embedding rows (the merges' tokens kept).
SHORT_VOCABULARY = [t for i, t in enumerate(TinyTokenizer().fields["tokenizer.ggml.tokens"])
                    if i not in (10, 11)]


def gguf_file(tmp, corrupt=None, **tokenizer_changes):
    """The main command on a tiny GGUF (its own tokenizer and chat template), broken by `corrupt(path)`
    or by changes to its tokenizer metadata."""
    path = write_tiny_gguf(tmp / "model.gguf", **tokenizer_changes)
    if corrupt is not None:
        corrupt(path)
    return config(checkpoint=str(path), tokenizer="", template="chat_default", max_prompt_tokens=64,
                  model=ml_collections.ConfigDict({"max_position_embeddings": 96}),
                  **{"sampling.buckets": (64,)})


def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def unknown_dtype(directory):
    """The first tensor's dtype rewritten to one grpo_jax does not read (the header re-encoded)."""
    path = directory / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F8_E4M3"
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


def previous_run(tmp, **changes):
    """A checkpoint of the default run (unchanged config) in tmp/run, then the same command with changes."""
    workdir = tmp / "run"
    trainer = experiment.build(config())
    with Checkpointer(workdir / "checkpoints") as checkpoints:
        trainer.save(checkpoints)
    return config(**changes), workdir


def broken_checkpoint(tmp):
    cfg, workdir = previous_run(tmp)
    for path in (workdir / "checkpoints" / "0" / "state").rglob("_METADATA"):
        path.unlink()
    for path in (workdir / "checkpoints" / "0").rglob("metadata"):
        if path.is_file():
            path.write_text("")
    return cfg, workdir


# (id, how to build (config, workdir) from tmp_path, text the error must contain, the furthest it may get:
# False: no model is built; True: the model may load (the check is the load); "restore": a resumed run's
# restore, which reads the checkpoint)
CASES = [
    # The experiment's own fields.
    ("num_steps=0", lambda t: config(num_steps=0), "config.num_steps=0 must be an integer >= 1", False),
    ("num_steps<0", lambda t: config(num_steps=-5), "config.num_steps=-5", False),
    ("checkpoint_every=0", lambda t: config(checkpoint_every=0), "config.checkpoint_every=0 must be >= 1",
     False),
    ("log_every=0", lambda t: config(log_every=0), "config.log_every=0 must be >= 1", False),
    ("sample_every<0", lambda t: config(sample_every=-1), "config.sample_every=-1 must be >= 0", False),
    ("eval_examples<0", lambda t: config(eval_examples=-1), "config.eval_examples=-1", False),
    ("eval_batch_prompts=0", lambda t: config(eval_batch_prompts=0), "config.eval_batch_prompts=0", False),
    ("max_prompt_tokens=0", lambda t: config(max_prompt_tokens=0), "config.max_prompt_tokens=0", False),
    ("init_perturbation=nan", lambda t: config(init_perturbation=math.nan), "config.init_perturbation=nan",
     False),
    ("init_perturbation<0", lambda t: config(init_perturbation=-1.0), "config.init_perturbation=-1.0", False),
    ("init_perturbation=inf", lambda t: config(init_perturbation=math.inf), "config.init_perturbation=inf",
     False),
    ("task", lambda t: config(task="poetry"), "config.task='poetry' is not a task", False),
    ("template", lambda t: config(template="fancy"), "config.template='fancy' is not a template", False),
    ("reward name", lambda t: config(rewards=(("fluency", 1.0),)), "config.rewards=(('fluency', 1.0),)",
     False),
    ("reward weight nan", lambda t: config(rewards=(("accuracy", math.nan),)), "finite weight", False),
    ("no rewards", lambda t: config(rewards=()), "config.rewards=() must be (name, finite weight)", False),
    ("loggers", lambda t: config(loggers=("tb",)), "config.loggers=('tb',) must be a tuple of names", False),
    ("estimator", lambda t: config(**{"advantages.estimator": "ppo"}), "config.advantages.estimator='ppo'",
     False),
    ("tokenizer dir", lambda t: config(tokenizer=str(t / "nowhere")), "config.tokenizer=", False),
    ("checkpoint dir", lambda t: config(checkpoint=str(t / "nowhere")),
     "is neither a .gguf file nor a Hugging Face model directory", False),
    ("no tokenizer", lambda t: config(tokenizer="", checkpoint=""), "--config.checkpoint=", False),
    ("warm_start.steps<0", lambda t: config(**{"warm_start.steps": -1}), "config.warm_start.steps=-1", False),
    ("warm_start.lr=0", lambda t: config(**{"warm_start.learning_rate": 0.0}),
     "config.warm_start.learning_rate=0.0 must be a finite number > 0", False),
    ("warm_start.lr<0", lambda t: config(**{"warm_start.learning_rate": -1e-3}),
     "config.warm_start.learning_rate=-0.001", False),
    ("warm_start.ema=1", lambda t: config(**{"warm_start.ema": 1.0}), "config.warm_start.ema=1.0", False),
    ("warm_start.threshold", lambda t: config(**{"warm_start.threshold": 2.0}),
     "config.warm_start.threshold=2.0 must be a held-out accuracy in [0, 1]", False),
    ("warm_start.batch_size", lambda t: config(**{"warm_start.batch_size": 0}),
     "config.warm_start.batch_size=0", False),
    ("warm_start.eval_every", lambda t: config(**{"warm_start.eval_every": 0}),
     "config.warm_start.eval_every=0", False),
    ("model heads", lambda t: config(**{"model.num_heads": 3}), "config.model:", False),
    # The GRPO sections.
    ("temperature=0", lambda t: config(**{"sampling.temperature": 0.0}),
     "config.sampling.temperature=0.0 must be > 0 to train", False),
    ("group_size=1", lambda t: config(**{"sampling.group_size": 1}), "config.sampling.group_size=1", False),
    ("top_p=0", lambda t: config(**{"sampling.top_p": 0.0}), "config.sampling.top_p=0.0", False),
    ("max_new_tokens=0", lambda t: config(**{"sampling.max_new_tokens": 0}),
     "config.sampling.max_new_tokens=0", False),
    ("num_prompts=0", lambda t: config(**{"rollout.num_prompts": 0}), "config.rollout.num_prompts=0", False),
    ("epsilon=nan", lambda t: config(**{"loss.epsilon": math.nan}), "config.loss.epsilon=nan", False),
    ("beta<0", lambda t: config(**{"loss.beta": -0.04}), "config.loss.beta=-0.04", False),
    ("loss_type", lambda t: config(**{"loss.loss_type": "ppo"}), "config.loss.loss_type='ppo'", False),
    ("scale", lambda t: config(**{"advantages.scale": "weird"}), "config.advantages.scale='weird'", False),
    ("lr<0", lambda t: config(**{"optimizer.learning_rate": -1e-3}), "config.optimizer.learning_rate=-0.001",
     False),
    ("lr=0", lambda t: config(**{"optimizer.learning_rate": 0.0}), "config.optimizer.learning_rate=0.0",
     False),
    ("mu=0", lambda t: config(**{"updates.mu": 0}), "config.updates.mu=0", False),
    ("num_minibatches=0", lambda t: config(**{"updates.num_minibatches": 0}),
     "config.updates.num_minibatches=0", False),
    ("num_minibatches=3", lambda t: config(**{"updates.num_minibatches": 3}),
     "config.updates.num_minibatches=3 must divide config.rollout", False),
    ("algo", lambda t: config(algo="a2c"), "config.algo='a2c'", False),
    ("unknown field", lambda t: config(**{"loss.betta": 0.1}), "config.loss has no field(s) ['betta']",
     False),
    # Data files.
    ("jsonl missing test file", lambda t: (jsonl(t, [GOOD_ROW]), (t / "test.jsonl").unlink())[0],
     "config.task_args.test_path=", False),
    ("jsonl not UTF-8", lambda t: jsonl(t, [GOOD_ROW, b'{"question": "caf\xe9", "answer": "#### 1"}']),
     "train.jsonl, line 2: not valid UTF-8", False),
    ("jsonl bad JSON", lambda t: jsonl(t, [GOOD_ROW, '{"question": "2 + 2?" "answer": "#### 4"}']),
     "train.jsonl, line 2: not valid JSON", False),
    ("jsonl missing field", lambda t: jsonl(t, [GOOD_ROW, '{"answer": "#### 4"}']),
     "train.jsonl, line 2: field 'question' is missing", False),
    ("jsonl empty", lambda t: jsonl(t, []), "train.jsonl is empty", False),
    # Hugging Face directories.
    ("hf no config.json", lambda t: hf_dir(t, lambda d: (d / "config.json").unlink()),
     "is neither a .gguf file nor a Hugging Face model directory (no config.json in it)", False),
    # GGUF files: the tokenizer is read from the file before any model is built.
    ("gguf not a gguf", lambda t: gguf_file(t, lambda p: p.write_text('{"vocab": 5}')),
     "model.gguf is not a GGUF file (it starts with b'{\"vo', not b'GGUF')", False),
    ("gguf truncated", lambda t: gguf_file(t, lambda p: truncate(p, p.stat().st_size - 4000)),
     "the file is truncated or corrupt", False),
    ("gguf chat template fails", lambda t: gguf_file(
        t, **{"tokenizer.chat_template": "{{ messages[2]['content'] }}"}),
     "metadata key 'tokenizer.chat_template' fails to render", False),
    ("gguf no merges", lambda t: gguf_file(t, **{"tokenizer.ggml.merges": None}),
     "metadata key 'tokenizer.ggml.merges' (the BPE merges) is missing", False),
    ("gguf vocabulary", lambda t: gguf_file(t, **{"tokenizer.ggml.tokens": SHORT_VOCABULARY,
                                                  "tokenizer.ggml.token_type": [3, 3] + [1] * 92}),
     "'tokenizer.ggml.tokens' holds 94 tokens but tensor 'token_embd.weight' has 96 rows", True),
    ("hf garbled config.json", lambda t: hf_dir(t, lambda d: (d / "config.json").write_text("{vocab")),
     "config.json is not valid UTF-8 JSON", True),
    ("hf truncated safetensors", lambda t: hf_dir(t, lambda d: truncate(d / "model.safetensors", 5000)),
     "truncated or corrupt", True),
    ("hf unknown dtype", lambda t: hf_dir(t, unknown_dtype),
     "has dtype 'F8_E4M3', which grpo_jax cannot read", True),
    # Workdirs and checkpoints.
    ("workdir is a file", lambda t: (config(), (t / "file").write_text("x") and t / "file" / "run"),
     "--workdir=", False),
    ("resume, task changed", lambda t: previous_run(t, **{"task_args.digits": 3}),
     "config.task_args.digits: 2 -> 3", False),
    ("resume, reward changed", lambda t: previous_run(t, rewards=(("accuracy", 1.0), ("format", 0.5))),
     "config.rewards: [['accuracy', 1.0]] -> [['accuracy', 1.0], ['format', 0.5]]", False),
    ("resume, beta changed", lambda t: previous_run(t, **{"loss.beta": 0.04}),
     "config.loss.beta: 0.0 -> 0.04", False),
    ("resume, model changed", lambda t: previous_run(t, **{"model.hidden_size": 64}),
     "config.model.hidden_size: 128 -> 64", False),
    ("checkpoint unreadable", broken_checkpoint, "Delete", "restore"),
]


@pytest.fixture
def guarded(monkeypatch):
    """Fail the test if a case gets past the checks: to the warm start, to GRPO, or (for config mistakes) to
    building a model."""
    reached = []

    def stop(stage):
        def fail(*args, **kwargs):
            reached.append(stage)
            raise AssertionError(f"reached {stage}: the bad input was not caught before it")
        return fail

    monkeypatch.setattr(experiment, "supervised_warm_start", stop("the warm start"))
    monkeypatch.setattr(experiment, "train", stop("GRPO training"))
    monkeypatch.setattr(experiment, "held_out_accuracy", stop("the held-out evaluation"))
    return monkeypatch, stop


@pytest.mark.parametrize("name, make, message, may_load_model", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_naming_the_field(tmp_path, guarded, name, make, message, may_load_model):
    monkeypatch, stop = guarded
    made = make(tmp_path)
    cfg, workdir = made if isinstance(made, tuple) else (made, tmp_path / "run")
    if not may_load_model:
        monkeypatch.setattr(experiment, "make_model", stop("building the model"))
    if may_load_model == "restore":
        monkeypatch.undo()  # the restore is inside train(); a resume has no warm start or first evaluation
        monkeypatch.setattr(experiment.Trainer, "iteration", stop("a GRPO iteration"))
    start = time.perf_counter()
    with pytest.raises((ValueError, FileNotFoundError, RuntimeError)) as error:
        experiment.run(cfg, workdir)
    assert message in str(error.value), str(error.value)
    assert time.perf_counter() - start < 30  # seconds: loading the 20k-problem task is the slowest part


def test_the_table_covers_at_least_forty_bad_inputs():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
