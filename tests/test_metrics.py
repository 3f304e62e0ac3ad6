"""MetricsWriter: JSONL content and resume, TensorBoard event files (CRC32C, framing, protobuf), progress."""

import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.metrics import (
    MetricsWriter,
    crc32c,
    format_duration,
    plot_metrics,
    read_jsonl,
    read_tensorboard_scalars,
)


class FakeClock:
    """A clock the test moves by hand; `tick` seconds pass at each call unless set otherwise."""

    def __init__(self, now=1_700_000_000.0, tick=0.0):
        self.now, self.tick = now, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def make_writer(tmp_path, total_steps=10, log_every=1, clock=None, lines=None):
    print_fn = (lines.append if lines is not None else lambda line: None)
    return MetricsWriter(tmp_path, total_steps=total_steps, log_every=log_every, print_fn=print_fn,
                         clock=clock or FakeClock())


def jsonl_lines(tmp_path):
    return (tmp_path / "metrics.jsonl").read_text().splitlines()


# ----------------------------------------------------------------------------------------------------------
# CRC32C.


@pytest.mark.parametrize("data, want", [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),  # RFC 3720, B.4: 32 bytes of zeros.
    (b"\xff" * 32, 0x62A8AB43),  # 32 bytes of ones.
    (bytes(range(32)), 0x46DD794E),  # 32 incrementing bytes.
    (bytes(range(31, -1, -1)), 0x113FDB5C),  # 32 decrementing bytes.
])
def test_crc32c_known_answers(data, want):
    assert crc32c(data) == want


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
    assert read_tensorboard_scalars(writer.event_path) == {"loss": [(1, 0.5)]}
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

    # TensorBoard drops the stale steps 4 and 5 of the first run at the SessionLog.START of the second.
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
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
# TensorBoard event files.


def write_run(tmp_path, steps=(0, 1, 2, 7)):
    values = {step: {"reward_mean": 0.1 * step, "kl": np.float32(1e-3) * step, "reward/format": -step / 3}
              for step in steps}
    with make_writer(tmp_path, total_steps=10, clock=FakeClock(tick=0.5)) as writer:
        for step in steps:
            writer.write(step, values[step])
    return writer.event_path, values


def test_event_file_round_trip(tmp_path):
    path, values = write_run(tmp_path)
    assert path.parent == tmp_path / "tensorboard" and path.name.startswith("events.out.tfevents.1700000000.")
    scalars = read_tensorboard_scalars(path)
    assert set(scalars) == {"reward_mean", "kl", "reward/format"}
    for tag, points in scalars.items():
        assert points == [(step, float(np.float32(values[step][tag]))) for step in values]
    assert scalars["reward_mean"][1] == (1, float(np.float32(0.1)))
    assert read_tensorboard_scalars(tmp_path / "tensorboard") == scalars


def test_event_file_record_framing(tmp_path):
    path, _ = write_run(tmp_path, steps=(3,))
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    first = data[12:12 + length]
    # Event{wall_time=1 (double), step=2 (varint), file_version=3 (string)}.
    assert first == (b"\x09" + struct.pack("<d", 1_700_000_000.5) + b"\x10\x00"
                     + b"\x1a\x0d" + b"brain.Event:2")
    crc = crc32c(first)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert data[12 + length:16 + length] == struct.pack("<I", masked)


def test_nan_and_huge_metrics_in_tensorboard(tmp_path):
    with make_writer(tmp_path) as writer:
        writer.write(1, {"loss": float("nan"), "kl": 0.5, "huge": 1e300})
    scalars = read_tensorboard_scalars(writer.event_path)
    assert math.isnan(scalars["loss"][0][1]) and scalars["kl"] == [(1, 0.5)]
    assert scalars["huge"] == [(1, math.inf)]  # Beyond float32; the JSONL line keeps 1e300.
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["huge"] == 1e300


def test_reader_verifies_crcs_and_ignores_a_truncated_tail(tmp_path):
    path, values = write_run(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # The last record (step 7) cut short.
    assert [step for step, _ in read_tensorboard_scalars(path)["kl"]] == [0, 1, 2]
    corrupt = bytearray(data)
    corrupt[-10] ^= 0x01  # A bit flip in the data of the last record.
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"bad data checksum"):
        read_tensorboard_scalars(path)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no events.out.tfevents.\* files"):
        read_tensorboard_scalars(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        read_tensorboard_scalars(tmp_path / "missing")


def test_two_writers_in_the_same_second_get_their_own_event_file(tmp_path):
    with make_writer(tmp_path) as first, make_writer(tmp_path) as second:
        assert first.event_path != second.event_path
        assert second.event_path.name == first.event_path.name + ".1"


def test_tensorboard_reads_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, values = write_run(tmp_path)
    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["kl", "reward/format", "reward_mean"]
    for tag, points in read_tensorboard_scalars(path).items():
        events = accumulator.Scalars(tag)
        assert [(e.step, e.value) for e in events] == points
        assert [e.wall_time for e in events] == [1_700_000_000.0 + 0.5 * (i + 2) for i in range(len(values))]

    # A resumed run: TensorBoard merges both files and drops the stale steps >= 2 of the first one.
    with make_writer(tmp_path, clock=FakeClock(now=1_700_000_100.0)) as writer:
        writer.write(2, {"kl": 20.0})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    merged = [(e.step, e.value) for e in accumulator.Scalars("kl")]
    assert merged == [(0, 0.0), (1, float(np.float32(1e-3))), (2, 20.0)]
    assert merged == read_tensorboard_scalars(tmp_path / "tensorboard")["kl"]


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


def test_plot_metrics_writes_a_png(tmp_path):
    records = [{"step": step, "time": 0.0, "reward_mean": step / 10, "kl": None if step == 3 else 0.01}
               for step in range(6)]
    records.append({"step": 6, "time": 0.0, "kl": 0.02})  # A record without reward_mean.
    path = tmp_path / "plots" / "curves.png"
    plot_metrics(records, ["reward_mean", "kl"], path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match=r"keys \['loss'\] are in no record; available keys: \['kl', "):
        plot_metrics(records, ["loss"], path)
