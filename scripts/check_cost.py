"""What a CPN check costs against the decoding it replaces, on the shipped world pair.

    python scripts/check_cost.py [--repeats 30] [--json PATH]

Times (mean and median over `--repeats`, after two warm-up calls, with no compilation in the
timed calls: the script counts them; `dreamr_jax.bench.costs.check_cost`) on the target of configs/synthetic.yaml:
- `check_k`: FPSR's packed check of k = 1, 2, 4 consecutive drafted steps of a test problem
  (`StepEngine.check_drafts`: one forward over the cached prefix, each step followed by the
  configured judging suffix), per drafted token;
- `decode`: the target writing the same steps itself in one decode call, as `target` alone
  does (`Role.write` with several steps per call), per token;
- the draft writing them;
- the target writing them with one decode call per step (the `target` baseline before
  issue 13), for comparison.
The ratio `check per drafted token / target decode per token` is what FPSR's checks cost in
place of the target's own decoding. Both roles sit on one device here (one is idle while the
other is timed).
"""

from __future__ import annotations

import argparse
import json

from dreamr_jax.bench.report import write_json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "synthetic.yaml"))
    parser.add_argument("--problem", type=int, default=1, help="test problem index (its reference steps are checked)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from dreamr_jax.bench.costs import check_cost

    result = check_cost(args.config, args.problem, args.repeats)
    print(json.dumps(result, indent=2))
    write_json(args.json, result, indent=2)


if __name__ == "__main__":
    main()
