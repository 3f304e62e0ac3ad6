r"""The f32 matmul roofline alone: GFLOP/s of timed 2048 x 2048 matmuls, e.g. under `taskset`.

  python experiments/benchmarks/roofline.py --calls=50

experiments/robustness.py runs it before and after each run, in a fresh process under the run's settings.
"""

from __future__ import annotations

import jax
from absl import app, flags

from grpo_jax.profiling import Roofline

_CALLS = flags.DEFINE_integer("calls", 50, "Timed calls of the 2048 x 2048 matmul.")


def main(argv) -> None:
    del argv
    roofline = Roofline()
    roofline.measure(_CALLS.value)
    print(f"{jax.default_backend()}: {roofline}")


if __name__ == "__main__":
    app.run(main)
