"""What the speculative machinery costs: FPSR (`dreamr`) with alpha = 0 (every drafted step
accepted) against draft alone plus the target's checks, on the same problems in one run.

Goal (issue 3): dreamr wall-clock <= 1.2 x (draft-alone time + the checks' time). Also
reports each method's measured / projected time (the timeline replay with each role on its
own contention-free hardware).

    .venv/bin/python scripts/bench_spec.py [--problems 6] [--json out/bench_spec.json]

Models: a tiny random Qwen3-VL target and draft with the real Qwen vocabulary, built fresh
(`dreamr_jax.bench.models.build_spec_model` says how their step delimiter is made to appear).
The measurement is `dreamr_jax.bench.spec.bench_spec`.
"""

from __future__ import annotations

import argparse
import json
import os


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--target-hidden", type=int, default=256)
    ap.add_argument("--target-layers", type=int, default=4)
    ap.add_argument("--draft-hidden", type=int, default=64)
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from dreamr_jax.bench.spec import bench_spec

    out = bench_spec(args.problems, args.budget, args.target_hidden, args.target_layers, args.draft_hidden,
                     args.draft_layers, settings=vars(args))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
