"""Is a world model a competent target? Solving, reading and judging, measured separately.

    python scripts/assess_target.py FOLDER [FOLDER ...] [--count 100] [--redundant-share 0.25] [--json PATH]

For each HF checkpoint folder (an SFT export or a shipped asset):
- `solve`: greedy target-alone accuracy on `--count` validation problems (configs/synthetic.yaml);
- `read` / `result`: teacher-forced accuracy of every digit read from the image and of the first
  digit of each arithmetic result (`dreamr_jax.bench.world.reading_accuracy`; chance for a read is about 10%);
- `judge`: how often the CPN verdict (rho >= alpha) agrees with the label of `--count`
  validation judging examples, with the mean rho of correct and of wrong steps beside it;
  `--redundant-share` makes that share of the wrong candidates redundant steps (the question
  restated, a digit read again, "The last step is correct."; a different set of examples).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--redundant-share", type=float, default=0.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not 0 <= args.redundant_share <= 1:
        parser.error(f"--redundant-share must be in [0, 1], got {args.redundant_share}")

    from dreamr_jax.bench.world import assess_target

    rows = []
    for folder in args.folders:
        try:
            rows.append(assess_target(folder, args.count, args.redundant_share))
        except Exception as e:  # one broken run must not lose the others' figures
            rows.append({"folder": folder, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
