"""Training metrics: a JSONL log, TensorBoard event files, one progress line with ETA, and plots.

`MetricsWriter.write(step, metrics)` appends `{"step", "time", **metrics}` to `<workdir>/metrics.jsonl` and
writes every metric as a TensorBoard scalar to `<workdir>/tensorboard/events.out.tfevents.<time>.<host>`.
Event files are written by hand (TFRecord framing + the few fields of the `tensorflow.Event` protobuf that
scalars need), so neither TensorFlow nor protobuf is a dependency.

Resuming is running the same command again: the first `write(step)` of a process drops every JSONL line with
a step >= `step` (and a line cut short when the last run was killed), and writes a `SessionLog.START` event at
`step`, which makes TensorBoard drop the stale scalars of the killed run the same way.

Only call the writer from one process (e.g. `jax.process_index() == 0`): each writer owns its files.
"""

from __future__ import annotations

import collections
import json
import math
import os
import socket
import statistics
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVENT_FILE_PREFIX = "events.out.tfevents."

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


# ----------------------------------------------------------------------------------------------------------
# CRC32C and TFRecord framing.


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, bit-reversed.
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 3720) of `data`, as TFRecord uses it: crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits plus a constant (so a CRC of CRCs is not trivial)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc of the length, data, masked crc of the data (little-endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc32c(length)) + data + struct.pack("<I", _masked_crc32c(data))


def _read_tfrecords(path: Path) -> Iterator[bytes]:
    """Yields the records of a TFRecord file; stops at a record cut short (a writer killed mid-write)."""
    content = path.read_bytes()
    offset = 0
    while offset + 12 <= len(content):
        length_bytes = content[offset:offset + 8]
        (length_crc,) = struct.unpack("<I", content[offset + 8:offset + 12])
        if _masked_crc32c(length_bytes) != length_crc:
            raise ValueError(f"{path}: bad length checksum of the record at byte {offset}; file is corrupt.")
        (length,) = struct.unpack("<Q", length_bytes)
        end = offset + 12 + length + 4
        if end > len(content):
            return
        data = content[offset + 12:offset + 12 + length]
        (data_crc,) = struct.unpack("<I", content[end - 4:end])
        if _masked_crc32c(data) != data_crc:
            raise ValueError(f"{path}: bad data checksum of the record at byte {offset}; file is corrupt.")
        yield data
        offset = end


# ----------------------------------------------------------------------------------------------------------
# The subset of the tensorflow.Event protobuf that scalars need:
#   Event { double wall_time = 1; int64 step = 2;
#           oneof what { string file_version = 3; Summary summary = 5; SessionLog session_log = 7; } }
#   Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
#   SessionLog { SessionStatus status = 1; }   (START = 1)

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_SESSION_START = 1


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # Negative int64 values are encoded as their 64-bit two's complement.
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    if wire_type == _BYTES:
        return key + _varint(len(payload)) + payload
    return key + payload


def _encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                  scalars: Mapping[str, float] | None = None, session_start: bool = False) -> bytes:
    """One serialized Event; pass one of file_version, scalars and session_start (they are a oneof)."""
    event = _field(1, _FIXED64, struct.pack("<d", wall_time)) + _field(2, _VARINT, _varint(step))
    if file_version is not None:
        event += _field(3, _BYTES, file_version.encode())
    if scalars:
        with np.errstate(over="ignore"):  # Beyond the float32 range is inf, as in TensorFlow.
            as_float32 = {tag: np.asarray(value, dtype="<f4").tobytes() for tag, value in scalars.items()}
        values = [_field(1, _BYTES, tag.encode()) + _field(2, _FIXED32, value)
                  for tag, value in as_float32.items()]
        event += _field(5, _BYTES, b"".join(_field(1, _BYTES, value) for value in values))
    if session_start:
        event += _field(7, _BYTES, _field(1, _VARINT, _varint(_SESSION_START)))
    return event


def _parse_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yields (field number, value) of a protobuf message: ints for varint/fixed fields, bytes otherwise."""
    offset = 0
    while offset < len(data):
        key, offset = _parse_varint(data, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, offset = _parse_varint(data, offset)
        elif wire_type == _FIXED64:
            value, offset = data[offset:offset + 8], offset + 8
        elif wire_type == _FIXED32:
            value, offset = data[offset:offset + 4], offset + 4
        elif wire_type == _BYTES:
            length, offset = _parse_varint(data, offset)
            value, offset = data[offset:offset + length], offset + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} (field {number}).")
        yield number, value


def _parse_varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset += 1
        if not byte & 0x80:
            return value, offset
        shift += 7


def _decode_event(data: bytes) -> tuple[int, list[tuple[str, float]], bool]:
    """(step, [(tag, simple_value)], is SessionLog.START) of one Event; other fields are skipped."""
    step, scalars, session_start = 0, [], False
    for number, value in _parse_fields(data):
        if number == 2:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 5:
            for value_number, summary_value in _parse_fields(value):
                if value_number != 1:
                    continue
                fields = dict(_parse_fields(summary_value))
                if 2 in fields:  # Values of other kinds (images, tensors, ...) have no simple_value.
                    scalars.append((fields[1].decode(), struct.unpack("<f", fields[2])[0]))
        elif number == 7:
            session_start = dict(_parse_fields(value)).get(1) == _SESSION_START
    return step, scalars, session_start


def read_tensorboard_scalars(path_or_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of one event file, or of all event files of a folder, as {tag: [(step, value), ...]}.

    Files of a folder are read in name order (their names start with the creation time). As in TensorBoard,
    a `SessionLog.START` event at step s (a resumed run) drops the scalars of steps >= s read before it.
    Checksums are verified; a record cut short at the end of a file (a killed writer) is ignored.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.startswith(EVENT_FILE_PREFIX))
        if not files:
            raise FileNotFoundError(f"no {EVENT_FILE_PREFIX}* files in {path}; pass the "
                                    f"'{TENSORBOARD_DIR}' folder of a workdir, or one event file.")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"path_or_dir={str(path)!r} does not exist.")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in files:
        for record in _read_tfrecords(file):
            step, values, session_start = _decode_event(record)
            if session_start:
                scalars = {tag: [(s, v) for s, v in points if s < step] for tag, points in scalars.items()}
            for tag, value in values:
                scalars.setdefault(tag, []).append((step, value))
    return {tag: points for tag, points in scalars.items() if points}


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
# The writer.


def _create_event_file(directory: Path, wall_time: float) -> tuple[Path, BinaryIO]:
    """A new `events.out.tfevents.<time>.<host>` file in `directory`, opened for writing."""
    directory.mkdir(parents=True, exist_ok=True)
    base = f"{EVENT_FILE_PREFIX}{int(wall_time)}.{socket.gethostname()}"
    path, suffix = directory / base, 0
    while True:  # Two writers started in the same second each get their own file.
        try:
            return path, path.open("xb")
        except FileExistsError:
            suffix += 1
            path = directory / f"{base}.{suffix}"


class MetricsWriter:
    """Writes metrics of a training run: `<workdir>/metrics.jsonl`, TensorBoard scalars, a progress line.

    Usage:
        with MetricsWriter(workdir, total_steps=200, log_every=10) as writer:
            for step in range(start_step, 201):
                writer.write(step, {"reward_mean": 0.5, "kl": 0.002})

    Every `write` is flushed, so a killed process loses at most the line being written; the next process
    drops that line and every line with a step >= its first step (see the module docstring).

    Args:
      workdir: folder of the run; created if missing.
      total_steps: the step the run ends at, for the percentage and the ETA.
      log_every: print the progress line when `step % log_every == 0` and at `total_steps`.
      print_fn: where the progress line goes (e.g. `logging.info`).
      clock: seconds since the epoch; for the "time" field, the event wall times and step durations.
    """

    def __init__(self, workdir: str | Path, *, total_steps: int, log_every: int = 1,
                 print_fn: Callable[[str], object] = print, clock: Callable[[], float] = time.time):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be a positive int: the step the run ends at.")
        if log_every < 1:
            raise ValueError(f"log_every={log_every} must be a positive int (1 prints every step).")
        self.workdir = Path(workdir)
        self.jsonl_path = self.workdir / JSONL_NAME
        self.total_steps = total_steps
        self.log_every = log_every
        self._print = print_fn
        self._clock = clock
        self._jsonl = None  # Opened by the first write, once the step to resume from is known.
        self._last_step: int | None = None
        self._progress = Progress(total_steps, clock=clock)
        self._closed = False
        now = self._clock()
        self.event_path, self._events = _create_event_file(self.workdir / TENSORBOARD_DIR, now)
        self._write_event(_encode_event(now, 0, file_version="brain.Event:2"))

    def _write_event(self, event: bytes) -> None:
        self._events.write(_tfrecord(event))
        self._events.flush()

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
            self._write_event(_encode_event(now, step, session_start=True))
        self._jsonl.write(json.dumps({"step": step, "time": now, **values}, allow_nan=False) + "\n")
        self._jsonl.flush()
        scalars = {name: math.nan if value is None else value for name, value in values.items()}
        self._write_event(_encode_event(now, step, scalars=scalars))

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
        """Closes the files; further writes raise. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._events.close()
        if self._jsonl is not None:
            self._jsonl.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Plots.


def plot_metrics(records: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | Path) -> None:
    """Saves a PNG with one subplot per key, x = step; records without a key (or with null) are gaps.

    Uses matplotlib's Agg canvas directly, so it never changes the pyplot backend of a notebook.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not keys:
        raise ValueError("keys=[] is empty; pass the metric names to plot, e.g. ['reward_mean', 'kl'].")
    present = {key for record in records for key in record}
    missing = [key for key in keys if key not in present]
    if missing:
        available = sorted(present - {"step", "time"})
        raise ValueError(f"keys {missing} are in no record; available keys: {available}")
    figure = Figure(figsize=(7, 2.2 * len(keys)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        points = [(record["step"], record[key]) for record in records if key in record]
        steps = [step for step, _ in points]
        values = [math.nan if value is None else value for _, value in points]
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
