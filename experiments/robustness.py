r"""Does the default experiment learn on every seed and every machine? Run it over seeds x numerics modes.

  python experiments/robustness.py --workdir=/tmp/grpo_robustness
  python experiments/robustness.py --workdir=/tmp/r --seeds=0,1 --modes=one_core --set=config.num_steps=100
  python experiments/robustness.py --workdir=/tmp/r --stop_after=100   # the first 100 GRPO steps of each

Each (seed, mode) is the README's main command (`experiments/train_grpo.py` with the config and
`--config.seed=<seed>`) run as its own process in a fresh `<workdir>/seed<S>_<mode>`. The modes give the
same seed other floating-point trajectories, as another machine would:

  all_cores  every core of this machine (XLA partitions its work over all of them)
  one_core   `taskset -c <core>`: one core, another thread partitioning and half the compute
  perturbed  all cores, every initial parameter moved by N(0, 1e-6) noise (--config.init_perturbation)
  avx2       all cores, XLA's CPU code generated for AVX2 only (XLA_FLAGS=--xla_cpu_max_isa=AVX2)

Prints (and writes to `<workdir>/robustness.md` and `.json`) one row per run: warm start steps, time and
held-out accuracy, held-out greedy accuracy when GRPO starts and at the end, the lift, the wall time, the
CPU time (user + system of that process alone, which a virtual machine's stolen time does not inflate) and
the f32 matmul roofline (the mean of one measurement right before and one right after the run, under the
run's own settings, `experiments/benchmarks/roofline.py`: on a shared machine the speed drifts); then the
median and minimum of lift and wall time, the CPU model and each mode's roofline before and after all runs.

`--parallel=2` runs one_core jobs two at a time, each pinned to its own core (the other modes always run
alone, so their wall times are those of a machine doing nothing else).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = ("all_cores", "one_core", "perturbed", "avx2")

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs, the table and its JSON go.", required=True)
_CONFIG = flags.DEFINE_string("config", str(ROOT / "experiments" / "configs" / "arithmetic_tiny.py"),
                              "The experiment config file (the default experiment's by default).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (config.seed) to run.")
_MODES = flags.DEFINE_list("modes", ["all_cores", "one_core", "perturbed"], f"Numerics modes, of {MODES}.")
_SET = flags.DEFINE_multi_string("set", [], "Config overrides for every run, e.g. config.num_steps=100.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "one_core runs at a time, each on its own core.")
_PERTURBATION = flags.DEFINE_float("perturbation", 1e-6, "perturbed mode: std of the init perturbation.")
_ROOFLINE_CALLS = flags.DEFINE_integer("roofline_calls", 50, "Timed matmul calls per roofline measurement.")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", None, "Stop every run after this many GRPO steps (train_grpo.py --stop_after), e.g. to "
    "measure the spread of a shortened run.")


def mode_command(mode: str, core: int) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that put a process in `mode`."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    prefix = []
    if mode == "one_core":
        prefix = ["taskset", "-c", str(core)]
    elif mode == "avx2":
        env["XLA_FLAGS"] = "--xla_cpu_max_isa=AVX2"
    return prefix, env


def roofline(mode: str, core: int = 0) -> float:
    """Median GFLOP/s of a 2048 x 2048 f32 matmul in a fresh process under `mode`'s settings."""
    prefix, env = mode_command(mode, core)
    command = [*prefix, sys.executable, str(ROOT / "experiments" / "benchmarks" / "roofline.py"),
               f"--calls={_ROOFLINE_CALLS.value}"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return float(re.search(r"([\d.]+) GFLOP/s median", done.stdout).group(1))


def run_one(seed: int, mode: str, core: int, workdir: pathlib.Path) -> dict:
    rundir = workdir / f"seed{seed}_{mode}"
    shutil.rmtree(rundir, ignore_errors=True)  # a fresh run, never a resume
    prefix, env = mode_command(mode, core)
    overrides = [f"--{o.removeprefix('--')}" for o in _SET.value]
    if mode == "perturbed":
        overrides.append(f"--config.init_perturbation={_PERTURBATION.value}")
    if _STOP_AFTER.value is not None:
        overrides.append(f"--stop_after={_STOP_AFTER.value}")
    command = [*prefix, sys.executable, str(ROOT / "experiments" / "train_grpo.py"),
               f"--config={_CONFIG.value}", f"--workdir={rundir}", f"--config.seed={seed}", *overrides]
    rate = roofline(mode, core)  # before and after the run: a shared machine's speed drifts
    start = time.perf_counter()
    rundir.mkdir(parents=True)
    with open(rundir / "console.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # the CPU time of this run alone
    wall = time.perf_counter() - start
    rate = (rate + roofline(mode, core)) / 2  # and right after it
    row = dict(seed=seed, mode=mode, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
               returncode=os.waitstatus_to_exitcode(status), roofline=rate,
               peak_rss_mib=usage.ru_maxrss / 1024)  # Linux reports KiB
    if row["returncode"] == 0:
        accuracy = json.loads((rundir / "accuracy.json").read_text())
        warm_file = rundir / "warm_start.json"  # none when config.warm_start.steps=0
        warm = (json.loads(warm_file.read_text()) if warm_file.exists()
                else {"steps": 0, "seconds": 0.0, "accuracy": None})
        row.update(warm_steps=warm["steps"], warm_s=warm["seconds"], warm_accuracy=warm["accuracy"],
                   start=accuracy["start"], end=accuracy["end"], lift=accuracy["end"] - accuracy["start"],
                   examples=accuracy["examples"])
    print(format_row(row), flush=True)
    return row


def format_row(row: dict) -> str:
    if row["returncode"]:
        return f"| {row['seed']} | {row['mode']} | failed (exit {row['returncode']}, see its console.log) |"
    warm_accuracy = "-" if row["warm_accuracy"] is None else f"{row['warm_accuracy']:.1%}"
    return (f"| {row['seed']} | {row['mode']} | {row['warm_steps']} ({row['warm_s']:.0f} s) | "
            f"{warm_accuracy} | {row['start']:.1%} | {row['end']:.1%} | "
            f"{100 * row['lift']:+.1f} | {row['wall_s']:.0f} s | {row['cpu_s']:.0f} s | "
            f"{row['roofline']:.0f} | {row.get('peak_rss_mib', float('nan')):.0f} MiB |")


def cpu_model() -> str:
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv) -> None:
    del argv
    unknown = [m for m in _MODES.value if m not in MODES]
    if unknown:
        raise app.UsageError(f"--modes={','.join(_MODES.value)}: {unknown} unknown; choose from {MODES}.")
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in _SEEDS.value]
    modes = list(dict.fromkeys(_MODES.value))
    rooflines = {m: [roofline(m)] for m in modes}
    header = ("| seed | mode | warm start steps (time) | warm start acc. | acc. at GRPO start | acc. at end "
              "| lift (points) | wall | CPU time | roofline GFLOP/s | peak host memory |\n"
              + "| --- " * 11 + "|")
    print(header, flush=True)
    rows = []
    for mode in modes:
        workers = _PARALLEL.value if mode == "one_core" else 1
        with ThreadPoolExecutor(workers) as pool:  # job i runs on core i % workers
            rows += pool.map(run_one, seeds, [mode] * len(seeds), [i % workers for i in range(len(seeds))],
                             [workdir] * len(seeds))
    for m in modes:
        rooflines[m].append(roofline(m))
    done = [r for r in rows if r["returncode"] == 0]
    lifts = [100 * r["lift"] for r in done]
    walls = [r["wall_s"] for r in done]
    summary = [f"{len(done)}/{len(rows)} runs finished"]
    if done:
        summary += [f"lift: median {statistics.median(lifts):+.1f} points, minimum {min(lifts):+.1f}",
                    f"wall: median {statistics.median(walls):.0f} s, maximum {max(walls):.0f} s"]
    measured = ", ".join(f"{m} {a:.0f} / {b:.0f}" for m, (a, b) in rooflines.items())
    machine = (f"{cpu_model()}, {os.cpu_count()} cores; f32 matmul roofline (2048^2, median GFLOP/s, "
               f"before / after the runs): {measured}")
    extra = f"; overrides: {' '.join(_SET.value)}" if _SET.value else ""
    text = "\n".join([f"robustness of {pathlib.Path(_CONFIG.value).name}{extra}", machine, "", header,
                      *map(format_row, rows), "", *summary])
    print("\n" + "\n".join(["", *summary, machine]))
    (workdir / "robustness.md").write_text(text + "\n")
    (workdir / "robustness.json").write_text(json.dumps(
        {"rows": rows, "rooflines": rooflines, "cpu": cpu_model(), "overrides": _SET.value}, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
