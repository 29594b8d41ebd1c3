"""The cost model against measured calls on this machine (issue 15, deliverable 2).

    python scripts/validate_costmodel.py [--hardware this-cpu.json] [--json PATH] [--repeats 5]

Without `--hardware` it calibrates first (`dreamr_jax.calibrate.measure`, about 20 s). Then it
measures, each the median of `--repeats` timed calls after a warm-up (no compilation timed):

- `scripts/bench_decode.py`'s 90M model (`dreamr_jax.bench.decode.bench_model_config`: Qwen3-VL
  text, hidden 512, 4 layers, 8/4 heads, head_dim 64, intermediate 1536, the real 151,936-token
  vocabulary, tied; random weights, float32): prefill of 96 tokens, and a 128-token decode at
  batch 1 and 8 (per iteration);
- the shipped world pair in float32 on a test problem (`configs/synthetic.yaml`): each role's
  prefill (36 tokens, one 64x64 image), the target's packed check of 4 drafted steps (45 tokens)
  and each role decoding those 4 steps (33 tokens) in one call (the calls `dreamr` makes);

and prints each beside the cost model's prediction for the same call shape
(`costmodel.call_seconds`), with the ratio. The goal is every prediction within 25%. The
measurements are `dreamr_jax.bench.costs`.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default=None, help="a calibrated JSON preset (default: calibrate now)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from dreamr_jax import costmodel
    from dreamr_jax.bench.costs import validate, validated_specs
    from dreamr_jax.calibrate import measure

    hw = costmodel.hardware(args.hardware) if args.hardware else measure(models=validated_specs())
    rows = validate(hw, args.repeats)
    print(f"hardware: {hw.name}: {hw.notes}")
    print(f"{'model':20s} {'call':44s} {'measured':>10s} {'predicted':>10s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['model']:20s} {r['call']:44s} {r['measured_s'] * 1e3:8.3f}ms {r['predicted_s'] * 1e3:8.3f}ms "
              f"{r['ratio']:6.2f}")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst error {worst:.0%} (goal: 25%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hw.to_dict(), "calls": rows, "worst_error": worst}, f, indent=2)


if __name__ == "__main__":
    main()
