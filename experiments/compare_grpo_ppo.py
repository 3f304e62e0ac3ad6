r"""GRPO against PPO with a learned critic, on the same task, warm start, seeds and sampled completions.

  python experiments/compare_grpo_ppo.py --config=experiments/configs/arithmetic_tiny.py \
      --workdir=/tmp/grpo_vs_ppo
  python experiments/compare_grpo_ppo.py --config=... --workdir=/tmp/c --seeds=0 --config.num_steps=100

For each seed, one supervised warm start (config.warm_start) is shared by both algorithms; then GRPO (the
config as given) and PPO (the same with algo="ppo": a critic initialised from the policy, GAE) each train
for config.num_steps iterations of config.rollout.num_prompts x config.sampling.group_size sampled
completions, so the two differ only in where the advantages come from (group statistics or a critic) and
what that costs.
Every `--eval_every` iterations the held-out greedy accuracy is measured (its time is not counted).

Writes to the workdir: comparison.md (the table), comparison.json (every measurement), comparison.png
(held-out accuracy against wall time and against sampled completions) and seed<S>_<algo>.jsonl (each
iteration's metrics: reward, value loss, explained variance, grad norms, ...). Columns: bytes held between
iterations (params + optimizer state, + the critic and its optimizer state for PPO), the peak compiled
memory of one train step (XLA's memory_analysis), median wall time per iteration, the completions and
wall time until the held-out accuracy first reaches `--target`, and the final held-out accuracy.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from grpo_jax import experiment
from grpo_jax.update import compiled_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "The experiment's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the comparison's files go.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed), each with its own warm start.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out evaluation every this many iterations.")
_ALGOS = flags.DEFINE_list("algos", ["grpo", "ppo"], "The algorithms to run (config.algo values), "
                            "each from the same warm start per seed.")
_TARGET = flags.DEFINE_float("target", 0.8, "Held-out greedy accuracy for the time-to-accuracy columns.")
ALGOS = ("grpo", "ppo")


def run_algo(config, model, seed: int, algo: str, workdir: pathlib.Path, print_fn=print) -> dict:
    """Train one algorithm from `model` and measure it; the held-out evaluations are not timed. Every
    iteration's metrics go to workdir/seed<S>_<algo>.jsonl."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.algo = algo
    trainer = experiment.build(config, model=model)
    tokenizer = trainer.dataset.tokenizer
    completions_per_step = trainer.cfg.rollout.num_prompts * trainer.cfg.sampling.group_size

    def accuracy():
        return experiment.held_out_accuracy(config, trainer.policy(), tokenizer, trainer.cfg)

    curve = [dict(step=0, completions=0, seconds=0.0, accuracy=accuracy())]
    step_seconds, trained = [], 0.0
    log = open(workdir / f"seed{seed}_{algo}.jsonl", "w")
    while trainer.step < config.num_steps:
        start = time.perf_counter()
        metrics = trainer.iteration()
        jax.block_until_ready(trainer.state)
        step_seconds.append(time.perf_counter() - start)
        log.write(json.dumps(metrics) + "\n")
        trained += step_seconds[-1]
        if trainer.step % _EVAL_EVERY.value == 0 or trainer.step == config.num_steps:
            curve.append(dict(step=trainer.step, completions=trainer.step * completions_per_step,
                              seconds=trained, accuracy=accuracy(), reward=metrics["reward_mean"]))
            print_fn(f"seed {seed} {algo}: step {trainer.step}/{config.num_steps}, {trained:.0f} s, "
                     f"held-out {curve[-1]['accuracy']:.1%}, reward {metrics['reward_mean']:.3f}")
    log.close()
    reached = next((point for point in curve if point["accuracy"] >= _TARGET.value), None)
    held = trainer.state_bytes()
    return dict(seed=seed, algo=algo, curve=curve, state_bytes=held, held_bytes=sum(held.values()),
                train_step_memory=compiled_memory(trainer.train_step, trainer.state,
                                                  trainer.batch(trainer.last_rollout)),
                seconds_per_iteration=statistics.median(step_seconds[1:] or step_seconds),
                first_iteration_s=step_seconds[0], reached=reached, start=curve[0]["accuracy"],
                end=curve[-1]["accuracy"])


def format_table(rows: list[dict], target: float) -> str:
    mb = 2.0**20
    lines = [f"| algorithm | seed | params + optimizer state (+ critic) | train step peak memory "
             f"| s / iteration | completions to {target:.0%} | seconds to {target:.0%} "
             "| held-out: start -> end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        reached = row["reached"]
        seconds = f"{reached['seconds']:.0f}" if reached else "-"
        lines.append(
            f"| {row['algo']} | {row['seed']} | {row['held_bytes'] / mb:.1f} MiB | "
            f"{row['train_step_memory']['peak'] / mb:.1f} MiB | {row['seconds_per_iteration']:.3f} | "
            f"{reached['completions'] if reached else 'not reached'} | "
            f"{seconds} | {row['start']:.1%} -> {row['end']:.1%} |")
    for algo in ALGOS:
        mine = [r for r in rows if r["algo"] == algo]
        if mine:
            final = statistics.median(r["end"] for r in mine)
            per_iteration = statistics.median(r["seconds_per_iteration"] for r in mine)
            reached = sum(r["reached"] is not None for r in mine)
            held = mine[0]["held_bytes"] / 2**20
            lines.append(f"\n{algo}: median final held-out accuracy {final:.1%}, median "
                         f"{per_iteration:.3f} s per iteration, {held:.1f} MiB held, "
                         f"{reached}/{len(mine)} seeds reached {target:.0%}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"grpo": "tab:blue", "ppo": "tab:orange"}
    for row in rows:
        curve = row["curve"]
        label = f"{row['algo']} seed {row['seed']}"
        axes[0].plot([p["seconds"] for p in curve], [p["accuracy"] for p in curve], color=colors[row["algo"]],
                     alpha=0.8, label=label)
        axes[1].plot([p["completions"] for p in curve], [p["accuracy"] for p in curve],
                     color=colors[row["algo"]], alpha=0.8, label=label)
    for ax, xlabel in zip(axes, ("training wall time (s)", "sampled completions"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in _SEEDS.value]
    algos = _ALGOS.value
    if not algos or set(algos) - set(ALGOS):
        raise app.UsageError(f"--algos={','.join(algos)}: each must be one of {ALGOS}.")
    for algo in algos:  # every config error (either algorithm's) before the first warm start
        checked = config.copy_and_resolve_references()
        with checked.unlocked():
            checked.algo = algo
        experiment.build(checked)
    rows = []
    for seed in seeds:
        seeded = config.copy_and_resolve_references()
        with seeded.unlocked():
            seeded.seed = seed
        warm = experiment.build(seeded, workdir=workdir / f"seed{seed}").policy()
        graphdef, params = nnx.split(warm)
        for algo in algos:
            model = nnx.merge(graphdef, jax.tree.map(np.asarray, params))  # the same start, a fresh copy
            rows.append(run_algo(seeded, model, seed, algo, workdir,
                                 print_fn=lambda line: print(line, flush=True)))
            print(format_table(rows[-1:], _TARGET.value).splitlines()[2], flush=True)
    table = format_table(rows, _TARGET.value)
    (workdir / "comparison.md").write_text(table)
    (workdir / "comparison.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, workdir / "comparison.png")
    print(table + f"\ntable, JSON and plot in {workdir}")


if __name__ == "__main__":
    app.run(main)
