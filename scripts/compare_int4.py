"""How far is an int4 checkpoint from its dense original? Logits on the embedded world's prompts.

    python scripts/compare_int4.py DENSE INT4 [INT4 ...] [--count 32] [--json PATH]

For `--count` validation problems of the embedded world (question, image and the reference
solution, teacher-forced; problems the calibration texts of `scripts/quantize.py --calib world`
never saw), every checkpoint's logits are compared with the dense one's at the solution's
positions: mean and max |difference|, and how often the argmax token agrees. For a world
checkpoint (`asset:target`); a Qwen-VL checkpoint with the same tokenizer works too.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense")
    parser.add_argument("int4", nargs="+")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from dreamr_jax.bench.world import compare_checkpoints

    rows = []
    for row in compare_checkpoints(args.dense, args.int4, args.count):
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
