#!/usr/bin/env python
"""Quantize a dense Qwen-VL checkpoint to AutoAWQ "gemm" int4 (round-to-nearest per group).

    python scripts/quantize.py SRC_FOLDER DST_FOLDER [--group-size 128]

The decoder projections become qweight / qzeros / scales; everything else is copied, and
config.json gains the AWQ `quantization_config`. `dr.load_model(DST_FOLDER)` then keeps those
projections at 4 bits. Use a smaller --group-size for tiny models whose widths 128 does not divide.
The work is `dreamr_jax.quant.quantize.quantize_checkpoint`, importable from here as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamr_jax.quant.quantize import awq_config, quantize_checkpoint, quantize_rtn  # noqa: E402

__all__ = ["quantize_checkpoint", "quantize_rtn", "awq_config", "main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="dense checkpoint folder (config.json + safetensors)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--group-size", type=int, default=128, help="input features per scale / zero (default 128)")
    a = p.parse_args(argv)
    from dreamr_jax.hub import resolve_checkpoint

    t0 = time.perf_counter()
    stats = quantize_checkpoint(resolve_checkpoint(a.src), a.dst, group_size=a.group_size, log=print)
    print(f"quantized {stats['quantized']} linears (group size {a.group_size}), copied {stats['copied']} tensors, "
          f"max |W - dequant(W)| {stats['max_abs_error']:.3g}; {time.perf_counter() - t0:.1f} s -> {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
