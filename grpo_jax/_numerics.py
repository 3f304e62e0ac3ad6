"""A float32-accumulating einsum that runs on every backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` accumulated in and returned as float32.

    TPUs and GPUs multiply bfloat16 operands natively into a float32 result. The XLA CPU runtime lacks some
    of those mixed dots (it fails with "Unsupported element type for DotThunk"), so on CPU the operands are
    upcast first; products of bfloat16 values are exact in float32, so the result is the same.
    """
    if jax.default_backend() == "cpu":
        a, b = (x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x for x in (a, b))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
