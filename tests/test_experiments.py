"""The experiment entry point: configs build, fail fast with clear messages, and a short run works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import train_grpo  # noqa: E402
from configs import arithmetic_tiny  # noqa: E402


def config(**overrides):
    cfg = arithmetic_tiny.get_config()
    cfg.unlock()
    for key, value in overrides.items():
        target = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return cfg


def test_default_config_builds_a_trainer():
    trainer = train_grpo.build(config())
    assert trainer.cfg.stop_tokens == (1,) and trainer.cfg.total_steps == 350
    example = trainer.dataset[0]
    assert example["prompt_text"].startswith("What is ") and len(example["prompt_tokens"]) <= 32
    rewards, metrics = trainer.reward_fn([example, example], [[], trainer.dataset.tokenizer.encode(
        example["answer"])])
    assert list(rewards) == [0.0, 1.0] and "accuracy" in metrics


def test_warm_start_trains_the_model_before_grpo(capsys):
    overrides = {"warm_start.steps": 3, "warm_start.eval_every": 1, "warm_start.threshold": 2.0,
                 "eval_examples": 8}
    plain = train_grpo.build(config(**overrides))
    warmed = train_grpo.build(config(**overrides), warm_start=True)
    assert "warm start: 3 steps" in capsys.readouterr().out  # an unreachable threshold: the step budget
    before = plain.state.params["layers"][0]["mlp"]["up"]["kernel"][...]
    after = warmed.state.params["layers"][0]["mlp"]["up"]["kernel"][...]
    assert float(abs(before - after).max()) > 0


@pytest.mark.parametrize("overrides, message", [
    ({"grpo.num_prompts": 12, "grpo.num_minibatches": 5}, "num_minibatches=5"),
    ({"model.vocab_size": 64}, "vocab_size is 64"),
    ({"grpo.max_new_tokens": 120}, "max_position_embeddings=128"),
    ({"rewards": (("accuracy", 1.0), ("fluency", 1.0))}, "fluency"),
    ({"task": "poetry"}, "config.task='poetry'"),
    ({"max_prompt_tokens": 4}, "prompt"),
])
def test_inconsistent_configs_fail_fast(overrides, message):
    with pytest.raises(ValueError, match=message):
        train_grpo.build(config(**overrides))


def test_short_run_writes_metrics_checkpoints_and_plots(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train_grpo.py"),
         f"--config={ROOT / 'experiments' / 'configs' / 'arithmetic_tiny.py'}", f"--workdir={tmp_path}",
         "--config.num_steps=2", "--config.grpo.num_prompts=4", "--config.warm_start.steps=0"],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})  # one CPU device, as for a user
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2/2 (100%)" in done.stdout
    assert (tmp_path / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
