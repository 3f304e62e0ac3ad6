"""Checkpointer: exact round trips of the train state, retention, intervals, resharding and clear errors."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from grpo_jax.checkpoint import Checkpointer, CheckpointError
from grpo_jax.models import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
REPLICATED = NamedSharding(jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)), P())


def _train_state(typed_key: bool = True) -> dict:
    """The trainer's state: nnx params, an adamw state (with its int32 count), a step and a PRNG key."""
    config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1)
    params = nnx.state(Transformer(config, nnx.Rngs(0)), nnx.Param)
    opt_state = optax.adamw(1e-3).init(params)
    # One update so the moments and the count are not their all-zero initial values.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = optax.adamw(1e-3).update(grads, opt_state, params)
    rng = jax.random.key(42)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(7),
            "rng": rng if typed_key else jax.random.key_data(rng)}


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract(tree):
    """ShapeDtypeStructs with each leaf's own sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_identical(actual, expected):
    """Same pytree structure (types included), and every leaf has the same dtype, shape and bytes."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert (a.dtype, a.shape) == (e.dtype, e.shape)
        if _is_key(e):
            assert str(jax.random.key_impl(a)) == str(jax.random.key_impl(e))
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes()


def _weights(step: int) -> dict:
    return {"w": jnp.full((4, 4), float(step)), "step": jnp.int32(step)}


@pytest.mark.parametrize("typed_key", [True, False], ids=["typed_key", "uint32_key_data"])
def test_round_trip_is_exact(tmp_path, typed_key):
    state = _train_state(typed_key)
    metadata = {"config": {"lr": 1e-3, "model": "tiny", "mesh": [8, 1, 1]}, "examples_seen": 1234,
                "note": None}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(7, state, metadata) is True

    with Checkpointer(tmp_path) as ckpt:  # a fresh process would start like this
        restored, restored_metadata, step = ckpt.restore(_abstract(state))

    assert step == 7
    assert restored_metadata == metadata
    _assert_identical(restored, state)
    assert isinstance(restored["params"], nnx.State)
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])  # optax's ScaleByAdamState
    assert int(restored["opt_state"][0].count) == 1
    # The restored key draws the same numbers as the saved one.
    rng = restored["rng"] if typed_key else jax.random.wrap_key_data(restored["rng"])
    assert float(jax.random.uniform(rng)) == float(jax.random.uniform(jax.random.key(42)))


def test_restore_accepts_real_arrays_as_abstract_state(tmp_path):
    state = _train_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, {})
        zeros = jax.tree.map(jnp.zeros_like, state)
        restored, metadata, step = ckpt.restore(zeros)
    _assert_identical(restored, state)
    assert (metadata, step) == ({}, 3)


def test_python_and_numpy_leaves_restore_as_jax_arrays(tmp_path):
    state = {"count": 3, "lr": 0.5, "mask": np.array([1, 0, 1], dtype=np.int8)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        # jax.eval_shape gives what JAX would make of each leaf: int32 / float32 for Python scalars.
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=REPLICATED),
                                jax.eval_shape(lambda: state))
        restored, _, _ = ckpt.restore(abstract)
    expected = {"count": jnp.int32(3), "lr": jnp.float32(0.5), "mask": jnp.array([1, 0, 1], jnp.int8)}
    _assert_identical(restored, expected)


def test_max_to_keep_prunes_oldest_and_latest_step_tracks_newest(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in range(1, 5):
            assert ckpt.save(step, _weights(step), {"step": step})
        assert ckpt.latest_step() == 4
        assert ckpt.all_steps() == [3, 4]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
        restored, metadata, step = ckpt.restore(_abstract(_weights(0)), step=3)
    assert (step, metadata) == (3, {"step": 3})
    _assert_identical(restored, _weights(3))


def test_save_interval_skips_steps_unless_forced(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=10, save_interval_steps=3) as ckpt:
        saved = [ckpt.save(step, _weights(step), {}) for step in range(8)]
        assert saved == [True, False, False, True, False, False, True, False]
        assert ckpt.all_steps() == [0, 3, 6]
        assert ckpt.save(7, _weights(7), {}, force=True) is True
        assert ckpt.latest_step() == 7
        # A step that is not newer than the latest is not saved again.
        assert ckpt.save(6, _weights(6), {}) is False


def test_restore_onto_a_different_mesh_and_sharding(tmp_path):
    auto = (AxisType.Auto,) * 2
    save_mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=auto)
    values = {
        "embed": jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6) / 7,
        "kernel": jnp.arange(6 * 8, dtype=jnp.bfloat16).reshape(6, 8),
        "bias": jnp.arange(8, dtype=jnp.int32),
    }
    save_specs = {"embed": P("fsdp", None), "kernel": P(None, "fsdp"), "bias": P(("data", "fsdp"))}
    state = {name: jax.device_put(values[name], NamedSharding(save_mesh, spec))
             for name, spec in save_specs.items()}
    keys = jax.random.split(jax.random.key(0), 8)  # typed keys sharded like a per-example batch
    state["rngs"] = jax.device_put(keys, NamedSharding(save_mesh, P("data")))
    state["step"] = jax.device_put(jnp.int32(5), NamedSharding(save_mesh, P()))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, {})

        replicated = NamedSharding(save_mesh, P())
        other_mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=auto)
        for shardings in (
            jax.tree.map(lambda _: replicated, state),
            {"embed": NamedSharding(other_mesh, P("fsdp")),
             "kernel": NamedSharding(other_mesh, P("data", "fsdp")),
             "bias": NamedSharding(other_mesh, P("fsdp")),
             "rngs": NamedSharding(other_mesh, P("fsdp")),
             "step": NamedSharding(other_mesh, P())},
        ):
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                    shardings)
            restored, _, _ = ckpt.restore(abstract)
            _assert_identical(restored, state)
            for name, array in restored.items():
                # Equivalence, not ==: JAX itself writes a key array's replicated spec as P(None,), not P().
                assert array.sharding.is_equivalent_to(shardings[name], array.ndim), name


def test_restore_without_checkpoint_names_the_directory(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path / 'empty'}"):
            ckpt.restore(_abstract(_weights(0)))
        ckpt.save(2, _weights(2), {})
        with pytest.raises(FileNotFoundError, match=r"step=5 .* available steps: \[2\]"):
            ckpt.restore(_abstract(_weights(0)), step=5)


def test_structure_shape_and_sharding_mismatches_name_the_paths(tmp_path):
    state = {"params": {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}, "step": jnp.int32(1)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})

        renamed = {"params": {"w": state["params"]["w"], "bias": state["params"]["b"]}, "step": state["step"]}
        expected = r"not in the checkpoint: params/bias;.*not in abstract_state: params/b\b"
        with pytest.raises(ValueError, match=expected):
            ckpt.restore(_abstract(renamed))

        reshaped = {"params": {"w": jnp.ones((4, 8)), "b": jnp.zeros(4)}, "step": state["step"]}
        expected = r"params/w \(checkpoint float32\[4, 4\], abstract_state float32\[4, 8\]\)"
        with pytest.raises(ValueError, match=expected):
            ckpt.restore(_abstract(reshaped))

        no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        with pytest.raises(ValueError, match=r"leaf 'params/b' is ShapeDtypeStruct without a sharding"):
            ckpt.restore(no_sharding)


def test_metadata_must_be_json(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="metadata is not JSON-serialisable"):
            ckpt.save(1, _weights(1), {"array": np.ones(2)})
        assert ckpt.latest_step() is None


def test_unfinished_save_is_ignored_and_cleaned_up(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _weights(1), {"step": 1})
    # What a crash in the middle of saving step 2 leaves behind: an uncommitted temporary directory.
    stray = tmp_path / "2.orbax-checkpoint-tmp-1700000000000000"
    (stray / "state").mkdir(parents=True)
    (stray / "state" / "partial").write_bytes(b"\0" * 16)

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, metadata, step = ckpt.restore(_abstract(_weights(0)))
    assert (step, metadata) == (1, {"step": 1})
    _assert_identical(restored, _weights(1))
    assert not stray.exists()


def test_checkpoint_survives_sigkill_right_after_save(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        import jax.numpy as jnp
        from grpo_jax.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path)!r})
        ckpt.save(4, {{"w": jnp.full((4, 4), 4.0), "step": jnp.int32(4)}}, {{"step": 4}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]

    with Checkpointer(tmp_path) as ckpt:
        restored, metadata, step = ckpt.restore(_abstract(_weights(0)))
    assert (step, metadata) == (4, {"step": 4})
    _assert_identical(restored, _weights(4))


def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate_array_file(step_dir: Path):
    path = _largest_array_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_array_file(step_dir: Path):
    path = _largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "array file cut short": _truncate_array_file,
    "array file overwritten with zeros": _garble_array_file,
    "empty metadata": lambda d: (d / "metadata" / "metadata").write_text(""),
    "missing _METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "state directory gone": lambda d: __import__("shutil").rmtree(d / "state"),
}


def _random_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"params": {"w": jnp.asarray(rng.normal(size=(128, 128)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)},
            "rng": jax.random.key(step)}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_broken_latest_step_falls_back_to_the_previous_one_with_a_warning(tmp_path, corruption):
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _random_state(step), {"step": step}, force=True)
    CORRUPTIONS[corruption](tmp_path / "2")
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        expected = r"restored step 1 .* instead of the latest: step 2 is broken"
        with pytest.warns(UserWarning, match=expected) as w:
            state, metadata, step = ckpt.restore(_abstract(_random_state(1)))
        assert (step, metadata) == (1, {"step": 1})
        _assert_identical(state, _random_state(1))
        moved = [p.name for p in tmp_path.iterdir() if p.name.startswith("broken-2-")]
        assert len(moved) == 1 and moved[0] in str(w[0].message)
        assert ckpt.all_steps() == [1]
        # The run goes on and writes step 2 again.
        assert ckpt.save(2, _random_state(3), {"step": 2}, force=True)
    with Checkpointer(tmp_path) as ckpt:
        state, _, step = ckpt.restore(_abstract(_random_state(3)))
    assert step == 2
    _assert_identical(state, _random_state(3))


def test_no_readable_step_is_a_clear_error_saying_what_to_delete(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _random_state(1), {"step": 1}, force=True)
    _truncate_array_file(tmp_path / "1")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as error:
        ckpt.restore(_abstract(_random_state(1)))
    assert f"no readable checkpoint in {tmp_path}: step 1:" in str(error.value)
    assert f"Delete {tmp_path} to start the run over" in str(error.value)
    # An explicit step is never replaced by another one.
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match="step 1 in .* cannot be rest"):
        ckpt.restore(_abstract(_random_state(1)), step=1)


def test_non_finite_arrays_are_neither_saved_nor_restored(tmp_path):
    bad = _random_state(2)
    bad["params"]["w"] = bad["params"]["w"].at[3, 4].set(jnp.nan)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _random_state(1), {"step": 1}, force=True)
        with pytest.raises(FloatingPointError, match=r"refusing to save step 2 .* non-finite values in "
                           r"params/w\. .* last good checkpoint is step 1"):
            ckpt.save(2, bad, {"step": 2}, force=True)
        assert ckpt.all_steps() == [1]
    # A non-finite step written by other means (Orbax directly, same layout) is refused on restore.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    manager = ocp.CheckpointManager(tmp_path, handler_registry=registry)
    stored = {"params": bad["params"], "rng": jax.random.key_data(bad["rng"])}
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(stored),
                                            metadata=ocp.args.JsonSave({"step": 2})))
    manager.wait_until_finished()
    manager.close()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        with pytest.warns(UserWarning, match=r"step 2 is broken \(FloatingPointError: non-finite values in "
                          r"params/w\)"):
            _, _, step = ckpt.restore(_abstract(_random_state(1)))
    assert step == 1
