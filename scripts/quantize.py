#!/usr/bin/env python
"""Quantize a dense Qwen-VL checkpoint to AutoAWQ "gemm" int4 (AWQ scales, then round to nearest per group).

    python scripts/quantize.py SRC_FOLDER DST_FOLDER [--group-size 128]
        [--calib FILE | --calib world] [--calib-samples 128] [--calib-tokens 512] [--n-grid 20]

The decoder projections become qweight / qzeros / scales; everything else is copied, and
config.json gains the AWQ `quantization_config`. `dr.load_model(DST_FOLDER)` then keeps those
projections at 4 bits. Use a smaller --group-size for tiny models whose widths 128 does not divide.

--calib turns on AWQ's activation-aware scale search (`dreamr_jax.quant.awq`) on calibration
texts: a .txt file (one sample per line), a .jsonl file (a "text" field, else "question" and
"answer"), or `world` (the embedded world's training problems with their solutions). Without
it every group is rounded to nearest as is. No data is downloaded: AutoAWQ's default pile
sample must be supplied as a file.
The work is `dreamr_jax.quant.quantize.quantize_checkpoint`, importable from here as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamr_jax.quant.quantize import awq_config, quantize_checkpoint, quantize_rtn  # noqa: E402

__all__ = ["quantize_checkpoint", "quantize_rtn", "awq_config", "calibration_texts", "main"]


def calibration_texts(source: str, samples: int) -> list[str]:
    if source == "world":
        from dreamr_jax.data import synthetic

        return [p.question + "\n" + "\n\n".join(p.steps) for p in synthetic.problems(0, "train", samples)]
    if not os.path.exists(source):
        raise SystemExit(f"--calib: no file {source} (give a .txt or .jsonl file, or `world`)")
    texts = []
    with open(source) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if source.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{source}:{n}: not JSON ({e})")
                text = record.get("text") or " ".join(str(record.get(k, "")) for k in ("question", "answer")).strip()
                if not text:
                    raise SystemExit(f"{source}:{n}: no 'text' (or 'question' / 'answer') field")
                texts.append(text)
            else:
                texts.append(line.rstrip("\n"))
            if len(texts) == samples:
                break
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="dense checkpoint folder (config.json + safetensors)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--group-size", type=int, default=128, help="input features per scale / zero (default 128)")
    p.add_argument("--calib", default=None, help="calibration texts for AWQ scaling: FILE (.txt/.jsonl) or `world`")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration texts used (default 128)")
    p.add_argument("--calib-tokens", type=int, default=512, help="tokens per calibration text (default 512)")
    p.add_argument("--n-grid", type=int, default=20, help="scale exponents tried per group (default 20)")
    a = p.parse_args(argv)
    from dreamr_jax.hub import resolve_checkpoint

    t0 = time.perf_counter()
    texts = calibration_texts(a.calib, a.calib_samples) if a.calib else None
    stats = quantize_checkpoint(resolve_checkpoint(a.src), a.dst, group_size=a.group_size, calibration=texts,
                                calibration_tokens=a.calib_tokens, n_grid=a.n_grid, log=print)
    if stats["awq"]:
        scaled = [g for g in stats["awq"] if g["ratio"] is not None]
        gain = sum(g["loss"] for g in stats["awq"]) / max(sum(g["rtn_loss"] for g in stats["awq"]), 1e-30)
        print(f"AWQ: {len(scaled)} of {len(stats['awq'])} groups scaled; calibration output error "
              f"{gain:.3f}x that of round to nearest")
    print(f"quantized {stats['quantized']} linears (group size {a.group_size}), copied {stats['copied']} tensors, "
          f"max |W - dequant(W)| {stats['max_abs_error']:.3g}; {time.perf_counter() - t0:.1f} s -> {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
