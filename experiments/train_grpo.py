r"""Train a policy with GRPO: an ml_collections config file plus a workdir.

  python experiments/train_grpo.py --config=experiments/configs/arithmetic_tiny.py --workdir=/tmp/grpo
  python experiments/train_grpo.py --config=... --workdir=... --config.loss.beta=0.04   # any field

Running the same command again resumes from the workdir's latest checkpoint. The run itself is library code,
`grpo_jax.experiment.run` (its docstring lists the files written to the workdir).
Multi-host: pass --coordinator_address, --num_processes and --process_id (TPU pods need none of
them, only --distributed).
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax import experiment, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.", required=True)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Start jax.distributed (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/grpo_jax/jax", "JAX's persistent compilation cache: a rerun, a resume or "
    "another run of the same shapes loads what an earlier one compiled instead of compiling it again; "
    "\"\" turns it off.")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", None, "Stop after this many GRPO steps: the same steps as the full run's (the schedules "
    "still span config.num_steps); the same command without it resumes and finishes the run.")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # keep the console to the progress line (Orbax logs at INFO)
    if _DISTRIBUTED.value or _COORDINATOR.value:
        sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _CACHE.value:
        experiment.use_compilation_cache(pathlib.Path(_CACHE.value).expanduser())
    experiment.run(_CONFIG.value, pathlib.Path(_WORKDIR.value), stop_after=_STOP_AFTER.value)


if __name__ == "__main__":
    app.run(main)
