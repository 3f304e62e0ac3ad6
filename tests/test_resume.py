"""Resuming is safe: a checkpoint of another run is refused naming what changed, a finished run can be
extended, a broken latest checkpoint falls back to the previous one, and a run is deterministic."""

import shutil
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_trainer import MODEL, make_config, make_dataset, reward_fraction_of_target

from grpo_jax.checkpoint import Checkpointer
from grpo_jax.data import TokenizedDataset
from grpo_jax.metrics import read_jsonl
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.tokenizers import load_tokenizer
from grpo_jax.trainer import Trainer, train

FIELDS = dict(num_prompts=8, group_size=2, max_new_tokens=4, learning_rate=3e-3, buckets=(8,),
              stop_tokens=(1,), schedule="cosine", num_steps=2)


def trainer(model_config=MODEL, dataset=None, fingerprint=None, **overrides):
    cfg = make_config(**{**FIELDS, **overrides})
    return Trainer(Transformer(model_config, nnx.Rngs(0)), cfg, dataset or make_dataset(),
                   reward_fraction_of_target, fingerprint=fingerprint)


def params_of(t):
    leaves = jax.tree_util.tree_leaves_with_path(t.state.params)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def run(t, workdir, steps):
    return train(t, workdir, steps, checkpoint_every=1, print_fn=lambda _: None)


def data(seed):
    examples = [{"prompt": f"{seed + i} + 1 =", "answer": str(seed + i + 1)} for i in range(16)]
    return TokenizedDataset(examples, load_tokenizer("char"))


WIDE = ModelConfig(**{**MODEL.__dict__, "vocab_size": 128})  # room for the char tokenizer


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One step of a run with a fingerprint, checkpointed: the run the cases below try to resume."""
    workdir = tmp_path_factory.mktemp("first_run")
    run(trainer(dataset=data(0), fingerprint={"config.task_args.digits": 2}, model_config=WIDE), workdir, 1)
    return workdir


@pytest.mark.parametrize("change, expected", [
    (dict(fingerprint={"config.task_args.digits": 3}), r"config\.task_args\.digits: 2 -> 3"),
    (dict(fingerprint={"config.task_args.digits": 2, "config.rewards": [["format", 1.0]]}),
     r"config\.rewards: \(absent\) -> \[\['format', 1\.0\]\]"),
    (dict(beta=0.04), r"config\.loss\.beta: 0\.0 -> 0\.04"),
    (dict(epsilon=0.3), r"config\.loss\.epsilon: 0\.2 -> 0\.3"),
    (dict(model_config=ModelConfig(**{**MODEL.__dict__, "rope_theta": 500.0})),
     r"model\.rope_theta: 10000\.0 -> 500\.0"),
    (dict(dataset="other"), r"data: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"),
])
def test_a_checkpoint_of_another_run_is_refused_naming_the_change(tmp_path, first_run, change, expected):
    shutil.copytree(first_run, tmp_path, dirs_exist_ok=True)
    change = dict(change)
    change["dataset"] = data(100) if change.get("dataset") == "other" else data(0)
    change.setdefault("fingerprint", {"config.task_args.digits": 2})
    change["model_config"] = ModelConfig(**{**change.get("model_config", MODEL).__dict__, "vocab_size": 128})
    second = trainer(**change)
    with pytest.raises(ValueError, match=f"holds a checkpoint of another run: .*{expected}") as error:
        run(second, tmp_path, 2)
    assert "Use a new --workdir" in str(error.value) and "ref_params" not in str(error.value)
    assert second.step == 0  # nothing was restored or trained


@pytest.mark.slow
def test_a_finished_run_can_be_extended_and_its_schedule_follows_the_new_total(tmp_path):
    finished = trainer(num_steps=2)
    run(finished, tmp_path, 2)
    at_two = params_of(finished)
    # Over 2 steps the cosine schedule has decayed to 0: under the old total the params could not move.
    extended = trainer(num_steps=4)
    history = run(extended, tmp_path, 4)
    assert [r["step"] for r in history] == [3, 4] and extended.step == 4
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    moved = max(float(np.abs(params_of(extended)[k] - at_two[k]).max()) for k in at_two)
    assert moved > 1e-4
    # The restored optimizer continued its count (the schedule's argument): 4 updates, not 2 + a fresh 2.
    counts = [int(x) for _, x in optax.tree_utils.tree_get_all_with_path(extended.state.opt_state, "count")]
    assert counts and set(counts) == {4}
    assert Checkpointer(tmp_path / "checkpoints").metadata()["config"]["num_steps"] == 4


@pytest.mark.slow
def test_a_broken_latest_checkpoint_resumes_from_the_previous_step_and_ends_like_a_straight_run(tmp_path):
    straight = trainer(num_steps=3)
    run(straight, tmp_path / "straight", 3)
    interrupted = trainer(num_steps=3)
    run(interrupted, tmp_path / "resumed", 2)
    step_two = tmp_path / "resumed" / "checkpoints" / "2"
    (step_two / "state" / "_METADATA").unlink()  # the latest checkpoint is broken
    resumed = trainer(num_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(resumed, tmp_path / "resumed", 3)
    assert any("restored step 1" in str(w.message) and "step 2 is broken" in str(w.message) for w in caught)
    for name, value in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[name], value, err_msg=name)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run_and_no_key_is_used_twice(tmp_path):
    histories, params = [], []
    for attempt in range(2):
        t = trainer(num_steps=2, beta=0.04, mu=2, num_minibatches=2)
        with jax.debug_key_reuse(True):
            histories.append(run(t, tmp_path / str(attempt), 2))
        params.append(params_of(t))
    timing = ("time", "time_sampling", "time_rewards", "time_reference", "time_update", "tokens_per_second",
              "time_iteration")
    strip = [[{k: v for k, v in r.items() if k not in timing} for r in h] for h in histories]
    assert strip[0] == strip[1] and len(strip[0]) == 2
    for name in params[0]:
        np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)
    # Another seed is another run.
    other = trainer(num_steps=1, beta=0.04, mu=2, num_minibatches=2, seed=1)
    assert run(other, tmp_path / "other", 1)[0]["reward_mean"] != histories[0][0]["reward_mean"] or \
        any(not np.array_equal(params_of(other)[k], params[0][k]) for k in params[0])
