"""Memory bandwidth and matmul rate of this machine's default jax device (and of numpy and
torch beside it): the denominators of every "floor" a benchmark compares a step with.

Copies count read + write (2 x size / time); reads count the size once. Rates are the best of
`repeats` timed calls after a warm-up (`timing.best_of`).
"""

from __future__ import annotations

import gc

import numpy as np

from .timing import best_of


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes read per second by a jitted sum over a `mib` MiB float32 array (a forward reads its
    weights; it does not copy them)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / best_of(lambda: total(x), repeats)


def copy_bandwidth(mib: int, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a jitted copy of a `mib` MiB float32 array into a
    donated destination: the destination is reused, so no page faults of a fresh output are timed."""
    import jax
    import jax.numpy as jnp

    n = mib * (1 << 20) // 4
    x = jnp.ones((n,), jnp.float32)
    box = [jnp.zeros((n,), jnp.float32)]
    copy = jax.jit(lambda a, o: o.at[:].set(a), donate_argnums=1)

    def do_copy():
        box[0] = copy(x, box[0])
        return box[0]

    seconds = best_of(do_copy, repeats)
    box.clear()  # the device buffers go before the caller measures anything else
    return 2 * n * 4 / seconds


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 (n, n) @ (n, n) product: the achieved rate, not a datasheet peak."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / best_of(lambda: mm(a, b), repeats)


def host_bandwidth(mib: int, repeats: int = 5) -> dict:
    """Memory bandwidth in GB/s (1e9 bytes/s) of a CPU host, best of `repeats`, on a `mib` MiB
    float32 array: numpy `copyto` (one thread) and the jitted donated copy; reads: numpy sum
    (one thread), numpy sum of two halves on two threads, the jitted sum (XLA's threads).
    `copy_gbs` and `read_gbs` are the best of each kind."""
    out = dict(array_mib=mib, **_numpy_bandwidth(mib * (1 << 20) // 4, repeats))
    gc.collect()  # the numpy arrays are gone before jax allocates its own
    out["jax_copy_gbs"] = copy_bandwidth(mib, repeats) / 1e9
    out["jax_read_gbs"] = read_bandwidth(mib, repeats) / 1e9
    gc.collect()
    out["copy_gbs"] = max(out["numpy_copy_gbs"], out["jax_copy_gbs"])
    out["read_gbs"] = max(out["numpy_read_gbs"], out["numpy_read_2threads_gbs"], out["jax_read_gbs"])
    return out


def _numpy_bandwidth(n: int, repeats: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    nbytes = n * 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    out = {"numpy_copy_gbs": 2 * nbytes / best_of(lambda: np.copyto(dst, src), repeats) / 1e9,
           "numpy_read_gbs": nbytes / best_of(lambda: src.sum(), repeats) / 1e9}
    with ThreadPoolExecutor(2) as ex:
        halves = (src[: n // 2], src[n // 2:])
        out["numpy_read_2threads_gbs"] = nbytes / best_of(lambda: list(ex.map(np.sum, halves)), repeats) / 1e9
    return out


def peak_flops(n: int = 2048, repeats: int = 5) -> dict:
    """float32 matmul GFLOP/s of an (n, n) product in jax and in torch (CPU threads), and the best
    of both (`gflops`): the compute side of a step's floor."""
    import torch

    out = dict(n=n, jax_gflops=matmul_flops(n, repeats) / 1e9)
    a = torch.tensor(np.random.default_rng(0).standard_normal((n, n), np.float32))
    with torch.inference_mode():
        out["torch_gflops"] = 2 * n**3 / best_of(lambda: a @ a, repeats) / 1e9
    out["gflops"] = max(out["jax_gflops"], out["torch_gflops"])
    return out


def device_copy_bandwidth(mib: int = 1024, repeats: int = 5) -> dict:
    """Copy bandwidth (GB/s, read + write) of the default jax device and, when torch sees a CUDA
    device, of torch's device-to-device `copy_`; `copy_gbs` is the best of them."""
    import jax

    out = dict(array_mib=mib, device=str(jax.devices()[0]), jax_copy_gbs=copy_bandwidth(mib, repeats) / 1e9)
    try:
        import torch

        if torch.cuda.is_available():
            n = mib * (1 << 20) // 4
            a = torch.ones(n, dtype=torch.float32, device="cuda")
            b = torch.empty_like(a)

            def tcopy():
                b.copy_(a)
                torch.cuda.synchronize()

            out["torch_copy_gbs"] = 2 * n * 4 / best_of(tcopy, repeats) / 1e9
            del a, b
            torch.cuda.empty_cache()
    except ImportError:
        pass
    out["copy_gbs"] = max(v for k, v in out.items() if k.endswith("_copy_gbs"))
    return out
