"""`Int4Linear`: a linear layer whose weights stay 4-bit in device memory.

Held per layer: `qweight` uint8 (out, in/2), two 4-bit values per byte (q[o, 2k] in the low
nibble of byte k), `scales` (out, groups) and `zeros` uint8 (out, groups); W = (q - z) * s over
groups of `group_size` consecutive input features. Dequantization happens inside the jitted
computation that uses the weight; nothing 16-bit is stored.

The call interface is the dense `Linear`'s (x (..., in) -> (..., out), optional bias), so any
decoder projection can be either. Calls with more than `small_rows` rows (prefill, checks) always
expand the weight and run one matmul ("dequant"), which is compute-bound there anyway; `method`
(static, part of the graph definition) picks how calls with at most `small_rows` rows (decode)
compute the product:

* "dequant": expand the whole weight to x's dtype inside the program, then one matmul. The
  reference path.
* "reduce": for a few rows (decode): per group, sum_j x_j * q_oj as a fused multiply-reduce in
  float32 reading the packed bytes, then y_o = sum_g s_og * (part_og - z_og * sum_j x_j).
  Nothing the size of the weight is written, so XLA can fuse the unpacking into the reduction.
* "int4dot": the same factorisation with the per-group products as batched dots on the
  unpacked nibbles (converted to x's dtype), for XLA to fuse the conversion into the matmul.
* "u4dequant": `dequant`, but the nibbles are read through a uint4 view of the packed bytes (no
  shifts, no interleave), the form XLA GPU's int4 GEMM fusion recognises: expansion inside the
  matmul's operand load instead of a weight-sized intermediate.
* "u4dot": `int4dot` on the same uint4 view.
* "pallas": a Pallas GPU kernel (`pallas_gemv.py`) that reads the packed bytes once per call;
  run by Pallas' interpreter on CPU. On TPU, and for shapes it does not support, it falls back
  to "reduce".
* "auto": the backend's choice (`SMALL_ROW_METHOD`).

The per-group forms multiply every row by every weight element outside a matmul unit, so they
are for decode only: above `small_rows` rows they would be slow (and on CPU memory-hungry).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .formats import dequantize

METHODS = ("auto", "dequant", "reduce", "int4dot", "u4dequant", "u4dot", "pallas")
SMALL_ROWS = 4
# The method "auto" uses for decode-sized inputs, per backend. CPU: "dequant" measured fastest
# (scripts/bench_gpu.py --shapes cpu). GPU: "reduce", which XLA fuses (0.59 bytes touched per
# weight on an H100); "pallas" is still to be timed against it there.
SMALL_ROW_METHOD = {"cpu": "dequant", "gpu": "reduce", "cuda": "reduce", "rocm": "reduce", "tpu": "reduce"}


class Int4Weight(nnx.Variable):
    """Packed int4 weights, group scales and zeros. Not an `nnx.Param`: optimizers leave them alone."""


class Int4Linear(nnx.Module):
    """y = x @ W (+ bias) with W (in, out) stored as 4-bit values with per-group scales and zeros."""

    def __init__(self, n_in: int, n_out: int, *, group_size: int, bias: bool, dtype, rngs: nnx.Rngs,
                 scale_dtype=jnp.float16, method: str = "auto", small_rows: int = SMALL_ROWS):
        if method not in METHODS:
            raise ValueError(f"Int4Linear method '{method}' is not one of {METHODS}")
        if group_size <= 0 or n_in % group_size or group_size % 2:
            raise ValueError(f"Int4Linear: {n_in} input features do not split into even groups of {group_size}")
        groups = n_in // group_size
        # Random init (benchmarks, eval_shape); a checkpoint replaces all three. q uniform in 0..15 around
        # z = 8 has std ~4.6, so this scale gives weights of std ~0.02 like the dense init.
        self.qweight = Int4Weight(jax.random.randint(rngs.params(), (n_out, n_in // 2), 0, 256,
                                                     jnp.int32).astype(jnp.uint8))
        self.scales = Int4Weight(jnp.full((n_out, groups), 0.02 / 4.6, scale_dtype))
        self.zeros = Int4Weight(jnp.full((n_out, groups), 8, jnp.uint8))
        self.bias = nnx.Param(jnp.zeros((n_out,), dtype)) if bias else None
        self.n_in, self.n_out, self.group_size = n_in, n_out, group_size
        self.method = method
        self.small_rows = small_rows

    @property
    def n_groups(self) -> int:
        return self.n_in // self.group_size

    def dequantize(self, dtype=jnp.float32):
        """The dense matrix W (in, out) of y = x @ W (`Linear.weight` holds its transpose)."""
        return self._weight_out_in(dtype).T

    def _weight_out_in(self, dtype):
        p = self.qweight[...]
        q = jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(self.n_out, self.n_in)
        return dequantize(q, self.zeros[...], self.scales[...]).astype(dtype)

    def _combine(self, part_rog, x_rgj):
        """y_ro = sum_g s_og * (part_rog - z_og * sum_j x_rgj), float32."""
        xs = jnp.sum(x_rgj.astype(jnp.float32), axis=-1)
        s = self.scales[...].astype(jnp.float32)
        z = self.zeros[...].astype(jnp.float32)
        return jnp.sum(s[None] * (part_rog - z[None] * xs[:, None, :]), axis=-1)

    def _reduce(self, x2):
        rows, g, h = x2.shape[0], self.n_groups, self.group_size // 2
        xf = x2.astype(jnp.float32).reshape(rows, g, h, 2)
        p = self.qweight[...].reshape(self.n_out, g, h)
        lo, hi = (p & 0xF).astype(jnp.float32), (p >> 4).astype(jnp.float32)
        part = jnp.sum(xf[:, None, :, :, 0] * lo[None] + xf[:, None, :, :, 1] * hi[None], axis=-1)
        return self._combine(part, xf.reshape(rows, g, -1))

    def _int4dot(self, x2):
        # Shifts, not a bitcast to uint4: XLA CPU (jax 0.10) constant-folds uint4 bitcasts wrongly
        # when the weights are compile-time constants.
        rows, g, h = x2.shape[0], self.n_groups, self.group_size // 2
        cdt = x2.dtype
        p = self.qweight[...].reshape(self.n_out, g, h)
        xf = x2.reshape(rows, g, h, 2)
        part = (jnp.einsum("rgj,ogj->rog", xf[..., 0], (p & 0xF).astype(cdt), preferred_element_type=jnp.float32)
                + jnp.einsum("rgj,ogj->rog", xf[..., 1], (p >> 4).astype(cdt), preferred_element_type=jnp.float32))
        return self._combine(part, xf.reshape(rows, g, -1))

    def _nibbles(self, dtype):
        """q (out, groups, group_size) in `dtype`, read through a uint4 view of the packed bytes. The
        view puts the low nibble first, which is the storage order (byte k = q[2k] | q[2k+1] << 4)."""
        p = self.qweight[...]
        if jax.default_backend() == "cpu":
            # XLA CPU constant-folds a uint8 -> uint4 bitcast of compile-time-constant weights
            # wrongly (jax 0.10: [0x21, 0x43] -> [1, 3, 0, 0]); the barrier keeps it a runtime op.
            p = jax.lax.optimization_barrier(p)
        q = jax.lax.bitcast_convert_type(p, jnp.uint4)  # (out, in/2, 2)
        return q.reshape(self.n_out, self.n_groups, self.group_size).astype(dtype)

    def _u4dequant(self, x2):
        w = dequantize(self._nibbles(jnp.float32), self.zeros[...], self.scales[...]).astype(x2.dtype)
        return jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())))

    def _u4dot(self, x2):
        rows, g = x2.shape[0], self.n_groups
        xg = x2.reshape(rows, g, self.group_size)
        part = jnp.einsum("rgj,ogj->rog", xg, self._nibbles(x2.dtype), preferred_element_type=jnp.float32)
        return self._combine(part, xg)

    def _pallas(self, x2):
        from . import pallas_gemv

        # A Triton kernel: GPUs, or Pallas' interpreter on CPU; TPUs (and unsupported shapes) use "reduce".
        if jax.default_backend() == "tpu" or not pallas_gemv.supported(self.n_out, self.group_size, x2.shape[0],
                                                                         self.n_in):
            return self._reduce(x2)
        return pallas_gemv.int4_gemv(x2, self.qweight[...], self.scales[...], self.zeros[...],
                                     group_size=self.group_size, interpret=jax.default_backend() == "cpu")

    def _dequant(self, x2):
        w = self._weight_out_in(x2.dtype)
        return jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())))

    def resolved_method(self, rows: int) -> str:
        if rows > self.small_rows:
            return "dequant"
        if self.method != "auto":
            return self.method
        return SMALL_ROW_METHOD.get(jax.default_backend(), "dequant")

    def __call__(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.n_in)
        method = self.resolved_method(x2.shape[0])
        y = {"dequant": self._dequant, "reduce": self._reduce, "int4dot": self._int4dot,
             "u4dequant": self._u4dequant, "u4dot": self._u4dot, "pallas": self._pallas}[method](x2)
        y = y.astype(x.dtype).reshape(*lead, self.n_out)
        return y + self.bias[...] if self.bias is not None else y


# ---- helpers over a whole model --------------------------------------------------------------------


def int4_linears(model) -> list[tuple[tuple, Int4Linear]]:
    """(path, module) of every Int4Linear in a model."""
    return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, Int4Linear)]


def set_int4_method(model, method: str, small_rows: int | None = None) -> int:
    """Switch every Int4Linear's small-row method (and optionally its `small_rows` threshold); re-split
    the model afterwards (e.g. `Generator.refresh()`). Returns how many layers changed."""
    if method not in METHODS:
        raise ValueError(f"Int4Linear method '{method}' is not one of {METHODS}")
    found = int4_linears(model)
    for _, m in found:
        m.method = method
        if small_rows is not None:
            m.small_rows = small_rows
    return len(found)


def state_bytes(model) -> dict:
    """Device bytes of the model state: int4 tensors (packed weights + scales + zeros), everything else, and
    what the int4 linears' weights would take as float16 (`int4_as_float16`)."""
    int4 = other = dense_f16 = 0
    for _, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        nbytes = int(np.prod(value.shape)) * jnp.dtype(value.dtype).itemsize
        if isinstance(var, Int4Weight):
            int4 += nbytes
        else:
            other += nbytes
    for _, m in int4_linears(model):
        dense_f16 += m.n_in * m.n_out * 2
    return dict(int4=int4, other=other, total=int4 + other, int4_as_float16=dense_f16)
