"""How right is the target's CPN judge on the steps a draft actually writes?

    python scripts/audit_judge.py [--draft asset:draft] [--target asset:target] [--count 64]
        [--group 8] [--temperature 1.0] [--split val] [--json PATH]

SAPO's R_draft trusts the frozen target's check. On the embedded world the truth of every step
is known (`synthetic.step_verdict`), so this samples `--group` rollouts per problem from the
draft (as SAPO does), scores every step with the target (`training.rollouts.step_rhos`, the check
SAPO runs) and prints, per true verdict, how many steps the judge accepts (rho >= alpha). A
judge that accepts wrong steps is a reward SAPO can hack: the "slip" and "misread" rows are
the ones to watch.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="asset:draft")
    parser.add_argument("--target", default="asset:target")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--split", default="val")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from dreamr_jax.bench.world import audit_judge

    result = audit_judge(args.draft, args.target, args.count, args.group, args.temperature, args.split)
    print(f"{'true verdict':<14}{'steps':>7}{'accepted':>10}{'rate':>8}")
    for verdict, row in result["by_verdict"].items():
        print(f"{verdict:<14}{row['steps']:>7}{row['accepted']:>10}{row['accept_rate']:>8.3f}")
    print(f"false accepts of on-path wrong steps: {result['false_accept_rate']:.3f} of {result['wrong_steps']}")
    for ex in result["examples_wrongly_accepted"]:
        print(f"  {ex['problem']}: wrote {ex['written']!r}, expected {ex['expected']!r}, rho {ex['rho']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
