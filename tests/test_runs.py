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
TIMING_KEYS = ("time", "time_sampling", "time_rewards", "time_reference", "time_update", "tokens_per_second")


def command(workdir, steps, *extra):
    return [sys.executable, str(SCRIPT), str(workdir), str(steps), *extra]


def environment():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    return env


def run(workdir, steps, *extra):
    done = subprocess.run(command(workdir, steps, *extra), env=environment(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_after_sigkill_is_exact(tmp_path, algo):
    steps, options = 4, ("--algo", algo)
    run(tmp_path / "straight", steps, *options)
    # Same command, killed once step 2's checkpoint exists, then run again to the end.
    resumed = tmp_path / "resumed"
    process = subprocess.Popen(command(resumed, steps, *options), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (resumed / "checkpoints" / "2").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (resumed / "checkpoints" / "2").is_dir()
    assert not (resumed / "params_0.npz").exists()  # it really died before finishing
    output = run(resumed, steps, *options)
    assert "resumed from" in output
    straight_params = np.load(tmp_path / "straight" / "params_0.npz")
    resumed_params = np.load(resumed / "params_0.npz")
    assert sorted(straight_params) == sorted(resumed_params)
    assert any(name.startswith("['critic']") for name in straight_params) == (algo == "ppo")
    for name in straight_params:
        np.testing.assert_array_equal(straight_params[name], resumed_params[name], err_msg=name)
    straight_metrics = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    resumed_metrics = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in resumed_metrics] == list(range(1, steps + 1))
    assert comparable(straight_metrics) == comparable(resumed_metrics)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
