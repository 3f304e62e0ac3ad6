"""Whole runs in subprocesses: exact resume after SIGKILL, and a two-process jax.distributed run."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from grpo_jax.metrics import read_jsonl

SCRIPT = Path(__file__).parent / "scripts" / "toy_run.py"
TIMING_KEYS = ("time", "time_sampling", "time_rewards", "time_reference", "time_update", "tokens_per_second",
               "time_iteration", "time_rollout_wait")


def command(workdir, steps, *extra):
    return [sys.executable, str(SCRIPT), str(workdir), str(steps), *extra]


def environment(cache=None):
    """The test's environment for a run, with the script's own device count; with `cache`, JAX's persistent
    compilation cache there (the runs of one test compile the same programs)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def run(workdir, steps, *extra, cache=None):
    done = subprocess.run(command(workdir, steps, *extra), env=environment(cache), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


VARIANTS = {"ppo": ("--algo", "ppo"), "lora": ("--lora_rank", "4"),
            # steps 3 and 5 sample the next rollout during their update; steps 2, 4, 6 save
            "one_step_off": ("--pipeline", "one_step_off", "--checkpoint_every", "2"),
            # 3-turn episodes of a toy environment: the kill lands in a rollout of episodes
            "multi_turn": ("--multi_turn",)}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))  # GRPO: the main command's kill trials below
def test_resume_after_sigkill_is_exact(tmp_path, variant):
    steps = 6 if variant == "one_step_off" else 4
    options = VARIANTS[variant]
    cache = tmp_path / "compilation_cache"
    run(tmp_path / "straight", steps, *options, cache=cache)
    # Same command, killed once step 2's checkpoint exists, then run again to the end.
    resumed = tmp_path / "resumed"
    process = subprocess.Popen(command(resumed, steps, *options), env=environment(cache),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (resumed / "checkpoints" / "2").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (resumed / "checkpoints" / "2").is_dir()
    assert not (resumed / "params_0.npz").exists()  # it really died before finishing
    output = run(resumed, steps, *options, cache=cache)
    assert "resumed from" in output
    straight_params = np.load(tmp_path / "straight" / "params_0.npz")
    resumed_params = np.load(resumed / "params_0.npz")
    assert sorted(straight_params) == sorted(resumed_params)
    assert any(name.startswith("['critic']") for name in straight_params) == (variant == "ppo")
    assert any(name.endswith("['a']") for name in straight_params) == (variant == "lora")  # adapters
    for name in straight_params:
        np.testing.assert_array_equal(straight_params[name], resumed_params[name], err_msg=name)
    straight_metrics = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    resumed_metrics = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in resumed_metrics] == list(range(1, steps + 1))
    assert comparable(straight_metrics) == comparable(resumed_metrics)
    if variant == "multi_turn":  # episodes of more than one turn were trained on
        assert max(r["reward/turns"] for r in straight_metrics) > 1
    staleness = [r["rollout_staleness"] for r in straight_metrics]
    assert staleness == ([0, 1, 0, 1, 0, 1] if variant == "one_step_off" else [0] * steps)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree(tmp_path):
    # Training FSDP-sharded over both processes' devices, sampling data-parallel with whole params. A larger
    # Adam eps keeps the first update a continuous function of the gradient (see test_trainer's sharded
    # test), so the comparison with one process tests the computation, not sign flips of ~0 gradients.
    layout = ("--mesh=1,-1,1", "--rollout_mesh=-1,1,1", "--adam_eps=1e-3")
    port = free_port()
    processes = [
        subprocess.Popen(command(tmp_path, 2, "--no_checkpoints", "--devices", "4", "--num_processes", "2",
                                 "--process_id", str(i), "--port", str(port), *layout),
                         env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    for out, _ in outputs:
        assert "step 2:" in out
    params = [np.load(tmp_path / f"params_{i}.npz") for i in range(2)]
    single = tmp_path / "single"
    run(single, 2, "--no_checkpoints", *layout)  # the same run on one process with 8 devices
    reference = np.load(single / "params_0.npz")
    for name in params[0]:
        np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)
        np.testing.assert_allclose(params[0][name], reference[name], atol=1e-4, err_msg=name)


TRAIN = Path(__file__).resolve().parents[1] / "experiments" / "train_grpo.py"
CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "arithmetic_tiny.py"
# The default experiment, scaled down: a 20-step warm start, 6 GRPO steps with a checkpoint every 2.
SMALL = ("--config.warm_start.steps=20", "--config.warm_start.threshold=0",
         "--config.warm_start.eval_every=10", "--config.num_steps=6", "--config.checkpoint_every=2",
         "--config.eval_examples=16",
         "--config.eval_batch_prompts=16", "--config.rollout.num_prompts=8", "--config.sampling.group_size=4",
         "--config.task_args.size=400", "--config.sample_every=0", "--config.updates.grad_accum_steps=1")


def main_command(workdir, cache):
    return [sys.executable, str(TRAIN), f"--config={CONFIG}", f"--workdir={workdir}", *SMALL,
            f"--compilation_cache={cache}"]


def main_environment():
    env = environment()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def saving(checkpoints: Path, step: int) -> bool:
    """A save of `step` is under way: Orbax writes it to a temporary directory and renames it on commit."""
    return checkpoints.is_dir() and any(p.name.startswith(f"{step}.orbax-checkpoint-tmp")
                                        for p in checkpoints.iterdir())


def final_state(workdir: Path) -> dict:
    """Every array of the run's last checkpoint, by path, and the JSON outputs."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "6" / "state")
    arrays = {jax_path: np.asarray(leaf) for jax_path, leaf in _flat(tree)}
    names = ("accuracy.json", "accuracy_at_grpo_start.json")
    outputs = {name: (workdir / name).read_text() for name in names}
    return {"arrays": arrays, "outputs": outputs,
            "metrics": comparable(read_jsonl(workdir / "metrics.jsonl"))}


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}/{key}")
    else:
        yield prefix, tree


@pytest.mark.slow
def test_the_main_command_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path):
    """kill -9 during the first save after the warm start, during a later save, and at a random step of
    training (seeded draws); each time the same command, run again, ends with the uninterrupted run's
    params, optimizer state, metrics and held-out accuracies, the warm start included. The reruns share
    the straight run's compilation cache and compile nothing it did not."""
    straight, cache = tmp_path / "straight", tmp_path / "compilation_cache"
    done = subprocess.run(main_command(straight, cache), env=main_environment(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = final_state(straight)
    assert len(expected["metrics"]) == 6 and expected["arrays"]
    compiled = sorted(p.name for p in cache.iterdir())
    assert len(compiled) > 5
    rng = np.random.default_rng(0)
    trials = [("first save after the warm start", lambda ck, lines: saving(ck, 0), True),
              ("a later save", lambda ck, lines: any(saving(ck, s) for s in (2, 4, 6)), True)]
    step = int(rng.integers(1, 6))
    trials.append((f"training, after step {step}", lambda ck, lines: lines >= step, False))
    for name, when, mid_save in trials:
        workdir = tmp_path / name.replace(" ", "_").replace(",", "")
        process = subprocess.Popen(main_command(workdir, cache), env=main_environment(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, metrics = time.time() + 600, workdir / "metrics.jsonl"
        while process.poll() is None and time.time() < deadline:
            lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if when(workdir / "checkpoints", lines):
                break
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (workdir / "accuracy.json").exists(), name  # it died before the end
        if mid_save:  # the save it interrupted is still a temporary directory
            assert any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").iterdir()), name
        done = subprocess.run(main_command(workdir, cache), env=main_environment(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        assert "first step took" in done.stdout
        resumed = final_state(workdir)
        assert resumed["metrics"] == expected["metrics"], name
        assert resumed["outputs"] == expected["outputs"], name
        assert sorted(resumed["arrays"]) == sorted(expected["arrays"]), name
        for path, value in expected["arrays"].items():
            np.testing.assert_array_equal(resumed["arrays"][path], value, err_msg=f"{name}: {path}")
    assert sorted(p.name for p in cache.iterdir()) == compiled  # every program came from the cache
