"""The bf16 decode head of bench_vllm.py's model (8 x 151936 x 512) on this CPU: the package's
kernel (`dreamr_jax.kernels.cpu_bf16_head`) against XLA's head (YNNPACK), each inside `jax.jit`,
timed on the same inputs, with the kernel's result checked against a float64 product.

    .venv/bin/python scripts/bench_cpu_head.py [--rows 8] [--json out/bench_cpu_head.json]

Never part of `make test`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from dreamr_jax.bench.report import write_json
from dreamr_jax.bench.timing import time_calls
from dreamr_jax.kernels import cpu_bf16_head


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not cpu_bf16_head.available():
        print("the kernel is not available here (see dreamr_jax/kernels/cpu_bf16_head.py)")
        return 1
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((a.vocab, a.hidden), np.float32) * 0.02, jnp.bfloat16)
    hidden = jnp.asarray(rng.standard_normal((a.rows, a.hidden), np.float32), jnp.bfloat16)
    packed = cpu_bf16_head.pack(table)
    kernel = jax.jit(cpu_bf16_head.head, static_argnums=2)
    xla = jax.jit(lambda h, t: jax.lax.dot_general(h, t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    ours, theirs = np.asarray(kernel(hidden, packed, a.vocab)), np.asarray(xla(hidden, table))
    sample = rng.integers(0, a.vocab, 256)
    exact = np.asarray(hidden, np.float64) @ np.asarray(table, np.float64)[sample].T
    doc = {"rows": a.rows, "vocab": a.vocab, "hidden": a.hidden,
           "kernel_max_abs_error_vs_float64": float(np.abs(ours[:, sample] - exact).max()),
           "max_abs_difference_kernel_vs_xla": float(np.abs(ours - theirs).max())}
    table_bytes = a.vocab * a.hidden * 2
    for name, fn, args in (("kernel", kernel, (hidden, packed, a.vocab)), ("xla", xla, (hidden, table))):
        t = time_calls(lambda: fn(*args), 20, min_s=1.0)
        doc[name] = {"median_ms": t.median * 1e3, "mean_ms": t.mean * 1e3, "table_gbs": table_bytes / t.median / 1e9}
        print(f"{name:6s} median {t.median * 1e3:.2f} ms, mean {t.mean * 1e3:.2f} ms "
              f"({table_bytes / t.median / 1e9:.1f} GB/s of table)", flush=True)
    doc["ratio_xla_over_kernel"] = doc["xla"]["median_ms"] / doc["kernel"]["median_ms"]
    print(f"XLA / kernel: {doc['ratio_xla_over_kernel']:.2f}x; kernel error against float64 "
          f"{doc['kernel_max_abs_error_vs_float64']:.1e}, against XLA {doc['max_abs_difference_kernel_vs_xla']:.1e}")
    if a.json:
        write_json(a.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
