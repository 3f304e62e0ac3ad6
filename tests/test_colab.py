"""The notebooks in colab/ run top to bottom in a real Jupyter kernel and show what they claim.

Each notebook is executed headless with nbclient, in a kernel started on this very interpreter (a kernelspec
written to a temporary directory, so neither a user's nor the system's "python3" kernelspec can point it at
another Python), with JAX on one CPU device. A failing cell, its own assert cells included, fails the test
with the cell's traceback; the test then checks the summary line the notebook prints.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import time

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from traitlets import default

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "colab"
KERNEL_NAME = "grpo_jax_tests"


@pytest.fixture(scope="module")
def kernel_manager_class(tmp_path_factory):
    """A kernel manager that knows one kernelspec: `sys.executable -m ipykernel_launcher`."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL_NAME, overrides={"display_name": "grpo_jax tests"})

    class ThisInterpreterKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return KernelSpecManager(kernel_dirs=[str(kernels)])

    return ThisInterpreterKernelManager


def kernel_env() -> dict[str, str]:
    """The test's environment with JAX on one CPU device (conftest's 8 host devices would only slow the
    notebooks down) and matplotlib left to the kernel's inline backend."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.pop("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.pop("MPLBACKEND", None)
    return env


def execute(name: str, kernel_manager_class) -> tuple[nbformat.NotebookNode, str]:
    """Run colab/`name` in the colab directory; returns the executed notebook and its printed text."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name=KERNEL_NAME,
                            kernel_manager_class=kernel_manager_class,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute(env=kernel_env())
    print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []) if output.output_type == "stream")
    return notebook, printed


def summary(printed: str) -> dict[str, str]:
    """The `SUMMARY key=value ...` line a notebook prints after its checks."""
    match = re.search(r"^SUMMARY (.*)$", printed, re.MULTILINE)
    assert match, f"no SUMMARY line in the notebook's output:\n{printed[-2000:]}"
    return dict(item.split("=", 1) for item in match.group(1).split())


@pytest.mark.slow
def test_quickstart_trains_with_grpo_and_changes_the_answers(kernel_manager_class):
    notebook, printed = execute("grpo_quickstart.ipynb", kernel_manager_class)
    assert "backend: cpu" in printed and "size tiny" in printed
    values = summary(printed)
    first, last = float(values["reward_first"]), float(values["reward_last"])
    before, after = float(values["accuracy_before"]), float(values["accuracy_after"])
    assert values["steps"] == "100"
    assert last > first + 0.1, values  # the notebook's own margin: +0.16 to +0.38 on seeds 0-4
    assert after > before, values
    assert int(values["changed"].split("/")[0]) >= 1, values
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert images, "the training curves were not plotted inline"
    tools = re.search(r"^SUMMARY_TOOLS (.*)$", printed, re.MULTILINE)  # section 10: the multi-turn API
    assert tools, printed[-2000:]
    tools = dict(item.split("=", 1) for item in tools.group(1).split())
    assert float(tools["turns"]) >= 1 and float(tools["rollout_kl"]) < 1e-5, tools


@pytest.mark.slow
def test_losses_notebook_compares_every_variant_on_one_batch(kernel_manager_class):
    _, printed = execute("losses_in_your_code.ipynb", kernel_manager_class)
    values = summary(printed)
    assert values["variants"] == values["distinct_losses"] == "9", values
    assert float(values["min_clip_fraction"]) > 0, values
    assert float(values["trained_reward_last"]) > float(values["trained_reward_first"]) + 0.3, values
    for variant in ("GRPO", "Dr. GRPO", "DAPO", "GSPO", "CISPO", "RLOO", "GRPO + KL k1", "GRPO + KL k2",
                    "GRPO + KL k3"):
        row = re.search(rf"^{re.escape(variant)} +(\S+) +(\S+) +(\S+) +\S+ +\S+ +\S+$", printed, re.MULTILINE)
        assert row, f"no table row for {variant}"
        loss, grad_norm, clip_fraction = (float(x) for x in row.groups())
        assert math.isfinite(loss) and math.isfinite(grad_norm) and grad_norm > 0, row.group(0)
        assert 0 <= clip_fraction <= 1, row.group(0)
