"""The project's layout: the scripts under experiments/ are entry points that nothing imports. What they share
is library code in grpo_jax/ (e.g. `grpo_jax.experiment`, `grpo_jax.profiling`), so a test or a notebook
tests and uses the library, and a script reads top to bottom as its own main()."""

import ast
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
# Every name under experiments/ a Python import could resolve to: scripts, and folders (configs, ...).
SCRIPT_NAMES = ({p.stem for p in EXPERIMENTS.glob("*.py")}
                | {p.name for p in EXPERIMENTS.iterdir() if p.is_dir()})


def sources() -> list[tuple[str, str]]:
    """(name, Python source) of every module, test and notebook code cell of the project."""
    folders = ("grpo_jax", "experiments", "tests", "colab")
    found = [(str(p.relative_to(ROOT)), p.read_text()) for f in folders for p in (ROOT / f).rglob("*.py")]
    for notebook in (ROOT / "colab").glob("*.ipynb"):
        for i, cell in enumerate(json.loads(notebook.read_text())["cells"]):
            if cell["cell_type"] == "code":
                code = "".join(cell["source"])
                lines = [line for line in code.splitlines() if not line.lstrip().startswith(("!", "%"))]
                found.append((f"{notebook.relative_to(ROOT)} cell {i}", "\n".join(lines)))
    return found


def imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def path_edits(tree: ast.AST) -> list[str]:
    """The `sys.path` insertions and appends that name experiments/ (how a script gets imported)."""
    edits = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append", "extend")
                and ast.unparse(node.func.value) == "sys.path" and "experiments" in ast.unparse(node)):
            edits.append(ast.unparse(node))
    return edits


def test_the_script_names_are_found():
    assert {"train_grpo", "evaluate", "export", "compare_grpo_ppo", "robustness", "configs"} <= SCRIPT_NAMES


@pytest.mark.parametrize("name, source", sources(), ids=lambda value: value if len(value) < 80 else "")
def test_no_module_or_test_imports_a_script(name, source):
    tree = ast.parse(source)
    assert not imported_names(tree) & SCRIPT_NAMES, f"{name} imports {imported_names(tree) & SCRIPT_NAMES}"
    assert not path_edits(tree), f"{name} puts experiments/ on sys.path: {path_edits(tree)}"


def test_the_checks_catch_an_import_of_a_script():
    """The two checks above fail on the forms a script used to be imported by."""
    for source in ("import train_grpo", "from configs import arithmetic_tiny", "import benchmarks.memory",
                   "from export import export"):
        assert imported_names(ast.parse(source)) & SCRIPT_NAMES, source
    assert path_edits(ast.parse('sys.path.insert(0, str(ROOT / "experiments"))'))
    assert not imported_names(ast.parse("from grpo_jax import experiment\nimport json")) & SCRIPT_NAMES


def test_train_grpo_is_one_main():
    """experiments/train_grpo.py is its flags and one function, main(), that hands the run to the library."""
    tree = ast.parse((EXPERIMENTS / "train_grpo.py").read_text())
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)]
    assert functions == ["main"]
