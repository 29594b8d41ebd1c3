"""Drafts side by side against one target on the embedded world: before and after SAPO, or the
arms of a reward ablation, in one run.

    python scripts/compare_drafts.py --draft before=out/sft-draft-redundant/hf \
        --draft after=out/sapo-redundant/hf [--target asset:target] [--count 100] [--split test] \
        [--out out/compare-drafts] [--fresh] [--json PATH]

Per draft, greedy on `--count` problems (configs/synthetic.yaml's settings): `target`, the draft
alone and `dreamr` (`dreamr_jax.bench.world.compare_drafts`; results in OUT/NAME/results.jsonl,
resumed on a rerun unless --fresh). Prints one row per draft: the three accuracies, dreamr's
acceptance, mean trace tokens of the draft alone and of dreamr, redundant steps per solution of
the draft alone, and dreamr's speedup over the target row measured in the same run.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--target", default="asset:target")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="out/compare-drafts")
    parser.add_argument("--fresh", action="store_true", help="set earlier results aside and solve again")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from dreamr_jax.bench.report import named_paths
    from dreamr_jax.bench.world import compare_drafts

    try:
        drafts = named_paths(args.draft, "--draft", "CHECKPOINT")
    except ValueError as e:
        parser.error(str(e))

    rows = compare_drafts(drafts, args.target, args.count, args.out, args.split, fresh=args.fresh)
    print(f"\n{'draft':<14}{'draft acc':>10}{'dreamr acc':>11}{'target acc':>11}{'accept':>8}"
          f"{'draft tok':>10}{'redundant':>10}{'dreamr tok':>11}{'speedup':>9}{'median':>8}{'projected':>10}")
    for r in rows:
        print(f"{r['draft']:<14}{r['draft_accuracy']:>10.0%}{r['dreamr_accuracy']:>11.0%}{r['target_accuracy']:>11.0%}"
              f"{r['acceptance']:>8.1%}{r['draft_tokens']:>10.1f}{r['draft_redundant_steps']:>10.2f}"
              f"{r['dreamr_tokens']:>11.1f}{r['speedup']:>8.2f}x{r['median_speedup']:>7.2f}x"
              f"{r['projected_speedup']:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
