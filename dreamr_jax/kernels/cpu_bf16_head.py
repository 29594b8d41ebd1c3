"""The output head of a bf16 model decoding 2-8 rows on an x86 CPU with AVX512-BF16.

XLA:CPU runs this product (8 x 151936 x 512) through YNNPACK at about 180 GFLOP/s, a third of
what the CPU's `vdpbf16ps` and memory allow; oneDNN, which vLLM calls, is no faster. This C++
kernel (`cpu_bf16_head.cc`, an XLA FFI custom call) reads a packed copy of the table and runs it
in about 4 ms against 7 (docs/BENCHMARKS.md, issue 19). No library exposes such a product to
JAX, which is why it is written here.

It is compiled with g++ on first use into a per-user cache folder and registered with
`jax.ffi`. `available()` is False (and callers keep the XLA head) when the backend is not CPU,
the CPU lacks AVX512-BF16, g++ is missing or fails, or `DREAMR_CPU_BF16_HEAD=0`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

TARGET = "dreamr_cpu_bf16_head"
MAX_ROWS = 8
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_bf16_head.cc")


def _cpu_has_avx512_bf16() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def _build() -> str:
    """The compiled library's path, building it if this source and jaxlib have not been built."""
    import jaxlib

    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + jaxlib.__version__.encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dreamr_jax", "kernels")
    lib = os.path.join(cache, f"cpu_bf16_head-{key}.so")
    if not os.path.exists(lib):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = ["g++", "-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-shared", "-fPIC", "-pthread",
               "-w", f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
            os.replace(tmp, lib)  # atomic: a concurrent build never loads half a file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered for this process (see the module docstring)."""
    if os.environ.get("DREAMR_CPU_BF16_HEAD", "1") == "0" or jax.default_backend() != "cpu":
        return False
    if not _cpu_has_avx512_bf16() or shutil.which("g++") is None:
        return False
    try:
        library = ctypes.cdll.LoadLibrary(_build())
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Bf16Head), platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        # this CPU could run the kernel, so say why it does not (XLA's slower head runs instead)
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"dreamr_jax: the CPU bf16 head kernel could not be built or loaded ({e}; "
                      f"{detail.decode(errors='replace')[-400:]}); using XLA's head", RuntimeWarning, stacklevel=2)
        return False
    return True


@jax.jit
def pack(table):
    """A (V, E) bf16 head table -> (blocks, E / 2, 16, 2) uint16 bits, V padded with zero rows to
    a multiple of 32 (two 16-row blocks per pass of the kernel)."""
    v, e = table.shape
    table = jnp.pad(table.astype(jnp.bfloat16), ((0, (-v) % 32), (0, 0)))
    blocks = table.shape[0] // 16
    packed = table.reshape(blocks, 16, e // 2, 2).transpose(0, 2, 1, 3)
    return jax.lax.bitcast_convert_type(packed, jnp.uint16)


def applies(table, rows: int) -> bool:
    """Whether a decode of `rows` rows over `table` (V, E) can use the kernel: 2-8 rows, a bf16
    table with an even E on one CPU device, and the kernel available."""
    devices = getattr(getattr(table, "sharding", None), "device_set", set())
    return (2 <= rows <= MAX_ROWS and table.dtype == jnp.bfloat16 and table.shape[1] % 2 == 0
            and len(devices) == 1 and next(iter(devices)).platform == "cpu" and available())


def head(hidden, packed, vocab: int):
    """Float32 logits (B, vocab) = hidden (B, E) bf16 times the packed table, B <= 8. Not
    differentiable (decode only)."""
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((hidden.shape[0], packed.shape[0] * 16), jnp.float32))(
        hidden.astype(jnp.bfloat16), packed)
    return out[:, :vocab]
