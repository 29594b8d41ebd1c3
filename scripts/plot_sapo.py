"""Plot a SAPO run's reward terms, acceptance and KL over training.

    python scripts/plot_sapo.py out/sapo-synthetic/metrics.jsonl out/sapo-synthetic/training.png [--window 10]

Each curve is a moving average over `--window` steps (single steps are noisy: 64 rollouts).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

CURVES = (("reward_outcome", "R_outcome"), ("reward_draft", "R_draft"), ("reward_length", "R_length"),
          ("acceptance_rate", "acceptance (rho >= alpha)"))


def moving_average(values, window: int) -> np.ndarray:
    values = np.asarray(values, float)
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics")
    parser.add_argument("output")
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{args.metrics}: no metric rows")
    steps = np.array([r["step"] for r in rows])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    for key, label in CURVES:
        smooth = moving_average([r[key] for r in rows], args.window)
        top.plot(steps[len(steps) - len(smooth):], smooth, label=label)
    top.set_ylabel(f"mean over {args.window} steps")
    top.set_ylim(0, 1)
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    kl = moving_average([r["kl"] for r in rows], args.window)
    bottom.plot(steps[len(steps) - len(kl):], kl, color="grey")
    bottom.set_ylabel("KL to reference")
    bottom.set_xlabel("SAPO step")
    bottom.grid(alpha=0.3)
    fig.suptitle("SAPO: reward terms and acceptance")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(args.output)


if __name__ == "__main__":
    main()
