"""Save, restore and resume the whole train state with Orbax's CheckpointManager.

One checkpoint is the directory `<directory>/<step>/` with two items:

  state/      the array pytree (params, optimizer state, step, PRNG keys), written by every process from
              whatever mesh it lives on and read back onto whatever sharding the caller asks for
  metadata/   a JSON dict (config, data-iterator position, ...)

Orbax writes a step to `<step>.orbax-checkpoint-tmp-<time>/` and renames it on commit, so a crash mid-save
leaves the previous step as the latest; leftover temporary directories are deleted when a Checkpointer opens
the directory. Saves are synchronous: when `save` returns, the checkpoint is complete on disk.

A committed step can still be unreadable later (a disk fault, a file cut short, a copy that was
interrupted) or hold non-finite arrays. `restore()` of the latest step then falls back to the newest step
that reads back whole and finite, warns naming both steps, and moves each broken step aside to
`<directory>/broken-<step>-<time>/` (kept for inspection; the run will write that step again). With no good
step left it raises `CheckpointError` saying which directory to delete. `save` refuses non-finite arrays, so
a diverged run cannot overwrite its last good checkpoint.

The state is stored as a nested dict keyed by its pytree path (`params/layers/0/attn/q/kernel/value`), so
any pytree (nnx.State, optax namedtuples, dicts, tuples) round-trips: `restore` rebuilds the caller's own
structure from `abstract_state`. Typed PRNG keys are stored as their uint32 key data and re-wrapped on
restore, with the key type the abstract state asks for.

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, save_interval_steps=100)
    if ckpt.latest_step() is not None:
        state, metadata, step = ckpt.restore(abstract_state)
    ...
    ckpt.save(step, state, {"config": config.to_dict(), "examples_seen": n})
    ckpt.close()
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from grpo_jax._trees import path_names

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_MAX_LISTED = 8  # paths named in one error message


class CheckpointMismatchError(ValueError):
    """The caller's abstract state does not match a readable checkpoint (a different model or optimizer):
    the caller's mistake, never a reason to fall back to an older step."""


class CheckpointError(RuntimeError):
    """No checkpoint in the directory can be read back whole and finite."""


def _is_key(leaf: Any) -> bool:
    """Whether `leaf` (an array or ShapeDtypeStruct) is a new-style typed PRNG key array."""
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _canonical(dtype: Any) -> np.dtype:
    """The dtype JAX gives `dtype` (int64 -> int32 unless x64 is on): Python scalars are saved as 64-bit."""
    return jax.dtypes.canonicalize_dtype(dtype)


def _named_leaves(tree: PyTree, what: str) -> dict[tuple[str, ...], Any]:
    """The leaves of `tree` keyed by their path names, in flattening order."""
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = path_names(path)
        if names in leaves:
            raise ValueError(f"{what}: two leaves share the path {'/'.join(names)!r} (e.g. keys 0 and '0'); "
                             "rename one of them.")
        leaves[names] = leaf
    return leaves


def _nest(leaves: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """{(a, b): x, (a, c): y} -> {a: {b: x, c: y}}: the layout Orbax stores."""
    nested: dict[str, Any] = {}
    for names, leaf in leaves.items():
        node = nested
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return nested


def _brief(error: BaseException) -> str:
    """An exception as one short line for a warning: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def _nonfinite(leaves: dict[tuple[str, ...], Any]) -> list[str]:
    """Paths of the floating-point leaves holding a NaN or an infinity (one device reduction for all)."""
    floats = {names: x for names, x in leaves.items()
              if jnp.issubdtype(getattr(x, "dtype", np.float32), jnp.inexact) and np.size(x)}
    if not floats:
        return []
    finite = _all_finite(list(floats.values()))
    finite = np.asarray(finite.addressable_data(0)) if isinstance(finite, jax.Array) else finite
    return ["/".join(names) for names, ok in zip(floats, finite, strict=True) if not ok]


def _listing(items: list[str]) -> str:
    """At most _MAX_LISTED items, joined for an error message."""
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


class Checkpointer:
    """Numbered checkpoints of (array pytree, JSON metadata) in one directory, the newest `max_to_keep` kept.

    Every process of a multi-host job must create it on the same (shared) directory and call `save` and
    `restore` together; Orbax writes each process's shards and lets the primary process write the metadata.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, save_interval_steps: int = 1):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (the number of checkpoints kept).")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1; use 1 to save at "
                             "every step passed to save().")
        self.directory = Path(directory).absolute()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, args in ((_STATE, ocp.args.StandardSave), (_STATE, ocp.args.StandardRestore),
                           (_STATE, ocp.args.PyTreeRestore),
                           (_METADATA, ocp.args.JsonSave), (_METADATA, ocp.args.JsonRestore)):
            registry.add(item, args)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def latest_step(self) -> int | None:
        """The newest committed step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first."""
        return sorted(self._manager.all_steps())

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata saved with `step` (default: the latest), without reading any array."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{_METADATA: ocp.args.JsonRestore()}))
        if not isinstance(restored[_METADATA], dict):
            raise ValueError(f"step {step} in {self.directory}: metadata is not a dict")
        return restored[_METADATA]

    def stored_paths(self, step: int | None = None) -> list[str]:
        """The paths of the arrays saved at `step` (default: the latest), e.g. "params/embed/value",
        read from the checkpoint's metadata without loading any array."""
        step = self.latest_step() if step is None else step
        tree = self._manager.metadata(step).item_metadata[_STATE].tree
        return ["/".join(path_names(path)) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

    def save(self, step: int, state: PyTree, metadata: dict, *, force: bool = False) -> bool:
        """Save the array pytree `state` and the JSON-able `metadata` as one checkpoint at `step`.

        `state` holds jax arrays (possibly sharded over a mesh, typed PRNG keys included) and scalars.
        Returns whether it saved: without `force`, only when `step` is a multiple of `save_interval_steps`
        and newer than the latest checkpoint. Blocks until the checkpoint is committed on disk, so a process
        killed right after `save` returns keeps it.
        """
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}; "
                            "wrap it: {'value': ...}.")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata is not JSON-serialisable ({e}); convert it to dicts, lists, str, "
                            "int, float, bool and None (e.g. config.to_dict()).") from e
        leaves = _named_leaves(state, "state")
        stored = {names: jax.random.key_data(leaf) if _is_key(leaf) else leaf
                  for names, leaf in leaves.items()}
        bad = _nonfinite(stored)
        if bad:
            raise FloatingPointError(f"refusing to save step {step} to {self.directory}: non-finite values "
                                     f"in {_listing(bad)}. The run diverged; the last good checkpoint is "
                                     f"step {self.latest_step()}. Lower the learning rate or check the loss.")
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(_nest(stored)),
                                     _METADATA: ocp.args.JsonSave(metadata)})
        saved = self._manager.save(step, args=args, force=force)
        self._manager.wait_until_finished()
        return saved

    def restore(self, abstract_state: PyTree, step: int | None = None, *, partial: bool = False
                ) -> tuple[PyTree, dict, int]:
        """Restore (state, metadata, step) from `step` (default: the latest readable one).

        With `partial`, `abstract_state` may be a part of the saved tree (e.g. `{"params": ...}` alone, for
        evaluation): only that part is read.

        `abstract_state` has the structure of the saved state with jax.ShapeDtypeStruct leaves that carry a
        `.sharding` (or real arrays, whose shape, dtype and sharding are used): each array comes back with
        that sharding, on any mesh, not only the one it was saved from. A structure, shape or dtype that
        differs from the checkpoint raises CheckpointMismatchError naming the paths, before any array is read.

        Without `step`, a latest step that cannot be read back (or holds non-finite values) is moved aside
        with a warning and the next older one is tried; CheckpointError when none is left. An explicit
        `step` that cannot be read raises CheckpointError.
        """
        abstract = _named_leaves(abstract_state, "abstract_state")  # the caller's errors, raised first
        targets = {names: self._target(names, leaf) for names, leaf in abstract.items()}
        if step is not None:
            if step not in self._manager.all_steps():
                raise FileNotFoundError(f"no checkpoint for step={step} in {self.directory}; available "
                                        f"steps: {self.all_steps()}.")
            try:
                return self._restore_step(abstract_state, targets, step, partial)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure to read a step means it is broken
                raise CheckpointError(f"step {step} in {self.directory} cannot be restored: "
                                      f"{_brief(error)}") from error
        steps = self.all_steps()[::-1]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; save one first, or check the "
                                    "directory (e.g. --workdir) is the one the run wrote to.")
        broken = []
        for candidate in steps:
            try:
                restored = self._restore_step(abstract_state, targets, candidate, partial)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure to read a step means it is broken
                broken.append((candidate, _brief(error)))
                continue
            if broken:
                moved = self._move_aside([s for s, _ in broken])
                warnings.warn(
                    f"restored step {candidate} of {self.directory} instead of the latest: "
                    + "; ".join(f"step {s} is broken ({why}), moved to {m}"
                                for (s, why), m in zip(broken, moved, strict=True)), stacklevel=2)
            return restored
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why}" for s, why in broken)
            + f". Delete {self.directory} to start the run over (or restore it from a backup).")

    def _restore_step(self, abstract_state: PyTree, targets: dict, step: int, partial: bool
                      ) -> tuple[PyTree, dict, int]:
        abstract = _named_leaves(abstract_state, "abstract_state")
        self._check_matches(step, targets, partial=partial)
        if partial:
            restore_args = {names: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                        dtype=t.dtype) for names, t in targets.items()}
            state_args = ocp.args.PyTreeRestore(_nest(targets), restore_args=_nest(restore_args),
                                                partial_restore=True)
        else:
            state_args = ocp.args.StandardRestore(_nest(targets))
        args = ocp.args.Composite(**{_STATE: state_args, _METADATA: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        if not isinstance(restored[_METADATA], dict):
            raise ValueError(f"metadata is {type(restored[_METADATA]).__name__}, not a dict")
        values = {}
        for names in abstract:
            value = restored[_STATE]
            for name in names:
                value = value[name]
            values[names] = value
        bad = _nonfinite(values)
        if bad:
            raise FloatingPointError(f"non-finite values in {_listing(bad)}")
        leaves = [jax.random.wrap_key_data(values[n], dtype=leaf.dtype) if _is_key(leaf) else values[n]
                  for n, leaf in abstract.items()]
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_state), leaves)
        return state, restored[_METADATA], step

    def _move_aside(self, steps: list[int]) -> list[Path]:
        """Rename broken step directories out of Orbax's view (process 0; every process waits for it)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = [self.directory / f"broken-{step}-{stamp}" for step in steps]
        if jax.process_index() == 0:
            for step, target in zip(steps, moved, strict=True):
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("grpo_jax checkpoint: broken steps moved aside")
        self._manager.reload()
        return moved

    def close(self):
        """Wait for pending work and release Orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info):
        self.close()

    @staticmethod
    def _target(names: tuple[str, ...], leaf: Any) -> jax.ShapeDtypeStruct:
        """What Orbax restores for one abstract leaf: its shape, dtype, sharding (key data for PRNG keys)."""
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(leaf, jax.ShapeDtypeStruct | jax.Array) or sharding is None:
            raise ValueError(f"abstract_state leaf {'/'.join(names)!r} is {type(leaf).__name__} without a "
                             "sharding; pass jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, "
                             "spec)) or a jax.Array for every leaf.")
        if _is_key(leaf):
            return jax.ShapeDtypeStruct(jax.eval_shape(jax.random.key_data, leaf).shape, "uint32",
                                        sharding=sharding)
        return jax.ShapeDtypeStruct(leaf.shape, _canonical(leaf.dtype), sharding=sharding)

    def _check_matches(self, step: int, targets: dict[tuple[str, ...], jax.ShapeDtypeStruct], *,
                       partial: bool = False):
        """Raise ValueError naming each path whose presence, shape or dtype differs from the checkpoint."""
        tree = self._manager.metadata(step).item_metadata[_STATE].tree
        saved = {path_names(path): meta for path, meta in jax.tree_util.tree_flatten_with_path(tree)[0]}
        missing = ["/".join(p) for p in targets if p not in saved]
        unexpected = [] if partial else ["/".join(p) for p in saved if p not in targets]
        problems = []
        if missing:
            problems.append(f"in abstract_state but not in the checkpoint: {_listing(missing)}")
        if unexpected:
            problems.append(f"in the checkpoint but not in abstract_state: {_listing(unexpected)}")
        differing = []
        for path, want in targets.items():
            have = saved.get(path)
            if have is not None and (tuple(have.shape), _canonical(have.dtype)) != (want.shape, want.dtype):
                differing.append(f"{'/'.join(path)} (checkpoint {have.dtype}{list(have.shape)}, "
                                 f"abstract_state {want.dtype}{list(want.shape)})")
        if differing:
            problems.append(f"shape or dtype differs: {_listing(differing)}")
        if problems:
            raise CheckpointMismatchError(f"abstract_state does not match the checkpoint at step {step} in "
                             f"{self.directory}: " + "; ".join(problems) + ". Build abstract_state from the "
                             "same model config and optimizer as the saved run (PRNG keys are compared as "
                             "their uint32 key data).")
