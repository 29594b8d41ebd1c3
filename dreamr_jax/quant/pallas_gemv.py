"""A Pallas (GPU, Triton lowering) kernel for int4 x few-rows products: `Int4Linear` method "pallas".

Each program owns `block_out` output features and walks the input one group at a time: it loads
the group's packed bytes (block_out, group/2), splits the nibbles, multiplies them with the even
and odd input features, and adds s * (part - z * sum(x_group)) to its accumulators. Weights are
read once, as bytes; nothing is expanded in memory.

Status: correct in Pallas' interpreter (tests on CPU); not yet compiled or timed on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_OUT = 32


def supported(n_out: int, group_size: int, rows: int) -> bool:
    half = group_size // 2
    return n_out % BLOCK_OUT == 0 and half >= 16 and half & (half - 1) == 0 and rows <= 8


def _kernel(xe_ref, xo_ref, xs_ref, w_ref, s_ref, z_ref, o_ref, *, rows: int, groups: int, half: int):
    # Whole-array refs, indexed by hand: every tile loaded is (power of two) x (power of two).
    o0 = pl.program_id(0) * BLOCK_OUT
    outs = pl.ds(o0, BLOCK_OUT)

    def body(g, acc):
        cols = pl.ds(g * half, half)
        w = w_ref[outs, cols]  # (BLOCK_OUT, half) uint8
        lo = (w & 0xF).astype(jnp.float32)
        hi = (w >> 4).astype(jnp.float32)
        s = s_ref[outs, pl.ds(g, 1)].astype(jnp.float32)[:, 0]  # (BLOCK_OUT,)
        z = z_ref[outs, pl.ds(g, 1)].astype(jnp.float32)[:, 0]
        new = []
        for r in range(rows):
            part = jnp.sum(lo * xe_ref[pl.ds(r, 1), cols] + hi * xo_ref[pl.ds(r, 1), cols], axis=1)
            xsum = xs_ref[pl.ds(r, 1), pl.ds(g, 1)][0, 0]
            new.append(acc[r] + s * (part - z * xsum))
        return tuple(new)

    init = tuple(jnp.zeros((BLOCK_OUT,), jnp.float32) for _ in range(rows))
    acc = jax.lax.fori_loop(0, groups, body, init)
    for r in range(rows):
        o_ref[pl.ds(r, 1), outs] = acc[r][None, :]


@functools.partial(jax.jit, static_argnames=("group_size", "interpret"))
def int4_gemv(x2, qweight, scales, zeros, *, group_size: int, interpret: bool = False):
    """x2 (rows, in) @ W (in, out) -> (rows, out) float32, W from (qweight (out, in/2) uint8, scales,
    zeros (out, groups)) as in `Int4Linear`."""
    rows, n_in = x2.shape
    n_out = qweight.shape[0]
    groups, half = n_in // group_size, group_size // 2
    pad = 1 << max(rows - 1, 0).bit_length()  # Triton tiles: power-of-two rows
    xf = jnp.pad(x2.astype(jnp.float32), ((0, pad - rows), (0, 0)))
    pairs = xf.reshape(pad, n_in // 2, 2)
    xe, xo = pairs[..., 0], pairs[..., 1]
    xs = xf.reshape(pad, groups, group_size).sum(-1)
    out = pl.pallas_call(
        functools.partial(_kernel, rows=pad, groups=groups, half=half),
        out_shape=jax.ShapeDtypeStruct((pad, n_out), jnp.float32),
        grid=(n_out // BLOCK_OUT,),
        interpret=interpret,
        name="int4_gemv",
    )(xe, xo, xs, qweight, scales, zeros)
    return out[:rows]
