#!/usr/bin/env python
"""int4 vs bf16 decode on one GPU: dreamr-jax beside transformers, against the memory floor, and the
projected dreamr speedup of a 2B draft with a 32B int4 target.

    python scripts/bench_gpu.py [--json PATH] [--shapes 8b,32b] [--layers N] [--skip-torch]
    python scripts/bench_gpu.py --smoke          # tiny shapes, runs anywhere (CPU) in about a minute

What it measures (batch 1, greedy, random weights, text decoder only; no downloads):

1. Copy bandwidth: a jitted 1 GiB copy into a donated buffer and torch's device-to-device
   `copy_`, counting read + write (2 x size / time); the best is the floor's bandwidth.
2. int4 matmul methods: one 32B-shaped projection (rows = 1) as bf16 dense and as each
   `Int4Linear` method, with XLA's own estimate of the bytes each program touches (fused
   dequantization touches ~0.5 byte per weight, an expanded weight ~4.5), and the Pallas
   kernel alone at several tilings (`pallas:<block_out>x<k_splits>x<warps>`); the fastest
   tiling per shape is what decode then uses. Every int4 program's result is checked against
   x @ W in float32 (a wrong one is reported, never timed as a win).
3. Decode: for each shape, a Qwen3-VL text model (the real vocabulary 151936; a one-block
   vision tower that decode never runs) built directly on the device in bf16 and in int4
   (every decoder projection an `Int4Linear`, group 128, random packed weights; one run per
   `--methods` entry, the first reported as "int4"), prefill of a random prompt then
   `Generator.decode` of `--steps` tokens in one `lax.while_loop`;
   ms/step = decode time / steps, best of `--repeats`. Floor = bytes one step reads (every
   decoder layer's weights, the final norm, the lm_head, the allocated KV cache) / copy
   bandwidth. transformers (PyTorch bf16, sdpa, `generate` with EOS off): ms/step =
   (t(generate N) - t(generate 1)) / (N - 1), same config, same GPU.
   `--layers N` builds each model with N decoder layers (and N/2), and extrapolates the step
   time linearly in the layer count to the real depth (t(L) = t(N) + (L - N) * slope); the
   floor is computed for the real depth. Both measured points are in the JSON.
4. Projection: per-call times of the 2B draft (bf16 decode, ms/token), the 32B int4 target
   (decode, ms/token) and one target check (extend a cached `--prefix-len` context by a
   step plus the judging suffix, `Generator.extend_last`), put into FPSR's steady-state model
   (`dreamr_jax.projection.steady_state_speedup`: roles on separate devices, as in the paper;
   a step is `--step-tokens` tokens) at acceptances 50%, 52.6% (the paper's) and 70%. Its
   upper bound as the draft and the checks get free is 1 / (1 - a): 2x at 50%, 3.3x at 70%.

Each measurement runs in its own process (`dreamr_jax.bench.runner`: one model's memory is gone
before the next); --smoke runs them in-process with tiny shapes. The code is `dreamr_jax.bench.gpu`.
"""

from __future__ import annotations

import argparse
import json
import sys

from dreamr_jax.bench.gpu import SHAPES, WORKERS, run
from dreamr_jax.bench.runner import RESULT, resolve


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--shapes", default=None, help="decode shapes (default 8b,32b; --smoke: tiny)")
    p.add_argument("--draft", default=None, help="draft shape for the projection (default 2b)")
    p.add_argument("--target", default=None, help="target shape for the projection (default 32b, int4)")
    p.add_argument("--layers", type=int, default=0,
                   help="build models with at most N decoder layers (and N/2) and extrapolate (default: full depth)")
    p.add_argument("--steps", type=int, default=None, help="decode steps per timed call (default 64)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens before decoding (default 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128)")
    p.add_argument("--dtype", default=None, help="dense dtype (default bfloat16; float32 for a CPU comparison)")
    p.add_argument("--methods", default="auto,pallas,u4dequant,u4dot",
                   help="Int4Linear decode methods, comma separated; the first is reported as 'int4' and used in the "
                        "projection, the others as 'int4-<method>' (default auto,pallas,u4dequant,u4dot)")
    p.add_argument("--step-tokens", type=int, default=None, help="tokens per reasoning step (default 64)")
    p.add_argument("--judge-tokens", type=int, default=48, help="judging-suffix tokens a check adds (default 48)")
    p.add_argument("--prefix-len", type=int, default=None, help="cached context before a check (default 1024)")
    p.add_argument("--skip-torch", action="store_true", help="no transformers runs")
    p.add_argument("--skip-projection", action="store_true", help="no draft / check timing")
    p.add_argument("--skip-matmul", action="store_true", help="no single-projection method comparison")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, in-process: a test that the script runs")
    p.add_argument("--inline", action="store_true", help="run measurements in this process (default with --smoke)")
    p.add_argument("--subprocess", action="store_true", help="one process per measurement even with --smoke")
    p.add_argument("--worker-timeout", type=float, default=300, help="seconds before a measurement is abandoned")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the measurement processes "
                   "(e.g. --xla_gpu_autotune_level=0 to skip GEMM autotuning)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    s = a.smoke
    a.shapes = (a.shapes or ("tiny" if s else "8b,32b")).split(",")
    a.draft = a.draft or ("tiny-draft" if s else "2b")
    a.target = a.target or ("tiny" if s else "32b")
    a.steps = a.steps or (8 if s else 64)
    a.prompt_len = a.prompt_len or (16 if s else 128)
    a.repeats = a.repeats or (1 if s else 3)
    a.group_size = a.group_size or (32 if s else 128)
    a.dtype = a.dtype or "bfloat16"
    a.methods = a.methods.split(",")
    a.step_tokens = a.step_tokens or (8 if s else 64)
    a.judge_tokens = 8 if s else a.judge_tokens
    a.prefix_len = a.prefix_len or (32 if s else 1024)
    a.inline = (a.inline or s) and not a.subprocess
    for name in a.shapes + [a.draft, a.target]:
        if name not in SHAPES:
            p.error(f"unknown shape '{name}'; known: {sorted(SHAPES)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:  # one measurement, as `dreamr_jax.bench.runner` runs it (kept for older callers)
        task, kw = json.loads(a.worker)
        print(RESULT + json.dumps(resolve(f"dreamr_jax.bench.gpu:{WORKERS[task]}")(**kw)), flush=True)
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
