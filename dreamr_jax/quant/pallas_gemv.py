"""A Pallas (GPU, Triton lowering) kernel for int4 x few-rows products: `Int4Linear` method "pallas".

The grid is (output blocks, input splits). Program (i, k) owns `block_out` output features and
walks its share of the input groups: per group it loads the packed bytes (block_out, group/2),
splits the nibbles, multiplies them with the even and odd input features, and adds
s * (part - z * sum(x_group)) to its accumulators. Each split writes its own partial sums and XLA
adds the splits up afterwards (k_splits x rows x n_out floats, negligible next to the weights).
Splitting the input keeps enough programs in flight for the down projection, whose few output
blocks would otherwise leave most of an H100's 132 SMs idle. Weights are read once, as bytes;
nothing is expanded in memory.

The Triton backend is asked for explicitly (`plt.CompilerParams`): since jax 0.10 a bare
`pallas_call` on GPU goes to Mosaic GPU, which copies whole-array operands into shared memory
and fails on a 32B projection. A test cross-lowers the kernel for CUDA on CPU to keep this so.

Status: correct in Pallas' interpreter (tests on CPU) and lowers to a Triton call for CUDA; not
yet compiled or timed on a GPU. `scripts/bench_gpu.py` times several (block_out, k_splits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK_OUTS = (64, 32)  # the default plan takes the first that divides n_out
MIN_PROGRAMS = 512  # about 4 per SM on an H100 (132 SMs); the default plan splits the input to reach it
MAX_ROWS = 8
# Measured tilings, (n_in, n_out) -> (block_out, k_splits, num_warps), used when a call does not set
# its own; `scripts/bench_gpu.py` fills it from its sweep so that decode runs the fastest tiling.
TILINGS: dict[tuple[int, int], tuple[int, int, int]] = {}


def plan(n_out: int, groups: int, block_out: int | None = None, k_splits: int | None = None) -> tuple[int, int]:
    """(block_out, k_splits) for a product; unset ones from the defaults above."""
    if block_out is None:
        block_out = next((b for b in BLOCK_OUTS if n_out % b == 0), BLOCK_OUTS[-1])
    if k_splits is None:
        blocks = max(n_out // block_out, 1)
        k_splits = next((k for k in range(1, groups + 1) if groups % k == 0 and blocks * k >= MIN_PROGRAMS), groups)
    return block_out, k_splits


def supported(n_out: int, group_size: int, rows: int, n_in: int | None = None,
              block_out: int | None = None, k_splits: int | None = None) -> bool:
    half = group_size // 2
    groups = (n_in // group_size) if n_in else 1
    block_out, k_splits = plan(n_out, groups, block_out, k_splits)
    return (n_out % block_out == 0 and half >= 16 and half & (half - 1) == 0 and rows <= MAX_ROWS
            and block_out & (block_out - 1) == 0 and groups % k_splits == 0)


def _kernel(xe_ref, xo_ref, xs_ref, w_ref, s_ref, z_ref, o_ref, *, rows: int, groups_per_split: int, half: int,
            block_out: int):
    # Whole-array refs, indexed by hand: every tile loaded is (power of two) x (power of two).
    outs = pl.ds(pl.program_id(0) * block_out, block_out)
    first = pl.program_id(1) * groups_per_split

    def body(i, acc):
        g = first + i
        cols = pl.ds(g * half, half)
        w = w_ref[outs, cols]  # (block_out, half) uint8
        lo = (w & 0xF).astype(jnp.float32)
        hi = (w >> 4).astype(jnp.float32)
        s = s_ref[outs, pl.ds(g, 1)].astype(jnp.float32)[:, 0]  # (block_out,)
        z = z_ref[outs, pl.ds(g, 1)].astype(jnp.float32)[:, 0]
        new = []
        for r in range(rows):
            part = jnp.sum(lo * xe_ref[pl.ds(r, 1), cols] + hi * xo_ref[pl.ds(r, 1), cols], axis=1)
            xsum = xs_ref[pl.ds(r, 1), pl.ds(g, 1)][0, 0]
            new.append(acc[r] + s * (part - z * xsum))
        return tuple(new)

    init = tuple(jnp.zeros((block_out,), jnp.float32) for _ in range(rows))
    acc = jax.lax.fori_loop(0, groups_per_split, body, init)
    base = pl.program_id(1) * rows
    for r in range(rows):
        o_ref[pl.ds(base + r, 1), outs] = acc[r][None, :]


@functools.partial(jax.jit, static_argnames=("group_size", "block_out", "k_splits", "num_warps", "interpret"))
def int4_gemv(x2, qweight, scales, zeros, *, group_size: int, block_out: int | None = None,
              k_splits: int | None = None, num_warps: int | None = None, interpret: bool = False):
    """x2 (rows, in) @ W (in, out) -> (rows, out) float32, W from (qweight (out, in/2) uint8, scales,
    zeros (out, groups)) as in `Int4Linear`. Unset tiling: `TILINGS` for this shape, else `plan(...)`
    and 4 warps."""
    rows, n_in = x2.shape
    n_out = qweight.shape[0]
    if block_out is None and k_splits is None and (n_in, n_out) in TILINGS:
        block_out, k_splits, tuned_warps = TILINGS[(n_in, n_out)]
        num_warps = num_warps or tuned_warps
    num_warps = num_warps or 4
    groups, half = n_in // group_size, group_size // 2
    block_out, k_splits = plan(n_out, groups, block_out, k_splits)
    if not supported(n_out, group_size, rows, n_in, block_out, k_splits):
        raise ValueError(f"int4_gemv: unsupported shape rows={rows} in={n_in} out={n_out} group={group_size} "
                         f"block_out={block_out} k_splits={k_splits}")
    pad = 1 << max(rows - 1, 0).bit_length()  # Triton tiles: power-of-two rows
    xf = jnp.pad(x2.astype(jnp.float32), ((0, pad - rows), (0, 0)))
    pairs = xf.reshape(pad, n_in // 2, 2)
    xe, xo = pairs[..., 0], pairs[..., 1]
    xs = xf.reshape(pad, groups, group_size).sum(-1)
    partial = pl.pallas_call(
        functools.partial(_kernel, rows=pad, groups_per_split=groups // k_splits, half=half, block_out=block_out),
        out_shape=jax.ShapeDtypeStruct((k_splits * pad, n_out), jnp.float32),
        grid=(n_out // block_out, k_splits),
        interpret=interpret,
        name="int4_gemv",
        compiler_params=plt.CompilerParams(num_warps=num_warps),
    )(xe, xo, xs, qweight, scales, zeros)
    return partial.reshape(k_splits, pad, n_out).sum(0)[:rows]
