"""KV cache with a valid length per row.

Each row's tokens sit contiguously in slots [0, length). Rows may hold different lengths;
truncating a row back (a rejected speculative step) only lowers its length, since slots at
or past the length are never attended and are overwritten by the next write. Forking copies
rows, e.g. one cached prefix into several rows that then diverge (batched verification).

Text tokens written after the prompt sit at rotary position `slot + rope_delta[row]`, the
offset images introduce (transformers' `rope_deltas`).

A 16-bit model's cache holds its keys and values as their bits (uint16; `storage_dtype`): XLA:CPU
widens an update of a bfloat16 array to float32, converting the whole cache there and back on
every write, so a step would cost in proportion to the slots allocated; an update of a uint16
array is done in place. Attention reads the bits back as the model's dtype (a free bitcast).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def storage_dtype(dtype):
    """What a cache for `dtype` keys holds: uint16 bits for 16-bit floats (see the module's note)."""
    return jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def write_slots_of(cache, rows, slots, new):
    """One layer's `cache` (B, K, L, D) with `new` (B, S, K, D) written at (rows, :, slots); slots
    past the end are dropped, never clamped. A uint16 cache takes `new`'s bits."""
    if cache.dtype == jnp.uint16:
        if jnp.dtype(new.dtype).itemsize != 2:
            raise TypeError(f"a 16-bit cache takes 16-bit keys and values, got {new.dtype}")
        new = jax.lax.bitcast_convert_type(new, jnp.uint16)
    return cache.at[rows, :, slots].set(new.astype(cache.dtype), mode="drop")


def read_prefix(cache, n: int, dtype):
    """Slots [0, n) of one layer's cache (B, K, L, D) as `dtype` values (a uint16 cache's bits
    reinterpreted)."""
    prefix = cache[:, :, :n]
    return jax.lax.bitcast_convert_type(prefix, dtype) if cache.dtype == jnp.uint16 else prefix


@struct.dataclass
class KVCache:
    keys: tuple  # per layer (B, kv_heads, L, head_dim): the layout attention reads without transposing
    values: tuple
    lengths: jax.Array  # (B,) int32
    rope_delta: jax.Array  # (B,) int32

    @classmethod
    def create(cls, *, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        """An empty cache for a model computing in `dtype` (stored as `storage_dtype(dtype)`)."""
        shape = (batch, kv_heads, max_len, head_dim)
        store = storage_dtype(dtype)
        return cls(
            keys=tuple(jnp.zeros(shape, store) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, store) for _ in range(num_layers)),
            lengths=jnp.zeros((batch,), jnp.int32),
            rope_delta=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def truncate(self, lengths) -> "KVCache":
        """Roll rows back to `lengths` (B,) (never forward: a longer value keeps the current length)."""
        return self.replace(lengths=jnp.minimum(self.lengths, jnp.asarray(lengths, jnp.int32)))

    def with_lengths(self, lengths) -> "KVCache":
        """The same slots with row lengths set to `lengths` (B,), host values the caller knows
        (a rollback to a length it tracks, or adopting slots it knows to hold the right keys):
        no device op, the next program reads them as an input."""
        return self.replace(lengths=np.asarray(lengths, np.int32))

    def fork(self, rows) -> "KVCache":
        """A cache whose row i is a copy of this cache's row `rows[i]` (any count, repeats allowed)."""
        rows = np.asarray(rows, np.int32)
        take = lambda a: np.asarray(a)[rows] if isinstance(a, np.ndarray) else jnp.take(a, rows, axis=0)  # noqa: E731
        return jax.tree.map(take, self)  # host lengths stay host arrays

    def grow(self, max_len: int) -> "KVCache":
        """The same cache with room for `max_len` slots (pads with zeros; never shrinks)."""
        extra = max_len - self.max_len
        if extra <= 0:
            return self
        pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0)))  # noqa: E731
        return self.replace(keys=tuple(map(pad, self.keys)), values=tuple(map(pad, self.values)))
