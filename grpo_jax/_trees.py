"""Pytree key paths as plain names, shared by the checkpoints and LoRA's param lookup."""

from __future__ import annotations

import jax


def path_names(path: tuple) -> tuple[str, ...]:
    """A pytree key path as names: ['params']['layers'][0].value -> (params, layers, 0, value)."""
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            names.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(entry.name)
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            names.append(str(entry.key))
        else:
            raise TypeError(f"unsupported pytree key {entry!r} in {jax.tree_util.keystr(path)}")
    return tuple(names)
