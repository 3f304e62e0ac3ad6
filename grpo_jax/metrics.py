"""Training metrics: a JSONL log, TensorBoard and Weights & Biases loggers, a progress line with ETA, plots.

`MetricsWriter.write(step, metrics)` always appends `{"step", "time", **metrics}` to `<workdir>/metrics.jsonl`
(the record of the run that `read_jsonl` and `plot_metrics` read) and sends the scalars to the loggers named
in `loggers` (`config.loggers` of the experiments):

  "tensorboard"  `<workdir>/tensorboard/events.out.tfevents.<time>.<host>[.<n>]`, written by tensorboardX
                 (`tensorboard --logdir <workdir>/tensorboard`). Events reach the disk within about a second
                 (tensorboardX writes them from a background thread); `close()` writes them all.
  "wandb"        a Weights & Biases run (`pip install wandb`) in project "grpo_jax", named `run_name`
                 (default: the workdir's name), with `config` as its config. The run id is kept in
                 `<workdir>/wandb_run_id`, so running the same command again continues the same run. The
                 environment is respected: WANDB_MODE=offline logs without network under `<workdir>/wandb`,
                 and WANDB_PROJECT, WANDB_DIR, WANDB_RUN_ID and WANDB_NAME win over the values above.

NaN and inf metrics are JSON null in the JSONL and NaN for the loggers; values beyond the float32 range are
inf in TensorBoard (the JSONL keeps them).

Resuming is running the same command again: the first `write(step)` of a process drops every JSONL line with
a step >= `step` (and a line cut short when the last run was killed), and starts a new TensorBoard event file
with `purge_step=step` (a `SessionLog.START` event at `step`), which makes TensorBoard drop the scalars of
steps >= `step` of the killed run the same way. W&B only accepts increasing steps: a resumed W&B run keeps
the killed run's values of the steps after the checkpoint and ignores the rewritten ones (with a warning).

Only call the writer from one process (e.g. `jax.process_index() == 0`): each writer owns its files.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import secrets
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVENT_FILE_PREFIX = "events.out.tfevents."
WANDB_PROJECT = "grpo_jax"
WANDB_ID_NAME = "wandb_run_id"  # <workdir>/wandb_run_id: the W&B run id a resumed run continues.
LOGGERS = ("tensorboard", "wandb")  # The valid names of MetricsWriter(loggers=...), i.e. config.loggers.

# (metric key, label) shown in the progress line when the key is present; nothing else is shown.
PROGRESS_KEYS = (
    ("reward_mean", "reward"),
    ("accuracy", "acc"),
    ("kl", "kl"),
    ("completion_length_mean", "len"),
    ("tokens_per_second", "tok/s"),
    ("loss", "loss"),
)
# The ETA uses the median of this many recent step durations: robust to one slow step (a checkpoint save).
_DURATION_WINDOW = 20
# tensorboardX writes events from a thread and flushes them to the file at most this often.
_TENSORBOARD_FLUSH_SECS = 1


# ----------------------------------------------------------------------------------------------------------
# JSONL.


def _jsonl_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each complete line; a last line cut short is dropped, a bad line elsewhere raises."""
    lines = path.read_text(encoding="utf-8").splitlines()
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError as error:
            if number == len(lines):  # Cut short by a process killed mid-write.
                break
            message = f"{path}:{number} is not valid JSON ({error}); fix or delete that line."
            raise ValueError(message) from error
    return parsed


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file such as `<workdir>/metrics.jsonl`; a last line cut short is ignored."""
    return [record for _, record in _jsonl_lines(Path(path))]


def _to_json_value(name: str, value: Any) -> int | float | None:
    """A Python int/float of a scalar metric (numpy, jax or Python); NaN and inf become None (JSON null)."""
    array = np.asarray(value)
    if array.ndim == 0 and array.dtype.kind in "biu":
        return int(array)
    not_scalar = ValueError(f"metrics[{name!r}] = {value!r} (shape {array.shape}, dtype {array.dtype}) is "
                            "not a real scalar; log a scalar such as its mean.")
    if array.ndim == 0 and array.dtype.kind in "fV":  # "V": ml_dtypes floats such as bfloat16.
        try:
            number = float(array.astype(np.float64))
        except (TypeError, ValueError) as error:
            raise not_scalar from error
        return number if math.isfinite(number) else None
    raise not_scalar


# ----------------------------------------------------------------------------------------------------------
# Progress line.


def format_duration(seconds: float) -> str:
    """Durations for humans: '41s', '10m41s', '2h03m', '3d04h'."""
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_number(value: float | None) -> str:
    if value is None:
        return "nan"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


class Progress:
    """Progress lines with speed and ETA: 'step 12/200 (6%) | 3.41 s/step | ETA 10m41s | reward 0.53'.

    `tick(step)` records when a step ended; the ETA is the median of the last `_DURATION_WINDOW` step
    durations (robust to one slow step, e.g. a checkpoint save) times the steps left. The first line shows
    no timing. `label` names the phase ("step", "warm start").
    """

    def __init__(self, total_steps: int, *, label: str = "step", clock: Callable[[], float] = time.time):
        self.total_steps, self.label, self._clock = total_steps, label, clock
        self._last: tuple[int, float] | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=_DURATION_WINDOW)

    def tick(self, step: int, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        if self._last is not None and step > self._last[0]:
            self._durations.append((now - self._last[1]) / (step - self._last[0]))
        self._last = (step, now)

    def line(self, step: int, values: Sequence[tuple[str, float | None]] = ()) -> str:
        parts = [f"{self.label} {step}/{self.total_steps} ({int(100 * step / self.total_steps)}%)"]
        if self._durations:
            seconds_per_step = statistics.median(self._durations)
            remaining = max(0, self.total_steps - step) * seconds_per_step
            parts += [f"{_format_number(seconds_per_step)} s/step", f"ETA {format_duration(remaining)}"]
        parts += [f"{label} {_format_number(value)}" for label, value in values]
        return " | ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Loggers: where the scalars of each step go besides the JSONL.


class _NanWarningFilter(logging.Filter):
    """Drops tensorboardX's warning about NaN/inf values: here they are logged on purpose (JSON null)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("NaN or Inf found in input tensor")


class _TensorBoardLogger:
    """Scalars as TensorBoard events written by `tensorboardX.SummaryWriter`.

    The event file is created by the first `log`, with `purge_step` = its step: TensorBoard then drops the
    scalars of steps >= that step read from earlier files (a killed run that is resumed). TensorBoard reads
    the files of a folder in name order, so a file started in the same second as another one gets the
    suffix `.<n>` (n = how many such files exist) and sorts after it.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.event_path: Path | None = None
        self._writer = None

    def _open(self, first_step: int) -> None:
        from tensorboardX import SummaryWriter

        x2num_logger = logging.getLogger("tensorboardX.x2num")
        if not any(isinstance(f, _NanWarningFilter) for f in x2num_logger.filters):
            x2num_logger.addFilter(_NanWarningFilter())
        self.directory.mkdir(parents=True, exist_ok=True)
        before = set(self.directory.iterdir())
        # tensorboardX names the file events.out.tfevents.<int(time.time())>.<host><filename_suffix>.
        base = f"{EVENT_FILE_PREFIX}{int(time.time())}.{socket.gethostname()}"
        same_second = sum(path.name.startswith(base) for path in before)
        self._writer = SummaryWriter(str(self.directory), purge_step=first_step,
                                     flush_secs=_TENSORBOARD_FLUSH_SECS,
                                     filename_suffix=f".{same_second}" if same_second else "")
        created = sorted(path for path in set(self.directory.iterdir()) - before
                         if path.name.startswith(EVENT_FILE_PREFIX))
        self.event_path = created[-1] if created else None

    def log(self, step: int, scalars: Mapping[str, float], wall_time: float) -> None:
        if self._writer is None:
            self._open(step)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step, walltime=wall_time)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _wandb_run_id(workdir: Path) -> str:
    """The W&B run id of `workdir`: read from `<workdir>/wandb_run_id`, or a new random one saved there.

    Random rather than derived from the path, so that a new run in a reused path (or the same path on
    another machine) does not continue an unrelated W&B run.
    """
    path = workdir / WANDB_ID_NAME
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(6)
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


class _WandbLogger:
    """Scalars of each step logged to a Weights & Biases run; `close()` finishes the run."""

    def __init__(self, workdir: Path, run_name: str, config: Any):
        try:
            import wandb
        except ImportError as error:
            raise ImportError("config.loggers includes 'wandb' but wandb is not installed: pip install wandb "
                              "(or drop 'wandb' from config.loggers).") from error
        if config is not None and hasattr(config, "to_dict"):  # An ml_collections.ConfigDict.
            config = config.to_dict()
        # Values the environment sets win; they are read here and passed explicitly, as wandb reads its
        # environment once per process.
        environ = os.environ
        self.run = wandb.init(project=environ.get("WANDB_PROJECT") or WANDB_PROJECT,
                              name=environ.get("WANDB_NAME") or run_name,
                              dir=environ.get("WANDB_DIR") or str(workdir),
                              id=environ.get("WANDB_RUN_ID") or _wandb_run_id(workdir),
                              config=config, resume="allow")

    def log(self, step: int, scalars: Mapping[str, float], wall_time: float) -> None:
        del wall_time  # W&B records its own.
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def _check_loggers(loggers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(loggers, str):
        raise ValueError(f"config.loggers={loggers!r} must be a tuple of names, e.g. ('{loggers}',) or "
                         f"('tensorboard', 'wandb'); valid names: {list(LOGGERS)}.")
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ValueError(f"config.loggers={tuple(loggers)!r} has unknown names {unknown}; valid names: "
                         f"{list(LOGGERS)} (the JSONL is always written; () writes it alone).")
    return tuple(dict.fromkeys(loggers))


# ----------------------------------------------------------------------------------------------------------
# The writer.


class MetricsWriter:
    """Writes metrics of a training run: `<workdir>/metrics.jsonl`, the `loggers`, a progress line.

    Usage:
        with MetricsWriter(workdir, total_steps=200, log_every=10, loggers=("tensorboard", "wandb"),
                           run_name="gsm8k-grpo", config=config) as writer:
            for step in range(start_step, 201):
                writer.write(step, {"reward_mean": 0.5, "kl": 0.002})

    Every `write` flushes the JSONL, so a killed process loses at most the line being written; the next
    process drops that line and every line with a step >= its first step (see the module docstring).

    Args:
      workdir: folder of the run; created if missing.
      total_steps: the step the run ends at, for the percentage and the ETA.
      log_every: print the progress line when `step % log_every == 0` and at `total_steps`.
      print_fn: where the progress line goes (e.g. `logging.info`).
      clock: seconds since the epoch; for the "time" field, the TensorBoard wall times and step durations.
      loggers: names from `LOGGERS` ("tensorboard", "wandb") of where the scalars go besides the JSONL.
        Unknown names raise ValueError; "wandb" starts the W&B run here (ImportError without wandb).
      run_name: the W&B run's name; default: the workdir's name.
      config: the W&B run's config (a mapping or an ml_collections.ConfigDict), e.g. the experiment config.
    """

    def __init__(self, workdir: str | Path, *, total_steps: int, log_every: int = 1,
                 print_fn: Callable[[str], object] = print, clock: Callable[[], float] = time.time,
                 loggers: Sequence[str] = ("tensorboard",), run_name: str | None = None,
                 config: Mapping[str, Any] | None = None):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be a positive int: the step the run ends at.")
        if log_every < 1:
            raise ValueError(f"log_every={log_every} must be a positive int (1 prints every step).")
        self.loggers = _check_loggers(loggers)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.workdir / JSONL_NAME
        self.run_name = run_name or self.workdir.resolve().name
        self.total_steps = total_steps
        self.log_every = log_every
        self._print = print_fn
        self._clock = clock
        self._jsonl = None  # Opened by the first write, once the step to resume from is known.
        self._last_step: int | None = None
        self._progress = Progress(total_steps, clock=clock)
        self._closed = False
        self._tensorboard = (_TensorBoardLogger(self.workdir / TENSORBOARD_DIR)
                             if "tensorboard" in self.loggers else None)
        self._wandb = _WandbLogger(self.workdir, self.run_name, config) if "wandb" in self.loggers else None

    @property
    def event_path(self) -> Path | None:
        """This writer's TensorBoard event file; None before the first write or without "tensorboard"."""
        return None if self._tensorboard is None else self._tensorboard.event_path

    @property
    def wandb_run(self) -> Any:
        """The `wandb.Run` of the "wandb" logger (None without it), e.g. for `wandb_run.url`."""
        return None if self._wandb is None else self._wandb.run

    def _open_jsonl(self, first_step: int) -> None:
        """Keeps the existing lines of steps < first_step (a resumed run) and opens the file for appending."""
        if self.jsonl_path.exists():
            kept = [line for line, record in _jsonl_lines(self.jsonl_path) if record["step"] < first_step]
            temporary = self.jsonl_path.with_name(JSONL_NAME + ".tmp")
            temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(temporary, self.jsonl_path)  # Atomic: a kill here leaves the old or the new file.
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs scalar `metrics` (Python, numpy or jax scalars) of `step`; steps must increase.

        A "step" entry of `metrics` must equal `step` and is not logged twice; "time" is reserved.
        """
        if self._closed:
            raise ValueError(f"write(step={step}) after close(); create a new MetricsWriter.")
        step = int(step)
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step={step} must be greater than the last written step={self._last_step}.")
        if "time" in metrics:
            raise ValueError("metrics['time'] is reserved for the wall time of the write; rename the metric.")
        values = {}
        for name, value in metrics.items():
            if name == "step":
                if int(value) != step:
                    raise ValueError(f"metrics['step']={value} differs from step={step}; pass the same step.")
                continue
            values[name] = _to_json_value(name, value)

        now = self._clock()
        if self._jsonl is None:
            self._open_jsonl(step)
        self._jsonl.write(json.dumps({"step": step, "time": now, **values}, allow_nan=False) + "\n")
        self._jsonl.flush()
        scalars = {name: math.nan if value is None else value for name, value in values.items()}
        for logger in (self._tensorboard, self._wandb):
            if logger is not None:
                logger.log(step, scalars, now)

        self._progress.tick(step, now)
        self._last_step = step
        if step % self.log_every == 0 or step >= self.total_steps:
            self._print(self._progress.line(
                step, [(label, values[key]) for key, label in PROGRESS_KEYS if key in values]))

    def write_samples(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append `{step, prompt, completion, reward}` records to workdir/samples.jsonl and print the first
        (its prompt's last 80 characters)."""
        with open(self.workdir / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(dict(r)) + "\n" for r in records)
        first = records[0]
        prompt = first["prompt"] if len(first["prompt"]) <= 80 else "..." + first["prompt"][-77:]
        self._print(f"sample at step {first['step']}: {prompt!r} -> {first['completion']!r} "
                    f"(reward {first['reward']:.3g})")

    def close(self) -> None:
        """Closes the JSONL and the loggers (finishes the W&B run); later writes raise. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
        finally:
            if self._wandb is not None:
                self._wandb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Plots.


def smooth(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average as TensorBoard smooths curves: `average = smoothing * average +
    (1 - smoothing) * value`, divided by `1 - smoothing**n` (n finite values so far) so the start is not
    pulled towards 0. Non-finite values are skipped (NaN in the output); smoothing=0 returns the values."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing={smoothing} must be in [0, 1): the weight of the previous average "
                         "(0: no smoothing; TensorBoard's default is 0.6).")
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        if value is None or not math.isfinite(value):
            smoothed.append(math.nan)
            continue
        average = smoothing * average + (1 - smoothing) * value
        weight = smoothing * weight + (1 - smoothing)
        smoothed.append(average / weight)
    return smoothed


def plot_metrics(records: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | Path, *,
                 title: str | None = None, smoothing: float | None = None) -> Figure:
    """Saves a PNG with one panel per key (x: GRPO step, y: the metric) and returns its Figure.

    Each panel draws the raw values faintly and their exponential moving average (`smooth`) over them;
    records without a key (or with null) are gaps in the raw curve and skipped by the average. The panel's
    title is the key with its last raw and smoothed values; `title` (e.g. the run's name) is the figure's.
    `smoothing` None averages over about a 20th of the records (at least 2): 0.5 for up to 40 records,
    0.9 for 200; 0 draws the raw curves alone.
    Uses matplotlib's Agg canvas directly, so it never changes the pyplot backend of a notebook.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not keys:
        raise ValueError("keys=[] is empty; pass the metric names to plot, e.g. ['reward_mean', 'kl'].")
    if smoothing is None:  # An EMA with smoothing s averages over about 1 / (1 - s) values.
        smoothing = round(1 - 1 / max(2.0, len(records) / 20), 2)
    smooth([], smoothing)  # Checks `smoothing` before any work.
    present = {key for record in records for key in record}
    missing = [key for key in keys if key not in present]
    if missing:
        available = sorted(present - {"step", "time"})
        raise ValueError(f"keys {missing} are in no record; available keys: {available}")
    figure = Figure(figsize=(7, 0.6 + 2.4 * len(keys)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        points = [(record["step"], record[key]) for record in records if key in record]
        steps = [step for step, _ in points]
        values = [math.nan if value is None else float(value) for _, value in points]
        ax.plot(steps, values, color="C0", alpha=0.3 if smoothing else 1.0, linewidth=1,
                marker="." if len(points) < 50 else None, label="raw")
        finite = [(step, value) for step, value in zip(steps, smooth(values, smoothing), strict=True)
                  if math.isfinite(value)]
        panel_title = key
        if finite:
            last_raw = next(value for value in reversed(values) if math.isfinite(value))
            panel_title += f"  (last {_format_number(last_raw)}"
            if smoothing:  # The average bridges the gaps of the raw curve.
                ax.plot([s for s, _ in finite], [v for _, v in finite], color="C0", linewidth=2,
                        label=f"smoothed (EMA {smoothing:g})")
                panel_title += f", smoothed {_format_number(finite[-1][1])}"
            panel_title += ")"
        ax.set_title(panel_title, fontsize=10, loc="left")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if smoothing:
        axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("GRPO step")
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return figure
