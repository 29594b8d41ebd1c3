"""Calibrate the cost model on this machine: measure what `costmodel.Hardware` needs and write it
as a hardware preset (`dreamr calibrate --out this-machine.json`; `costmodel.hardware(path)`
reads it back).

Measured, each the best of `repeats` timed calls after a warm-up (no compilation timed):

- `mem_bandwidth`: bytes read per second by a jitted sum over a large float32 array (weights
  are read, not copied, in a forward);
- `peak_flops`: FLOP/s of a jitted float32 matmul of the size given (the efficiencies are then
  1: these are the achieved rates, not datasheet peaks);
- `layer_overhead_s`, `token_overhead_s`, `call_overhead_s`: the fixed costs, from tiny random
  models whose arithmetic is negligible: a decode loop's time per iteration for 1 and 4
  decoder layers (the slope is the cost of one layer's ops, the rest the iteration's own), and
  one single-token extend call (what remains after its layers is the call's fixed cost).
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import costmodel
from .costmodel import Hardware


def _best(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / _best(lambda: total(x), repeats)


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / _best(lambda: mm(a, b), repeats)


def half_rows(peak: float, bandwidth: float, k: int = 1024, rows=(16, 32, 64, 128), repeats: int = 5) -> float:
    """Hockney's half-performance length of a (rows, k) @ (k, k) float32 matmul: the row count at
    which its compute reaches half of `peak` (median over the sizes measured). A size whose time
    the weights' bytes alone explain (`bandwidth`) is memory-bound and says nothing about the
    compute rate: it is left out (fitting on it priced one-row products far too slow)."""
    import jax
    import jax.numpy as jnp

    mm = jax.jit(jnp.matmul)
    b = jnp.ones((k, k), jnp.float32)
    halves = []
    for n in rows:
        a = jnp.ones((n, k), jnp.float32)
        t = _best(lambda a=a: mm(a, b), repeats)
        if t <= 1.25 * (k * k * 4) / bandwidth:
            continue  # memory-bound
        halves.append(n * max(peak / (2 * n * k * k / t) - 1, 0.0))  # rate = peak * n / (n + h)
    return float(np.median(halves)) if halves else 0.0


def last_level_cache_bytes() -> float:
    """The CPU's last-level cache (Linux sysfs), 0 when unknown."""
    best = 0.0
    root = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        best = max(best, float(text.rstrip("KMG")) * scale)
    return best


def tiny_spec(layers: int):
    return costmodel.spec_from_config(_tiny_config(layers), name=f"calibration {layers} layers", bits=32)


def _tiny_config(layers: int) -> dict:
    from .assets import qwen3_vl_config

    ids = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 2, "image_token_id": 5, "video_token_id": 6,
           "vision_start_token_id": 3, "vision_end_token_id": 4}
    # hidden 128: ops of the size small models really run (a 32-wide model's ops skip the thread
    # pool and cost less each); their arithmetic and bytes are priced and taken out
    return qwen3_vl_config(hidden_size=128, num_hidden_layers=layers, intermediate_size=384, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, vision_hidden_size=32, vision_depth=1, token_ids=ids)


def tiny_model(layers: int, seed: int = 0):
    """A random Qwen3-VL whose arithmetic is small next to its fixed costs."""
    from flax import nnx

    from .models.qwen_vl.config import QwenVLConfig
    from .models.qwen_vl.model import QwenVLModel

    return QwenVLModel(QwenVLConfig.from_hf(_tiny_config(layers)), rngs=nnx.Rngs(seed))


def fixed_costs(repeats: int = 5, steps: int = 64) -> dict:
    """(seconds) per decode iteration for 1 and 4 layers and per single-token extend call."""
    from .generation import Generator, prepare_batch

    out = {}
    for layers in (1, 4):
        gen = Generator(tiny_model(layers))
        batch = prepare_batch(gen.model, [[7] * 16])
        logits, cache = gen.prefill(batch, 16 + steps + 64)

        def decode(cache=cache, logits=logits, gen=gen):
            return gen.decode(cache.fork([0]), logits, max_new_tokens=steps, out_len=steps, attend_len=128)[0]

        def extend(cache=cache, gen=gen):
            return gen.extend(cache.fork([0]), np.array([[7]], np.int32), np.ones(1, np.int32), attend_len=128)[0]

        fork = _best(lambda cache=cache: cache.fork([0]).keys, repeats)
        # `steps` tokens from given logits take steps - 1 forwards (none after the last token)
        out[layers] = {"decode_iteration_s": max(_best(decode, repeats) - fork, 0.0) / (steps - 1),
                       "extend_call_s": max(_best(extend, repeats) - fork, 0.0)}
    return out


def measure(name: str = "this-cpu", repeats: int = 5) -> Hardware:
    """Measure this machine's default jax device and return it as a Hardware preset."""
    import jax

    bandwidth = read_bandwidth(repeats=repeats)
    flops = matmul_flops(repeats=repeats)
    cache = last_level_cache_bytes()
    # read bandwidth of an array a quarter of the cache's size, summed again and again
    cache_bw = read_bandwidth(mib=max(int(cache / 4 / 2**20), 1), repeats=20) if cache else 0.0
    halves = half_rows(flops, cache_bw or bandwidth, repeats=repeats)  # its 4 MiB matrix stays in cache
    fixed = fixed_costs(repeats=repeats)
    device = jax.devices()[0]
    rates = Hardware(name=name, peak_flops=flops, mem_bandwidth=bandwidth, memory=1.0, link_bandwidth=bandwidth,
                     flops_efficiency=1.0, bandwidth_efficiency=1.0, call_overhead_s=0.0, token_overhead_s=0.0,
                     flops_half_rows=halves, cache_bytes=cache, cache_bandwidth=cache_bw)
    # what the tiny models' calls would cost with no fixed cost at all (their arithmetic and bytes,
    # priced with the rates just measured): the fixed costs are what the measurement adds to it
    roofline = {layers: {"decode_iteration_s": costmodel.call_seconds(tiny_spec(layers), rates, 1, "decode",
                                                                      tokens=64, cached=16) / 64,
                         "extend_call_s": costmodel.call_seconds(tiny_spec(layers), rates, 1, "extend", tokens=1,
                                                                 cached=16)}
                for layers in (1, 4)}
    extra = {layers: {k: max(fixed[layers][k] - roofline[layers][k], 0.0) for k in fixed[layers]} for layers in (1, 4)}
    layer = max((extra[4]["decode_iteration_s"] - extra[1]["decode_iteration_s"]) / 3, 0.0)
    token = max(extra[1]["decode_iteration_s"] - layer, 0.0)
    call = max(extra[1]["extend_call_s"] - layer, 0.0)
    try:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        memory = 16 * 2**30
    notes = (f"measured by dreamr_jax.calibrate on {device.platform} ({device.device_kind}, "
             f"{os.cpu_count()} cores): read bandwidth {bandwidth / 1e9:.1f} GB/s (jitted sum of 256 MiB), "
             f"float32 matmul {flops / 1e9:.0f} GFLOP/s (1024^3), so both efficiencies are 1; half of it "
             f"at {halves:.0f} rows ((n, 1024) @ (1024, 1024)); last-level cache {cache / 2**20:.0f} MiB read at "
             f"{cache_bw / 1e9:.0f} GB/s; fixed costs from "
             f"tiny random models: decode iteration {fixed[1]['decode_iteration_s'] * 1e6:.0f} us with 1 layer, "
             f"{fixed[4]['decode_iteration_s'] * 1e6:.0f} us with 4; a 1-token extend call "
             f"{fixed[1]['extend_call_s'] * 1e6:.0f} us; the link is unused on one device")
    return Hardware(name=name, peak_flops=flops, mem_bandwidth=bandwidth, memory=memory, link_bandwidth=bandwidth,
                    flops_efficiency=1.0, bandwidth_efficiency=1.0, call_overhead_s=call, token_overhead_s=token,
                    layer_overhead_s=layer, flops_half_rows=halves, cache_bytes=cache, cache_bandwidth=cache_bw,
                    notes=notes)
