"""The notebooks run top to bottom (code cells, shell lines skipped) and show what they claim."""

import contextlib
import io
import json
import pathlib
import re

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "colab"


def run_notebook(path: pathlib.Path) -> tuple[dict, str]:
    cells = json.loads(path.read_text())["cells"]
    code = "\n".join(
        line for cell in cells if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("!", "%")))
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(path), "exec"), namespace)  # our own notebook, not model output
    return namespace, out.getvalue()


def test_grpo_core_notebook_learns_the_bandit():
    namespace, printed = run_notebook(NOTEBOOKS / "grpo_core.ipynb")
    history = namespace["history"]
    assert sum(history[:5]) / 5 < 0.3
    assert sum(history[-5:]) / 5 > 0.8
    assert namespace["accuracy"] == 1.0
    assert re.search(r"greedy accuracy over all prompts: 100%", printed)
