"""The GRPO loop: a sequence of stages, each a module of its own.

One iteration (`Trainer.iteration`):

  1. rollout   `rollout.collect`: N prompts from the dataset at a resumable position, G completions each from
               the jit-compiled sampler (on the training mesh or a `rollout_mesh`), rewards on the host, DAPO
               dynamic sampling and overlong penalty. Only the completion tokens and mask leave the device.
  2. prepare   `update.prepare_batch`, jitted: advantages (group-relative, or GAE over PPO's critic),
               log pi_ref (only when beta != 0), log pi_old (only when mu > 1)
  3. update    mu epochs x num_minibatches jitted `update.train_step`s, each minibatch gathered in jit
  4. reference DeepSeekMath iterative GRPO: pi_ref <- pi_theta every `ref_update_every` iterations
With config.rollout.pipeline="one_step_off" the rollout of iteration t+1 is sampled (from a copy of the params
before update t, in a thread of its own) while update t runs: each update trains on a rollout one step stale,
which config.loss.rollout_correction reweights. A `prefetch=False` iteration samples nothing ahead (the
trainer is then in the state a checkpoint records), so a run resumed from any checkpoint is exact.

With config.algo="ppo" the same loop is PPO with a learned critic (`grpo_jax.critic`), the baseline GRPO is
measured against. The config has one section per stage (`GRPOConfig`), each validated where it is defined.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from grpo_jax import rollout as rollout_lib
from grpo_jax import sharding
from grpo_jax import update as update_lib
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.config import GRPOConfig, flatten
from grpo_jax.environments import Observations
from grpo_jax.metrics import MetricsWriter
from grpo_jax.models.transformer import Transformer
from grpo_jax.multiturn import EpisodeSampler
from grpo_jax.sampling import device_index, prompt_sharding
from grpo_jax.update import (
    LossFn,
    TrainState,
    abstract_train_state,
    init_train_state,
    make_optimizer,
    make_optimizers,
    tree_bytes,
)

# Neither changes what a resumed run computes from its checkpoint: the total (the schedule follows the new
# one) and whether layers recompute their activations.
_MAY_CHANGE_ON_RESUME = ("config.num_steps", "model.remat")


class Trainer:
    """Runs GRPO iterations on a model. The dataset is indexable (`len`, `[i]` -> example with a
    `prompt_tokens` list); `reward_fn(examples, completions)` gets one example per completion row and the
    completion token lists, and returns rewards `[B]` or `(rewards [B], {metric name: value})`.

    With `episodes` (a `multiturn.EpisodeSampler`, needed when cfg.env.max_turns > 1), every completion is a
    multi-turn episode rewarded by its environment, and `reward_fn` may be None.

    `optimizer` (default: `make_optimizer(cfg.optimizer, ...)`) and `loss_fn` (default: `losses.policy_loss`
    with cfg.loss's options) may be any optax transformation and any function with policy_loss's signature.
    `mesh` lays out training (default: every device on "data"); `rollout_mesh`, when given, is where sampling
    runs, with the policy copied onto it once per iteration (e.g. data-parallel with whole params while
    training shards them FSDP-style).

    A checkpoint records what the run is: `cfg`, the model's config, the dataset's `fingerprint()` (when it
    has one) and `fingerprint`, `{config path: JSON-able value}` for whatever else defines the run (task,
    reward, tokenizer, ...). Resuming with any of them changed is refused, naming the path; only
    `cfg.num_steps` may change, so a finished run can be extended (the learning-rate schedule then follows
    the new total from the step reached).
    """

    def __init__(self, model: Transformer, cfg: GRPOConfig, dataset, reward_fn: rollout_lib.RewardFn | None,
                 *, optimizer: optax.GradientTransformation | None = None, loss_fn: LossFn | None = None,
                 mesh: Mesh | None = None, rollout_mesh: Mesh | None = None,
                 fingerprint: dict[str, object] | None = None, episodes: EpisodeSampler | None = None,
                 time_stages: bool = False):
        if cfg.env.multi_turn and episodes is None:
            raise ValueError(f"config.env.max_turns={cfg.env.max_turns} needs an environment: pass "
                             "Trainer(..., episodes=grpo_jax.multiturn.EpisodeSampler(make_env, tokenizer)).")
        if reward_fn is None and episodes is None:
            raise ValueError("Trainer needs reward_fn (single-turn completions) or episodes= (multi-turn "
                             "episodes rewarded by their environments).")
        if episodes is not None:  # the observations' template and budget, checked before any work
            Observations(episodes.tokenizer, cfg.env.observation_template, cfg.env.max_observation_tokens)
        self.cfg, self.dataset, self.reward_fn, self.episodes = cfg, dataset, reward_fn, episodes
        self.time_stages = time_stages
        self.fingerprint = {**flatten(json.loads(json.dumps(dataclasses.asdict(model.config))), "model"),
                            **({"data": dataset.fingerprint()} if hasattr(dataset, "fingerprint") else {}),
                            **json.loads(json.dumps(fingerprint or {}))}
        self.mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
        self.rollout_mesh = rollout_mesh if rollout_mesh is not None else self.mesh
        for m in {self.mesh, self.rollout_mesh}:
            prompt_sharding(m, cfg.rollout.num_prompts)  # the prompts must split over each mesh
        self.optimizer = optimizer or make_optimizer(cfg.optimizer, cfg.optimizer_updates())
        self.graphdef, params = nnx.split(model)
        self.model_config = model.config
        self.param_shardings = sharding.param_shardings(params, self.mesh)
        self.critic_optimizer = make_optimizers(cfg)[1]
        # Every process built the same params from the same seed; each places the shards it holds, and the
        # state (adapters, optimizer moments, critic, reference) is made where it is laid out.
        abstract, _ = abstract_train_state(params, cfg, self.mesh, optimizer=self.optimizer,
                                           critic_optimizer=self.critic_optimizer)
        state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
        reference_shardings = self.param_shardings if cfg.loss.beta and not cfg.lora.enabled else None
        init = jax.jit(functools.partial(init_train_state, cfg=cfg, optimizer=self.optimizer,
                                         critic_optimizer=self.critic_optimizer),
                       out_shardings=(state_shardings, reference_shardings))
        self.state, self.ref_params = init(sharding.place(params, self.param_shardings),
                                           key=jax.random.split(jax.random.key(cfg.seed))[1])
        self.step, self.data_position, self.key = 0, 0, jax.random.key(cfg.seed)
        self.last_rollout: rollout_lib.Rollout | None = None
        if cfg.rollout.pipeline == "one_step_off" and jax.process_count() > 1:
            # The sampler's and the train step's collectives would run in two threads, in an order that may
            # differ between processes.
            raise ValueError("config.rollout.pipeline='one_step_off' runs in a single process; a "
                             f"{jax.process_count()}-process run needs config.rollout.pipeline='sync'.")
        self._next_rollout: concurrent.futures.Future | None = None  # one_step_off: being sampled
        self._rollout_thread = (concurrent.futures.ThreadPoolExecutor(1, "grpo_jax-rollout")
                                if cfg.rollout.pipeline == "one_step_off" else None)
        # The batch is laid out where it is made, rows over the data axes; the train step takes it as it is.
        batch_sharding = sharding.rows_sharding(self.mesh, cfg.rollout.num_prompts)
        minibatch_sharding = sharding.rows_sharding(
            self.mesh, cfg.rollout.num_prompts // cfg.updates.num_minibatches)
        options = cfg.step_options()
        self._policy_params = jax.jit(functools.partial(update_lib.policy_params, options=options),
                                      out_shardings=self.param_shardings)  # (params, base) -> merged
        self.prepare = jax.jit(functools.partial(update_lib.prepare_batch, graphdef=self.graphdef,
                                                 options=options), out_shardings=batch_sharding)
        self.minibatch = jax.jit(functools.partial(update_lib.minibatch, options=options),
                                 out_shardings=minibatch_sharding)
        self.train_step = jax.jit(
            functools.partial(update_lib.train_step, graphdef=self.graphdef, optimizer=self.optimizer,
                              loss_fn=loss_fn or cfg.default_loss(), options=options,
                              critic_optimizer=self.critic_optimizer),
            in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
            donate_argnums=0)

    # -- stages -----------------------------------------------------------------------------------------

    def examples_at(self, position: int, count: int) -> list[dict]:
        """`count` dataset examples from `position` on (cycling). The run's position (`data_position`) is part
        of the checkpoint; an iteration moves it past the prompts its rollout sampled."""
        return [self.dataset[(position + i) % len(self.dataset)] for i in range(count)]

    def policy(self, mesh: Mesh | None = None) -> Transformer:
        """The current policy, laid out on `mesh` (default: the training mesh); under LoRA the base with the
        adapters merged in (once per call: the sampler runs on the weights the train step uses)."""
        s = self.state
        params = s.params if s.base is None else self._policy_params(s.params, s.base)
        if mesh is not None and mesh is not self.mesh:
            params = jax.device_put(params, sharding.param_shardings(params, mesh))
        return nnx.merge(self.graphdef, params)

    def collect(self, key: jax.Array, policy: Transformer | None = None, *,
                position: int | None = None) -> rollout_lib.Rollout:
        """Stage 1: a scored rollout from `policy` (default: the current one) on the rollout mesh, of the
        examples at `position` (default: the run's `data_position`, which this does not move)."""
        policy = self.policy(self.rollout_mesh) if policy is None else policy
        position = self.data_position if position is None else position
        examples = self.examples_at(position, rollout_lib.rollout_examples(self.cfg.rollout))
        return rollout_lib.collect(policy, examples, key, self.cfg.sampling, self.cfg.rollout,
                                   self.reward_fn, mesh=self.rollout_mesh, episodes=self.episodes,
                                   env=self.cfg.env)

    def sample_key(self, step: int) -> tuple[jax.Array, jax.Array]:
        """(sampling key, shuffle key) of iteration `step`: they derive from (seed, step), so a resumed run
        draws exactly the keys the straight run drew."""
        return _iteration_keys(self.key, step)

    def _start_next_rollout(self) -> None:
        """one_step_off: sample iteration step+1's rollout in the rollout thread from a copy of the current
        params (the train step donates the originals), while this iteration's update runs."""
        model = self.policy(self.rollout_mesh)
        graphdef, params = nnx.split(model)
        params = jax.block_until_ready(jax.tree.map(lambda x: x.copy(), params))
        key = self.sample_key(self.step + 1)[0]
        self._next_rollout = self._rollout_thread.submit(self.collect, key, nnx.merge(graphdef, params),
                                                         position=self.data_position)

    def batch(self, rollout: rollout_lib.Rollout) -> dict[str, jax.Array]:
        """Stage 2: the rollout's device arrays on the training mesh with its rewards, prepared to update."""
        s = rollout.sample
        arrays = dict(prompt_tokens=s.prompt_tokens, prompt_mask=s.prompt_mask, completion_tokens=s.tokens,
                      completion_mask=s.mask, sample_logprobs=s.logprobs, truncated=s.truncated)
        if s.sequence_mask is not None:  # multi-turn: the observations are read, not trained on
            arrays["sequence_mask"] = s.sequence_mask
            # An episode's static width holds every turn at its longest; train on the width the longest
            # episode of this batch needs (in steps of EPISODE_WIDTH_STEP tokens: a few compilations).
            width = episode_width(sharding.to_host(s.sequence_mask))
            for name in ("completion_tokens", "completion_mask", "sample_logprobs", "sequence_mask"):
                arrays[name] = arrays[name][:, :width]
        arrays = {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.ndim)) for k, v in arrays.items()}
        arrays["rewards"] = sharding.put_global(rollout.rewards, sharding.batch_sharding(self.mesh, 1))
        return self.prepare(self.state, self.ref_params, arrays)

    def update(self, batch: dict[str, jax.Array], key: jax.Array) -> list[dict[str, jax.Array]]:
        """Stage 3: mu epochs x num_minibatches optimizer steps; the metrics stay on the device."""
        u, metrics = self.cfg.updates, []
        for index in range(u.mu * u.num_minibatches):
            part = batch if u.num_minibatches == 1 else self.minibatch(batch, key, device_index(index))
            self.state, step_metrics = self.train_step(self.state, part)
            metrics.append(step_metrics)
        return metrics

    def iteration(self, prefetch: bool = True) -> dict[str, float]:
        """One iteration of the four stages; returns its metrics. Under the one_step_off pipeline its rollout
        is the one sampled during the previous iteration (if that one prefetched), and with `prefetch` the
        next iteration's starts before this update."""
        begin = time.perf_counter()
        sample_key, shuffle_key = self.sample_key(self.step)
        staleness = 0.0
        if self._next_rollout is not None:
            rollout, self._next_rollout, staleness = self._next_rollout.result(), None, 1.0
        else:
            rollout = self.collect(sample_key)
        self.data_position += rollout.prompts_sampled
        self.last_rollout = rollout
        time_waited = time.perf_counter() - begin
        if self._rollout_thread is not None and prefetch:
            self._start_next_rollout()
        start = time.perf_counter()
        batch = self.batch(rollout)
        time_prepare = None
        if self.time_stages:  # else the update is queued behind the preparation, with no wait between them
            jax.block_until_ready(batch)
            time_prepare, start = time.perf_counter() - start, time.perf_counter()
        update_metrics = jax.device_get(self.update(batch, shuffle_key))
        time_update = time.perf_counter() - start
        self.step += 1
        every = self.cfg.updates.ref_update_every
        if every and self.cfg.loss.beta and self.step % every == 0:
            self.ref_params = jax.tree.map(lambda x: x.copy(), self.state.params)
        metrics = self._metrics(rollout, update_metrics, time_prepare, time_update)
        metrics.update(rollout_staleness=staleness, time_iteration=time.perf_counter() - begin)
        if self._rollout_thread is not None:  # the time this iteration waited for its rollout
            metrics["time_rollout_wait"] = time_waited
        return metrics

    def drain(self) -> None:
        """Wait for a rollout being sampled ahead and drop it: the trainer is then as if it had not
        prefetched (the next iteration samples its own rollout, of the same examples)."""
        if self._next_rollout is not None:
            future, self._next_rollout = self._next_rollout, None
            future.result()

    def _metrics(self, rollout, update_metrics, time_prepare, time_update) -> dict[str, float]:
        metrics = {"step": self.step, **rollout_lib.rollout_metrics(rollout, self.cfg.sampling.group_size)}
        for name in update_metrics[0]:
            values = [float(m[name]) for m in update_metrics]
            metrics[name] = values[-1] if name == "skipped_updates" else float(np.mean(values))
        # The mismatch is the first update's, measured before any parameter moved.
        for name in ("rollout_kl", "rollout_logprob_diff_max"):
            metrics[name] = float(update_metrics[0][name])
        # Per-epoch clipping: the first epoch has ratio 1 when mu == 1; later epochs show the policy moving.
        metrics["clip_fraction_last_epoch"] = float(np.mean(
            [float(m["clip_fraction"]) for m in update_metrics[-self.cfg.updates.num_minibatches:]]))
        metrics["time_update"] = time_update
        if time_prepare is not None:
            metrics["time_reference"] = time_prepare
        seconds = sum(metrics.get(k, 0.0) for k in ("time_sampling", "time_rewards", "time_reference",
                                                     "time_update"))
        metrics["tokens_per_second"] = float(rollout.mask.sum()) / max(seconds, 1e-9)
        return metrics

    def state_bytes(self) -> dict[str, int]:
        """Bytes held between iterations: params, optimizer state, critic (+ its optimizer state) and
        reference params."""
        return {**{k: tree_bytes(v) for k, v in self.state._asdict().items()},
                "ref_params": tree_bytes(self.ref_params)}

    # -- checkpoints --------------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """The arrays a checkpoint holds: params (under LoRA the adapters alone: the frozen base is the
        model the Trainer was built from), optimizer state, PRNG key, critic, reference."""
        s = self.state
        state = {"params": s.params, "opt_state": s.opt_state, "rng": self.key}
        if s.critic is not None:
            state.update(critic=s.critic, critic_opt_state=s.critic_opt_state)
        if self.ref_params is not None:
            state["ref_params"] = self.ref_params
        return state

    def save(self, checkpointer: Checkpointer) -> None:
        """Save the checkpoint state with the step, data position, config and fingerprint."""
        metadata = {"step": self.step, "data_position": self.data_position, "config": _record(self.cfg),
                    "fingerprint": self.fingerprint}
        checkpointer.save(self.step, self.checkpoint_state(), metadata, force=True)

    def restore(self, checkpointer: Checkpointer) -> bool:
        """Resume from the latest readable checkpoint, if any; False when there is none. A checkpoint of
        another run (config, model, data or fingerprint changed) raises ValueError naming every change."""
        latest = checkpointer.latest_step()
        if latest is None:
            return False
        try:  # compare the run first: a changed config would otherwise surface as mismatching arrays
            saved = checkpointer.metadata(latest)
        except Exception:  # noqa: BLE001 - unreadable: restore() falls back past it, then the check runs
            saved = None
        if saved is not None:
            check_same_run(saved, self.cfg, self.fingerprint, checkpointer.directory)
        state, metadata, _ = checkpointer.restore(self.checkpoint_state())
        check_same_run(metadata, self.cfg, self.fingerprint, checkpointer.directory)
        self.state = TrainState(state["params"], state["opt_state"], state.get("critic"),
                                state.get("critic_opt_state"), self.state.base)
        # Back to an uncommitted host-made key, like a fresh run's, so it can meet arrays on any mesh.
        self.key = jax.random.wrap_key_data(sharding.to_host(jax.random.key_data(state["rng"])))
        self.ref_params = state.get("ref_params")
        self.step, self.data_position = metadata["step"], metadata["data_position"]
        return True


@jax.jit
def _split_step_key(key: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.split(jax.random.fold_in(key, step))


def _iteration_keys(key: jax.Array, step: int) -> jax.Array:
    return _split_step_key(key, device_index(step))


EPISODE_WIDTH_STEP = 32


def episode_width(sequence_mask: np.ndarray) -> int:
    """The completion width a multi-turn batch is trained at: its longest episode rounded up to a multiple of
    EPISODE_WIDTH_STEP, at most the static width. The tokens cut are padding in every row; the loss, its
    normalisation (Dr. GRPO's L is the static width) and the gradient are those of the whole width."""
    longest = int(sequence_mask.sum(axis=1).max()) if sequence_mask.size else 0
    step = EPISODE_WIDTH_STEP
    return min(sequence_mask.shape[1], max(step, -(-longest // step) * step))


class _Absent:
    """A path one side does not have."""

    def __eq__(self, other):
        return isinstance(other, _Absent)

    def __repr__(self):
        return "(absent)"


def _record(cfg: GRPOConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def check_same_run(metadata: dict, cfg: GRPOConfig, fingerprint: dict, directory: str | pathlib.Path, *,
                   partial: bool = False) -> None:
    """Raise ValueError naming every config path whose value differs from the checkpoint's `metadata`
    (config.num_steps and model.remat may change). With `partial`, only the paths of `fingerprint` and cfg
    are compared (a check before the model and data are loaded)."""
    saved = {**flatten(metadata["config"]), **metadata.get("fingerprint", {})}
    current = {**flatten(_record(cfg)), **json.loads(json.dumps(fingerprint))}
    absent = _Absent()
    paths = sorted(current if partial else set(saved) | set(current))
    changed = [f"{k}: {saved.get(k, absent)!r} -> {current.get(k, absent)!r}" for k in paths
               if k not in _MAY_CHANGE_ON_RESUME and saved.get(k, absent) != current.get(k, absent)]
    if changed:
        raise ValueError(f"{directory} holds a checkpoint of another run: {'; '.join(changed)}. Use a new "
                         "--workdir for the new run, or the original settings to resume this one (only "
                         "config.num_steps may change on resume).")


def train(trainer: Trainer, workdir: str | pathlib.Path, num_steps: int, *, checkpoint_every: int = 10,
          log_every: int = 1, sample_every: int = 0, decode: Callable[[Sequence[int]], str] | None = None,
          print_fn: Callable[[str], object] = print, loggers: Sequence[str] = ("tensorboard",),
          run_name: str | None = None, run_config: dict | None = None,
          evaluate: Callable[[], Mapping[str, float]] | None = None, eval_every: int = 0,
          ) -> list[dict[str, float]]:
    """Run `trainer` to `num_steps`, resuming from `workdir`'s latest checkpoint: running the same command
    again after a crash continues where the last checkpoint left off. Writes `workdir/checkpoints/`,
    `workdir/metrics.jsonl` and, per `loggers` ("tensorboard", "wandb"), TensorBoard events and a Weights &
    Biases run named `run_name` with `run_config` (from process 0); with `sample_every`, also a few
    completions every that many steps (and at the first) to `workdir/samples.jsonl` and the console,
    decoded by `decode` (default: the dataset's tokenizer). With `eval_every`, `evaluate()` (e.g. the
    held-out accuracy of `trainer.policy()`) runs after every that many steps and its metrics join that
    step's. A fresh run saves its starting point as step 0. Returns this call's step metrics."""
    if eval_every and evaluate is None:
        raise ValueError("train(eval_every=...) needs evaluate=, a function returning {metric: value}.")
    workdir = pathlib.Path(workdir)
    if sample_every and decode is None:
        tokenizer = getattr(trainer.dataset, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("train(sample_every=...) needs decode= (the dataset has no .tokenizer).")
        decode = tokenizer.decode
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=2)
    if trainer.restore(checkpointer):
        print_fn(f"resumed from {workdir / 'checkpoints'} at step {trainer.step}")
    elif trainer.step == 0:
        # The starting point is step 0: a crash before the first periodic save resumes from it, and the
        # run's identity is on disk from the start.
        trainer.save(checkpointer)
    writer = MetricsWriter(workdir, total_steps=num_steps, log_every=log_every, print_fn=print_fn,
                           loggers=tuple(loggers), run_name=run_name,
                           config=run_config) if jax.process_index() == 0 else None
    history = []
    try:
        while trainer.step < num_steps:
            if not history:
                print_fn(f"step {trainer.step + 1}: compiling the sampler and the train step (once per "
                         "process; cached on disk when JAX's compilation cache is on) ...")
                start = time.perf_counter()
            # Nothing is sampled ahead of a step that saves: the checkpoint then holds all the run's state.
            done = trainer.step + 1
            history.append(trainer.iteration(prefetch=done % checkpoint_every != 0 and done < num_steps))
            if eval_every and trainer.step % eval_every == 0:
                history[-1].update(evaluate())
            if len(history) == 1:
                print_fn(f"step {trainer.step}: first step took {time.perf_counter() - start:.1f} s, "
                         "compilation included")
            if writer is not None:
                writer.write(trainer.step, history[-1])
                if sample_every and (trainer.step % sample_every == 0 or trainer.step == 1):
                    records = rollout_lib.sample_records(trainer.last_rollout, trainer.step, decode)
                    writer.write_samples(records)
            if trainer.step % checkpoint_every == 0 or trainer.step == num_steps:
                trainer.save(checkpointer)
    finally:
        # After a failure the failure is what is reported, not the rollout sampled ahead.
        with contextlib.suppress(Exception):
            trainer.drain()
        if writer is not None:
            writer.close()
        checkpointer.close()
    return history
