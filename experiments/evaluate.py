r"""Evaluate a trained policy: greedy accuracy, pass@k and maj@k on a split of the training task.

  python experiments/evaluate.py --config=experiments/configs/arithmetic_tiny.py --workdir=/tmp/grpo
  python experiments/evaluate.py --config=... --workdir=... --split=test --num_samples=16 --ks=1,4,16
  python experiments/evaluate.py --config=... --workdir=... --show=8   # and 8 problems' greedy answers

Pass the config the run trained with (with the same overrides): the model is built as training built it and
only the policy's params (under LoRA its adapters, merged into the base) are read from the workdir's latest
checkpoint (no optimizer state, critic or reference); a workdir without one evaluates the freshly
initialised (or imported, config.checkpoint) model.
Prints one line per metric and writes <workdir>/eval_<split>.json. A config with tools (config.tools,
multi-turn episodes) is evaluated on greedy episodes: accuracy, tool-call rate, tool errors and turns.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax import experiment, lora, multiturn, rewards
from grpo_jax.data import TokenizedDataset
from grpo_jax.evaluation import evaluate, greedy_completions

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file (and its overrides).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/grpo_jax/jax", "JAX's persistent compilation cache (train_grpo.py's): "
    "programs the run compiled load from there; \"\" turns it off.")
_SPLIT = flags.DEFINE_string("split", "test", "Split of config.task to evaluate on.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 200, "The first this many examples of the split.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 8, "Samples per prompt for pass@k and maj@k.")
_KS = flags.DEFINE_list("ks", ["1", "4", "8"], "The k of pass@k and maj@k, each <= num_samples.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Temperature of the sampled completions.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluation's sampling keys.")
_SHOW = flags.DEFINE_integer("show", 0, "Print the greedy completions of the split's first this many "
                             "problems, each marked right or wrong.")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
    if _CACHE.value:
        experiment.use_compilation_cache(pathlib.Path(_CACHE.value).expanduser())
    config, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
    tokenizer = experiment.make_tokenizer(config)
    grpo = experiment.grpo_config(config, tokenizer)  # the run's config, checked before the model is built
    checkpoints, step = workdir / "checkpoints", 0
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        model, adapters, step, _ = experiment.load_run(config, workdir)
        if adapters is not None:
            model = lora.merged(model, adapters, grpo.lora)
    else:
        model = experiment.make_model(config, tokenizer)
    if step:
        print(f"evaluating the checkpoint of step {step} in {checkpoints}")
    else:
        source = config.checkpoint or "random initialisation"
        print(f"no checkpoint in {checkpoints}: evaluating the untrained model ({source})")

    examples = experiment.make_examples(config, _SPLIT.value)
    examples = [examples[i] for i in range(min(_NUM_EXAMPLES.value, len(examples)))]
    buckets = grpo.sampling.buckets
    dataset = TokenizedDataset(examples, tokenizer, experiment.make_template(config.template),
                               max_prompt_tokens=min(config.max_prompt_tokens, max(buckets)))
    episodes = experiment.make_episodes(config, tokenizer, grpo)
    if episodes is not None:
        evaluate_episodes(model, dataset, episodes, grpo, workdir, step)
        return
    metrics = evaluate(model, dataset, tokenizer, key=jax.random.key(_SEED.value),
                       num_samples=_NUM_SAMPLES.value, ks=[int(k) for k in _KS.value],
                       max_new_tokens=grpo.sampling.max_new_tokens, temperature=_TEMPERATURE.value,
                       buckets=buckets)
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    shown = [dataset[i] for i in range(min(_SHOW.value, len(dataset)))]
    if shown:
        texts = greedy_completions(model, shown, tokenizer, max_new_tokens=grpo.sampling.max_new_tokens,
                                   buckets=buckets)
        right = rewards.accuracy_reward([], texts, answer=[e["answer"] for e in shown])
        for example, text, score in zip(shown, texts, right, strict=True):
            print(f"{'right' if score else 'wrong'} | {example['prompt']} -> {text!r}")
    result = {**metrics, "step": step, "split": _SPLIT.value, "num_examples": len(dataset),
              "num_samples": _NUM_SAMPLES.value, "temperature": _TEMPERATURE.value}
    path = workdir / f"eval_{_SPLIT.value}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def evaluate_episodes(model, dataset, episodes, grpo, workdir: pathlib.Path, step: int) -> None:
    """Greedy multi-turn episodes: their mean metrics, and with --show the first ones' turns."""
    metrics = multiturn.evaluate_episodes(model, dataset, episodes, grpo.sampling, grpo.env)
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    shown = [dataset[i] for i in range(min(_SHOW.value, len(dataset)))]
    if shown:
        greedy = dataclasses.replace(grpo.sampling, temperature=0.0, group_size=1)
        _, rewards_, _, records = episodes.sample(model, shown, jax.random.key(_SEED.value), greedy, grpo.env)
        for example, reward, episode in zip(shown, rewards_, records, strict=True):
            turns = " | ".join(f"{turn!r}" + (f" -> {obs!r}" if i < len(episode.observations) else "")
                               for i, (turn, obs) in enumerate(
                                   zip(episode.turns, [*episode.observations, ""], strict=False)))
            print(f"{'right' if reward > 0 else 'wrong'} | {example['prompt']} -> {turns}")
    result = {**metrics, "step": step, "split": _SPLIT.value, "num_examples": len(dataset)}
    path = workdir / f"eval_{_SPLIT.value}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
