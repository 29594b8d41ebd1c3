"""KV cache with a valid length per row.

Each row's tokens sit contiguously in slots [0, length). Rows may hold different lengths;
truncating a row back (a rejected speculative step) only lowers its length, since slots at
or past the length are never attended and are overwritten by the next write. Forking copies
rows, e.g. one cached prefix into several rows that then diverge (batched verification).

Text tokens written after the prompt sit at rotary position `slot + rope_delta[row]`, the
offset images introduce (transformers' `rope_deltas`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class KVCache:
    keys: tuple  # per layer (B, kv_heads, L, head_dim): the layout attention reads without transposing
    values: tuple
    lengths: jax.Array  # (B,) int32
    rope_delta: jax.Array  # (B,) int32

    @classmethod
    def create(cls, *, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
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
