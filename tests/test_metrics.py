"""MetricsWriter: JSONL content and resume, TensorBoard (tensorboardX) and W&B loggers, progress, plots."""

import json
import math
import struct
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grpo_jax.metrics import (
    MetricsWriter,
    format_duration,
    plot_metrics,
    read_jsonl,
    smooth,
)


class FakeClock:
    """A clock the test moves by hand; `tick` seconds pass at each call unless set otherwise."""

    def __init__(self, now=1_700_000_000.0, tick=0.0):
        self.now, self.tick = now, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def make_writer(tmp_path, total_steps=10, log_every=1, clock=None, lines=None, **kwargs):
    print_fn = (lines.append if lines is not None else lambda line: None)
    return MetricsWriter(tmp_path, total_steps=total_steps, log_every=log_every, print_fn=print_fn,
                         clock=clock or FakeClock(), **kwargs)


def jsonl_lines(tmp_path):
    return (tmp_path / "metrics.jsonl").read_text().splitlines()


def tensorboard_events(path):
    """{tag: [ScalarEvent]} as TensorBoard shows them: the files of a folder merged in name order, the
    scalars of a killed run purged at the SessionLog.START (purge_step) of the resumed one."""
    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def tensorboard_scalars(path):
    """{tag: [(step, value)]} of `tensorboard_events`."""
    return {tag: [(e.step, e.value) for e in events] for tag, events in tensorboard_events(path).items()}


# ----------------------------------------------------------------------------------------------------------
# JSONL.


def test_jsonl_values_and_types(tmp_path):
    clock = FakeClock(now=1000.0)
    with make_writer(tmp_path, clock=clock) as writer:
        writer.write(1, {
            "reward_mean": jnp.mean(jnp.array([0.25, 0.75])),  # A jax scalar.
            "kl": np.float32(0.125),
            "count": np.int64(7),
            "python_int": 3,
            "nan": float("nan"),
            "inf": np.float32(np.inf),
            "flag": np.bool_(True),
            "bf16": jnp.asarray(1.5, jnp.bfloat16),
        })
        writer.write(np.int32(2), {"step": 2, "reward_mean": 1.5})

    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first == {"step": 1, "time": 1000.0, "reward_mean": 0.5, "kl": 0.125, "count": 7, "python_int": 3,
                     "nan": None, "inf": None, "flag": 1, "bf16": 1.5}
    assert type(first["reward_mean"]) is float and type(first["kl"]) is float
    assert type(first["count"]) is int and type(first["step"]) is int
    assert second == {"step": 2, "time": 1000.0, "reward_mean": 1.5}
    assert read_jsonl(tmp_path / "metrics.jsonl") == [first, second]


def test_each_write_is_flushed(tmp_path):
    writer = make_writer(tmp_path)
    writer.write(1, {"loss": 0.5})
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 0.5
    writer.close()


def test_read_jsonl_drops_a_truncated_last_line_but_not_a_bad_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    assert read_jsonl(path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a\n{"step": 3, "a": 3.0}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2 is not valid JSON"):
        read_jsonl(path)


def test_resume_drops_steps_at_or_after_the_first_new_step_and_a_truncated_line(tmp_path):
    with make_writer(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "time": 1.0, "lo')  # Killed mid-write.

    with make_writer(tmp_path) as writer:  # Resumed from a checkpoint of step 3.
        writer.write(4, {"loss": 40.0})
        writer.write(5, {"loss": 50.0})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert all(line.startswith('{"step"') for line in jsonl_lines(tmp_path))

    # TensorBoard drops the stale steps 4 and 5 of the first run at the purge step of the second.
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]}
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # One event file per process start.


def test_resume_from_an_earlier_step_keeps_only_earlier_lines(tmp_path):
    with make_writer(tmp_path) as writer:
        for step in (0, 10, 20, 30):
            writer.write(step, {"loss": 1.0})
    with make_writer(tmp_path) as writer:
        writer.write(10, {"loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(0, 1.0), (10, 2.0)]


@pytest.mark.parametrize("step, metrics, match", [
    (3, {"loss": 1.0}, r"step=3 must be greater than the last written step=3"),
    (4, {"time": 1.0}, r"metrics\['time'\] is reserved"),
    (4, {"step": 5}, r"metrics\['step'\]=5 differs from step=4"),
    (4, {"logits": np.ones(3)}, r"metrics\['logits'\] = .*\(shape \(3,\), dtype float64\) is not"),
    (4, {"name": "abc"}, r"metrics\['name'\] = 'abc' .* is not a real scalar"),
    (4, {"z": 1j}, r"metrics\['z'\] = 1j .* is not a real scalar"),
])
def test_write_errors_name_the_field(tmp_path, step, metrics, match):
    with make_writer(tmp_path) as writer:
        writer.write(3, {"loss": 1.0})
        with pytest.raises(ValueError, match=match):
            writer.write(step, metrics)
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_constructor_errors_and_write_after_close(tmp_path):
    with pytest.raises(ValueError, match=r"total_steps=0 must be a positive int"):
        MetricsWriter(tmp_path, total_steps=0)
    with pytest.raises(ValueError, match=r"log_every=0 must be a positive int"):
        MetricsWriter(tmp_path, total_steps=5, log_every=0)
    writer = make_writer(tmp_path)
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match=r"after close\(\)"):
        writer.write(1, {"loss": 1.0})


# ----------------------------------------------------------------------------------------------------------
# TensorBoard.


def write_run(tmp_path, steps=(0, 1, 2, 7)):
    values = {step: {"reward_mean": 0.1 * step, "kl": np.float32(1e-3) * step, "reward/format": -step / 3}
              for step in steps}
    with make_writer(tmp_path, total_steps=10, clock=FakeClock(tick=0.5)) as writer:
        for step in steps:
            writer.write(step, values[step])
    return writer.event_path, values


def test_tensorboard_reads_the_written_scalars(tmp_path):
    path, values = write_run(tmp_path)
    assert path.parent == tmp_path / "tensorboard" and path.name.startswith("events.out.tfevents.")
    events = tensorboard_events(path)
    assert sorted(events) == ["kl", "reward/format", "reward_mean"]
    for tag, tag_events in events.items():
        # Steps and float32 values as written; wall times from the writer's clock (one call per write).
        assert [(e.step, e.value) for e in tag_events] == [(step, float(np.float32(values[step][tag])))
                                                           for step in values]
        assert [e.wall_time for e in tag_events] == [1_700_000_000.0 + 0.5 * i for i in range(1, 5)]
    assert tensorboard_scalars(tmp_path / "tensorboard") == tensorboard_scalars(path)


def test_tensorboard_events_reach_the_disk_while_the_writer_is_open(tmp_path):
    with make_writer(tmp_path) as writer:
        writer.write(1, {"loss": 0.5})
        deadline = time.monotonic() + 10
        while not tensorboard_scalars(writer.event_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tensorboard_scalars(writer.event_path) == {"loss": [(1, 0.5)]}


def test_resume_replaces_the_stale_steps_in_tensorboard(tmp_path):
    with make_writer(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step), "kl": step / 10})
    with make_writer(tmp_path) as writer:  # Killed after step 5, resumed from a checkpoint of step 2.
        for step in range(3, 7):
            writer.write(step, {"loss": 10.0 * step})

    # Steps 1, 2 of the first run, 3.. of the second: TensorBoard purged the first run's steps >= 3.
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0), (6, 60.0)],
                       "kl": [(1, np.float32(0.1)), (2, np.float32(0.2))]}
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # One event file per process start.


def test_nan_and_huge_metrics_in_tensorboard(tmp_path):
    with make_writer(tmp_path) as writer:
        writer.write(1, {"loss": float("nan"), "kl": 0.5, "huge": 1e300, "inf": -math.inf})
    scalars = tensorboard_scalars(writer.event_path)
    assert math.isnan(scalars["loss"][0][1]) and scalars["kl"] == [(1, 0.5)]
    assert math.isnan(scalars["inf"][0][1])  # JSON null in the JSONL, NaN for the loggers.
    assert scalars["huge"] == [(1, math.inf)]  # Beyond float32; the JSONL line keeps 1e300.
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert record["huge"] == 1e300 and record["loss"] is None and record["inf"] is None


def test_two_writers_in_the_same_second_get_their_own_event_file(tmp_path):
    with make_writer(tmp_path) as first, make_writer(tmp_path) as second:
        assert first.event_path is None  # Created by the first write: its step is the purge step.
        first.write(1, {"loss": 1.0})
        second.write(2, {"loss": 2.0})
        if first.event_path.name.split(".")[3] == second.event_path.name.split(".")[3]:  # Same second.
            assert second.event_path.name == first.event_path.name + ".1"
        assert sorted([first.event_path, second.event_path]) == [first.event_path, second.event_path]


def test_no_loggers_writes_the_jsonl_alone(tmp_path):
    with make_writer(tmp_path / "run", loggers=()) as writer:
        writer.write(1, {"loss": 1.0})
    assert writer.event_path is None and writer.wandb_run is None
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("loggers, match", [
    (("tensorboard", "tb"), r"config.loggers=\('tensorboard', 'tb'\) has unknown names \['tb'\]; "
                            r"valid names: \['tensorboard', 'wandb'\]"),
    (["mlflow"], r"config.loggers=\('mlflow',\) has unknown names \['mlflow'\]"),
    ("wandb", r"config.loggers='wandb' must be a tuple of names, e.g. \('wandb',\).*valid names"),
])
def test_unknown_logger_names_raise(tmp_path, loggers, match):
    with pytest.raises(ValueError, match=match):
        make_writer(tmp_path / "run", loggers=loggers)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Weights & Biases.

WANDB_VARIABLES = ("WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_NAME")


class FakeWandb:
    """The part of the wandb module MetricsWriter uses; records the calls."""

    class Run:
        def __init__(self, kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False

        def log(self, data, step):
            self.logged.append((step, data))

        def finish(self):
            self.finished = True

    def __init__(self):
        self.runs = []

    def init(self, **kwargs):
        self.runs.append(self.Run(kwargs))
        return self.runs[-1]


def test_wandb_init_arguments_log_and_finish(tmp_path, monkeypatch):
    from ml_collections import ConfigDict

    for variable in WANDB_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    workdir = tmp_path / "gsm8k-run"
    with make_writer(workdir, loggers=("tensorboard", "wandb"), config=ConfigDict({"lr": 0.1})) as writer:
        writer.write(1, {"loss": 0.5, "kl": float("nan"), "count": np.int64(3)})
        writer.write(2, {"loss": 0.25})
    run_id = (workdir / "wandb_run_id").read_text().strip()
    assert writer.wandb_run is wandb.runs[0] and wandb.runs[0].finished
    assert wandb.runs[0].kwargs == {"project": "grpo_jax", "name": "gsm8k-run", "dir": str(workdir),
                                    "id": run_id, "config": {"lr": 0.1}, "resume": "allow"}
    (step, first), second = wandb.runs[0].logged
    assert step == 1 and first["loss"] == 0.5 and math.isnan(first["kl"]) and first["count"] == 3
    assert second == (2, {"loss": 0.25})

    # A resumed run continues the same W&B run; values the environment sets are left to wandb.
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    with make_writer(workdir, loggers=("wandb",), run_name="renamed"):
        pass
    assert wandb.runs[1].kwargs == {"project": "mine", "name": "renamed", "dir": str(tmp_path / "elsewhere"),
                                    "id": run_id, "config": None, "resume": "allow"}
    assert wandb.runs[1].finished and wandb.runs[1].logged == []


def test_wandb_missing_raises_an_import_error_naming_pip(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError.
    with pytest.raises(ImportError, match=r"config.loggers includes 'wandb'.*pip install wandb"):
        make_writer(tmp_path, loggers=("wandb",))


def read_offline_wandb_records(run_file):
    """The records of an offline W&B run file (`run-<id>.wandb`) as `wandb_internal_pb2.Record`s.

    The file is a 7-byte header (":W&B", a 2-byte magic, a version byte) and then LevelDB-log chunks in
    32 KiB blocks: crc (4 bytes), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last),
    data; a block's last < 7 bytes are padding. The data of a full record (or first..last) is one Record.
    A chunk cut short (the file still being written) ends the list.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:
            offset += 32768 - offset % 32768
            continue
        length, kind = struct.unpack("<HB", data[offset + 4:offset + 7])
        if offset + 7 + length > len(data):  # Still being written.
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_has_the_logged_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for variable in WANDB_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    workdir = tmp_path / "run-7"
    with make_writer(workdir, loggers=("wandb",), config={"lr": 1e-3, "group_size": 8}) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"reward_mean": step / 4, "reward/accuracy": step / 8, "kl": math.nan})

    run_id = (workdir / "wandb_run_id").read_text().strip()
    (run_file,) = wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    # wandb's service process may still be writing the file when finish() returns: wait for the exit record.
    deadline = time.monotonic() + 20
    records = read_offline_wandb_records(run_file)
    while "exit" not in [r.WhichOneof("record_type") for r in records] and time.monotonic() < deadline:
        time.sleep(0.05)
        records = read_offline_wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "grpo_jax", "run-7")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 1e-3 and config["group_size"] == 8
    history = [{"/".join(item.nested_key) or item.key: item.value_json for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(int(h["_step"]), float(h["reward_mean"]), float(h["reward/accuracy"]), h["kl"])
            for h in history] == [(1, 0.25, 0.125, "NaN"), (2, 0.5, 0.25, "NaN"), (3, 0.75, 0.375, "NaN")]


# ----------------------------------------------------------------------------------------------------------
# Progress line.

METRICS = {"reward_mean": 0.53, "accuracy": 0.41, "kl": 0.0021, "completion_length_mean": 57.3,
           "grad_norm": 1.7, "tokens_per_second": 12345.6, "loss": -0.0123}


def test_progress_line_with_speed_and_eta(tmp_path):
    lines = []
    clock = FakeClock(now=1000.0, tick=3.41)
    with make_writer(tmp_path, total_steps=200, log_every=4, clock=clock, lines=lines) as writer:
        for step in range(1, 13):
            writer.write(step, METRICS)
    assert len(lines) == 3
    # 188 steps left at 3.41 s/step: 641 s.
    assert lines[-1] == ("step 12/200 (6%) | 3.41 s/step | ETA 10m41s | reward 0.53 | acc 0.41 | kl 0.0021 "
                         "| len 57.3 | tok/s 12346 | loss -0.0123")


def test_progress_line_first_step_shows_no_timing_and_only_known_keys(tmp_path):
    lines = []
    with make_writer(tmp_path, total_steps=50, lines=lines) as writer:
        writer.write(1, {"reward_mean": 0.5, "grad_norm": 3.0})
    assert lines == ["step 1/50 (2%) | reward 0.5"]


def test_eta_uses_the_median_step_time_and_the_step_gap(tmp_path):
    lines = []
    clock = FakeClock(now=0.0)
    with make_writer(tmp_path, total_steps=100, log_every=10, clock=clock, lines=lines) as writer:
        # Writes every 10 steps, 20 s apart (2 s/step), and one slow interval (a checkpoint save).
        for step, now in [(0, 0.0), (10, 20.0), (20, 40.0), (30, 300.0), (40, 320.0)]:
            clock.now = now
            writer.write(step, {"nan_kl": float("nan"), "kl": float("nan")})
    assert lines[-1] == "step 40/100 (40%) | 2 s/step | ETA 2m00s | kl nan"


def test_last_step_is_printed_even_off_the_log_every_grid(tmp_path):
    lines = []
    with make_writer(tmp_path, total_steps=7, log_every=5, lines=lines) as writer:
        for step in range(1, 8):
            writer.write(step, {"loss": 1.0})
    assert [line.split(" |")[0] for line in lines] == ["step 5/7 (71%)", "step 7/7 (100%)"]


@pytest.mark.parametrize("seconds, want", [
    (0, "0s"), (41.4, "41s"), (641.08, "10m41s"), (3600, "1h00m"), (7380, "2h03m"), (273_600, "3d04h"),
    (-5, "0s"),
])
def testformat_duration(seconds, want):
    assert format_duration(seconds) == want


# ----------------------------------------------------------------------------------------------------------
# Plots.


def plot_records():
    records = [{"step": step, "time": 0.0, "reward_mean": step / 10, "kl": None if step == 3 else 0.01 * step}
               for step in range(6)]
    records.append({"step": 6, "time": 0.0, "kl": 0.02})  # A record without reward_mean.
    return records


def test_plot_metrics_writes_a_png_with_titles_labels_and_smoothed_curves(tmp_path):
    path = tmp_path / "plots" / "curves.png"
    figure = plot_metrics(plot_records(), ["reward_mean", "kl"], path, title="gsm8k-run", smoothing=0.6)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert figure.get_suptitle() == "gsm8k-run"
    reward, kl = figure.axes
    assert reward.get_title(loc="left") == "reward_mean  (last 0.5, smoothed 0.379)"
    assert [reward.get_ylabel(), kl.get_ylabel(), kl.get_xlabel()] == ["reward_mean", "kl", "GRPO step"]
    raw, smoothed = kl.get_lines()
    assert list(raw.get_xdata()) == [0, 1, 2, 3, 4, 5, 6] and math.isnan(raw.get_ydata()[3])
    assert raw.get_alpha() < 1 and smoothed.get_linewidth() > raw.get_linewidth()
    # The average skips the gap at step 3 (and bridges it).
    values = [0.0, 0.01, 0.02, 0.04, 0.05, 0.02]
    assert list(smoothed.get_xdata()) == [0, 1, 2, 4, 5, 6]
    np.testing.assert_allclose(smoothed.get_ydata(), smooth(values, 0.6))
    assert [text.get_text() for text in reward.get_legend().get_texts()] == ["raw", "smoothed (EMA 0.6)"]


def test_plot_metrics_default_smoothing_follows_the_run_length(tmp_path):
    figure = plot_metrics(plot_records(), ["kl"], tmp_path / "short.png")  # 7 records.
    assert figure.axes[0].get_legend().get_texts()[1].get_text() == "smoothed (EMA 0.5)"
    records = [{"step": step, "kl": 0.1} for step in range(200)]
    figure = plot_metrics(records, ["kl"], tmp_path / "long.png")
    assert figure.axes[0].get_legend().get_texts()[1].get_text() == "smoothed (EMA 0.9)"


def test_plot_metrics_without_smoothing_or_title(tmp_path):
    figure = plot_metrics(plot_records(), ["kl"], tmp_path / "kl.png", smoothing=0)
    assert figure.get_suptitle() == "" and len(figure.axes[0].get_lines()) == 1
    assert figure.axes[0].get_title(loc="left") == "kl  (last 0.02)"


def test_plot_metrics_errors(tmp_path):
    path = tmp_path / "curves.png"
    with pytest.raises(ValueError, match=r"keys \['loss'\] are in no record; available keys: \['kl', "):
        plot_metrics(plot_records(), ["loss"], path)
    with pytest.raises(ValueError, match=r"smoothing=1 must be in \[0, 1\)"):
        plot_metrics(plot_records(), ["kl"], path, smoothing=1)
    assert not path.exists()


def test_smooth_is_a_debiased_exponential_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # No pull towards 0 at the start.
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 5.0 / 0.75])
    out = smooth([1.0, math.nan, None, 3.0], 0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and math.isnan(out[2])
    assert out[3] == pytest.approx(1.75 / 0.75)
    assert smooth([1.0, 5.0], 0) == [1.0, 5.0]
