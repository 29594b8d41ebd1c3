"""Calibrate the cost model on this machine: measure what `costmodel.Hardware` needs and write it
as a hardware preset (`dreamr calibrate --out this-machine.json`; `costmodel.hardware(path)`
reads it back).

Measured, each the best of `repeats` timed calls after a warm-up (no compilation timed):

- `mem_bandwidth`: bytes read per second by a jitted sum over a large float32 array (weights
  are read, not copied, in a forward);
- `peak_flops`: FLOP/s of a jitted float32 matmul of the size given (the efficiencies are then
  1: these are the achieved rates, not datasheet peaks);
- `matmul_table`: the seconds of one product inside a compiled chain on a grid of row counts and
  widths: a CPU's small products run far below the 1024^3 rate (and a one-row product costs about
  its launch), and those are the products a small model's forward is made of;
- `cache_bytes`, `cache_bandwidth`: the last-level cache (sysfs) and its read bandwidth;
- `layer_overhead_s`, `token_overhead_s`, `call_overhead_s`: the fixed costs, from tiny random
  models whose arithmetic is negligible: a decode loop's time per iteration for 1 and 4
  decoder layers (the slope is the cost of one layer's ops, the rest the iteration's own), and
  one single-token extend call (what remains after its layers is the call's fixed cost).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from . import costmodel
# rates and times measured as the benchmarks measure them (calibrate.read_bandwidth stays a public name)
from .bench.bandwidth import matmul_flops, read_bandwidth
from .bench.timing import best_of
from .costmodel import Hardware


TABLE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TABLE_WIDTHS = (64, 128, 256, 512, 1024, 2048)
HUGE_BYTES = 64 * 2**20


def matmul_table(shapes=(), rows=TABLE_ROWS, widths=TABLE_WIDTHS, copies: int = 4, repeats: int = 5) -> tuple:
    """(rows, n_in, n_out, seconds) of one (rows, n_in) @ (n_in, n_out) float32 product, for square
    products of each width in `widths` and for each (n_in, n_out) in `shapes` (a model's own weight
    shapes: `model_shapes`), each at every row count in `rows`.

    Measured the way a forward runs them: each shape with its transpose, as a layer's down
    projection follows its up projection (x = x + (x @ W) @ V, `copies` distinct pairs), inside a
    jitted loop, timed at two loop lengths so the call's dispatch and the loop's start cancel.
    XLA's CPU backend picks its kernel by context (a one-row product inside a loop runs as a
    plain dot in about a microsecond, the same product alone as a library call in several), so a
    product timed alone would price a decode loop's products wrongly. A product too large for that
    (an output head over HUGE_BYTES) is timed alone, up to 64 rows, the dispatch negligible beside
    it. Timing noise is then smoothed where it breaks what must hold: at one shape, more rows never
    cost less (`monotone`, a least-squares fit in log time)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def looped(iterations):
        def run(x, ws, vs):
            def body(_, x):
                for w, v in zip(ws, vs):
                    x = x + (x @ w) @ v
                return x
            return lax.fori_loop(0, iterations, body, x)
        return jax.jit(run)

    short, long = looped(2), looped(6)
    alone = jax.jit(jnp.matmul)
    wanted = {(w, w) for w in widths} | {(int(i), int(o)) for i, o in shapes}
    table = []
    for n_in, n_out in sorted({tuple(sorted(s)) for s in wanted}):  # a shape and its transpose: one pair
        key = jax.random.PRNGKey(n_in * 7919 + n_out)
        if n_in * n_out * 4 > HUGE_BYTES:
            for i, o in {(n_in, n_out), (n_out, n_in)} & wanted:
                w = jax.random.normal(key, (i, o), jnp.float32)
                times = [best_of(lambda x=jnp.ones((n, i), jnp.float32): alone(x, w), repeats) for n in rows if n <= 64]
                table += [(n, i, o, t) for n, t in zip(rows, monotone(times))]
            continue
        k = int(min(copies, max(1, HUGE_BYTES // (2 * n_in * n_out * 4))))
        keys = jax.random.split(key, 2 * k)
        # scaled so that x stays bounded through the loop's residual updates
        ws = [jax.random.normal(kk, (n_in, n_out), jnp.float32) / (4 * n_in ** 0.5) for kk in keys[:k]]
        vs = [jax.random.normal(kk, (n_out, n_in), jnp.float32) / (4 * n_out ** 0.5) for kk in keys[k:]]
        times = []
        for n in rows:
            x = jnp.ones((n, n_in), jnp.float32)
            t_short, t_long = best_of(lambda: short(x, ws, vs), repeats), best_of(lambda: long(x, ws, vs), repeats)
            # 4 more iterations of k pairs; (the floor: noise must not give <= 0)
            times.append(max((t_long - t_short) / (4 * 2 * k), t_long / (6 * 2 * k) / 10))
        smooth = monotone(times)
        for i, o in {(n_in, n_out), (n_out, n_in)}:
            table += [(n, i, o, t) for n, t in zip(rows, smooth)]
    return tuple(table)


def monotone(times) -> list[float]:
    """The non-decreasing sequence nearest to `times` in log time (least squares: pool adjacent
    violators), so one noisy point is averaged with its neighbours instead of carried upward."""
    blocks = []  # [mean log time, count]
    for t in times:
        blocks.append([float(np.log(t)), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (a, n), (b, m) = blocks[-2], blocks.pop()
            blocks[-1] = [(a * n + b * m) / (n + m), n + m]
    return [float(np.exp(v)) for v, n in blocks for _ in range(n)]


def model_shapes(specs) -> set:
    """The distinct weight shapes (n_in, n_out) of the text layers, head, vision blocks and mergers
    of `costmodel.ModelSpec`s, as one device holds them."""
    shapes = set()
    for m in specs:
        shapes |= set(m.attention_shapes + m.mlp_shapes + m.vision_block_shapes + m.merger_shapes)
        shapes |= {(m.hidden, m.vocab), (m.patch_dim, m.vision_hidden)}
    return shapes


def _rate(table, rows: int, width: int) -> float:
    return next(2 * r * i * o / t for r, i, o, t in table if (r, i, o) == (rows, width, width))


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


WIDE_EXTENDS = (16, 32, 64, 96)  # extend calls whose time beyond a 1-token one prices activations


def fixed_costs(repeats: int = 5, steps: int = 64) -> dict:
    """(seconds) per decode iteration for 1 and 4 layers, per single-token extend call, and per
    extend call of each of `WIDE_EXTENDS` tokens ("extend_wide_s": {tokens: seconds})."""
    from .generation import Generator, prepare_batch

    out = {}
    for layers in (1, 4):
        gen = Generator(tiny_model(layers))
        batch = prepare_batch(gen.model, [[7] * 16])
        logits, cache = gen.prefill(batch, 16 + steps + 64)

        def decode(cache=cache, logits=logits, gen=gen):
            return gen.decode(cache.fork([0]), logits, max_new_tokens=steps, out_len=steps, attend_len=128)[0]

        def extend(cache=cache, gen=gen, n=1):
            return gen.extend(cache.fork([0]), np.full((1, n), 7, np.int32), np.array([n], np.int32),
                              attend_len=128)[0]

        fork = best_of(lambda cache=cache: cache.fork([0]).keys, repeats)
        # `steps` tokens from given logits take steps - 1 forwards (none after the last token)
        out[layers] = {"decode_iteration_s": max(best_of(decode, repeats) - fork, 0.0) / (steps - 1),
                       "extend_call_s": max(best_of(extend, repeats) - fork, 0.0),
                       "extend_wide_s": {n: max(best_of(lambda e=extend, n=n: e(n=n), repeats) - fork, 0.0)
                                         for n in WIDE_EXTENDS}}
    return out


def elementwise_rate(spec, rates: Hardware, one_token_s: float, wide_s: dict) -> float:
    """Bytes per second of the elementwise work: the measured extends of `wide_s` ({tokens:
    seconds}) cost beyond the 1-token one (`one_token_s`), once what `rates` prices of them
    (matmuls, weight and cache bytes; its elementwise_bandwidth set huge) is taken out, against
    the activation bytes they add; a least-squares line through the origin. 1e30 when nothing is
    left to explain."""
    def cost(n):
        return costmodel.call_cost(spec, rates, 1, "extend", tokens=n, cached=16)

    base = one_token_s - cost(1).seconds
    act = np.array([cost(n).act_bytes - cost(1).act_bytes for n in wide_s])
    unexplained = np.array([wide_s[n] - cost(n).seconds - base for n in wide_s])
    slope = float(act @ unexplained / (act @ act))  # seconds per byte
    return 1 / slope if slope > 0 else 1e30


def measure(name: str = "this-cpu", repeats: int = 5, models=()) -> Hardware:
    """Measure this machine's default jax device and return it as a Hardware preset. `models`
    (`costmodel.ModelSpec`s, e.g. `model_spec("asset:target")`) add their weight shapes to the
    matmul table, so their products are priced from measurements of their own shapes."""
    import jax

    bandwidth = read_bandwidth(repeats=repeats)
    flops = matmul_flops(repeats=repeats)
    cache = last_level_cache_bytes()
    # read bandwidth of an array a quarter of the cache's size, summed again and again
    cache_bw = read_bandwidth(mib=max(int(cache / 4 / 2**20), 1), repeats=20) if cache else 0.0
    table = matmul_table(model_shapes([*models, tiny_spec(1)]), repeats=repeats)
    fixed = fixed_costs(repeats=repeats)
    device = jax.devices()[0]
    rates = Hardware(name=name, peak_flops=flops, mem_bandwidth=bandwidth, memory=1.0, link_bandwidth=bandwidth,
                     flops_efficiency=1.0, bandwidth_efficiency=1.0, call_overhead_s=0.0, token_overhead_s=0.0,
                     matmul_table=table, cache_bytes=cache, cache_bandwidth=cache_bw, elementwise_bandwidth=1e30)
    # 4 layers: the larger signal
    elementwise = elementwise_rate(tiny_spec(4), rates, fixed[4]["extend_call_s"], fixed[4]["extend_wide_s"])
    rates = dataclasses.replace(rates, elementwise_bandwidth=elementwise)
    # what the tiny models' calls would cost with no fixed cost at all (their arithmetic and bytes,
    # priced with the rates just measured): the fixed costs are what the measurement adds to it
    roofline = {layers: {"decode_iteration_s": costmodel.call_seconds(tiny_spec(layers), rates, 1, "decode",
                                                                      tokens=64, cached=16) / 64,
                         "extend_call_s": costmodel.call_seconds(tiny_spec(layers), rates, 1, "extend", tokens=1,
                                                                 cached=16)}
                for layers in (1, 4)}
    extra = {layers: {k: max(fixed[layers][k] - roofline[layers][k], 0.0) for k in roofline[layers]}
             for layers in (1, 4)}
    layer = max((extra[4]["decode_iteration_s"] - extra[1]["decode_iteration_s"]) / 3, 0.0)
    token = max(extra[1]["decode_iteration_s"] - layer, 0.0)
    call = max(extra[1]["extend_call_s"] - layer, 0.0)
    try:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        memory = 16 * 2**30
    notes = (f"measured by dreamr_jax.calibrate on {device.platform} ({device.device_kind}, "
             f"{os.cpu_count()} cores): read bandwidth {bandwidth / 1e9:.1f} GB/s (jitted sum of 256 MiB), "
             f"float32 matmul {flops / 1e9:.0f} GFLOP/s (1024^3), so both efficiencies are 1; matmul times "
             f"on a grid of {len(TABLE_ROWS)} row counts x {len(TABLE_WIDTHS)} widths (one row of 1024 "
             f"wide: {_rate(table, 1, 1024) / 1e9:.0f} GFLOP/s, 64 rows of 256: "
             f"{_rate(table, 64, 256) / 1e9:.0f}); last-level cache {cache / 2**20:.0f} MiB read at "
             f"{cache_bw / 1e9:.0f} GB/s; elementwise work at {elementwise / 1e9:.1f} GB/s (extends of "
             f"{', '.join(map(str, WIDE_EXTENDS))} tokens beyond a 1-token one, after their matmuls); fixed costs from "
             f"tiny random models: decode iteration {fixed[1]['decode_iteration_s'] * 1e6:.0f} us with 1 layer, "
             f"{fixed[4]['decode_iteration_s'] * 1e6:.0f} us with 4; a 1-token extend call "
             f"{fixed[1]['extend_call_s'] * 1e6:.0f} us; the link is unused on one device")
    return Hardware(name=name, peak_flops=flops, mem_bandwidth=bandwidth, memory=memory, link_bandwidth=bandwidth,
                    flops_efficiency=1.0, bandwidth_efficiency=1.0, call_overhead_s=call, token_overhead_s=token,
                    layer_overhead_s=layer, matmul_table=table, cache_bytes=cache, cache_bandwidth=cache_bw,
                    elementwise_bandwidth=elementwise, notes=notes)
