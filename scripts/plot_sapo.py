"""Plot SAPO runs: one run's reward terms, acceptance, response length and KL, or several runs
(a reward ablation) side by side.

    python scripts/plot_sapo.py out/sapo-synthetic/metrics.jsonl out/sapo-synthetic/training.png [--window 10]
    python scripts/plot_sapo.py --runs 1:1:1=out/a/metrics.jsonl 2:1:1=out/b/metrics.jsonl -- ablation.png

Each curve is a moving average over `--window` steps (single steps are noisy: 64 rollouts).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

CURVES = (("reward_outcome", "R_outcome"), ("reward_draft", "R_draft"), ("reward_length", "R_length"),
          ("acceptance_rate", "acceptance (rho >= alpha)"))
# The ablation's panels: what the paper's weights trade against each other.
COMPARED = (("acceptance_rate", "acceptance (rho >= alpha)"), ("response_length", "response tokens"),
            ("reward_outcome", "R_outcome"))


def moving_average(values, window: int) -> np.ndarray:
    values = np.asarray(values, float)
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no metric rows")
    return rows


def curve(ax, rows: list[dict], key: str, window: int, **style) -> None:
    steps = np.array([r["step"] for r in rows])
    smooth = moving_average([r[key] for r in rows], window)
    ax.plot(steps[len(steps) - len(smooth):], smooth, **style)


def plot_run(rows: list[dict], window: int):
    import matplotlib.pyplot as plt

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 8), sharex=True, height_ratios=(3, 1.3, 1))
    for key, label in CURVES:
        curve(top, rows, key, window, label=label)
    top.set_ylabel(f"mean over {window} steps")
    top.set_ylim(0, 1)
    top.legend(loc="lower right")
    curve(middle, rows, "response_length", window, color="black")
    middle.set_ylabel("response tokens")
    curve(bottom, rows, "kl", window, color="grey")
    bottom.set_ylabel("KL to reference")
    bottom.set_xlabel("SAPO step")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle("SAPO: reward terms, acceptance and length")
    return fig


def plot_runs(runs: dict, window: int):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(COMPARED), 1, figsize=(7, 8), sharex=True)
    for name, rows in runs.items():
        for ax, (key, _) in zip(axes, COMPARED):
            curve(ax, rows, key, window, label=name)
    for ax, (_, label) in zip(axes, COMPARED):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(title="reward weights", loc="lower right")
    axes[-1].set_xlabel("SAPO step")
    fig.suptitle(f"SAPO reward ablation (mean over {window} steps)")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="METRICS OUTPUT, or with --runs only OUTPUT")
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME=METRICS")
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    if args.runs:
        if len(args.paths) != 1:
            parser.error("with --runs give one output path (after --, or before --runs)")
        from dreamr_jax.bench.report import named_paths

        try:
            paths = named_paths(args.runs, "--runs", "METRICS")
        except ValueError as e:
            parser.error(str(e))
        fig = plot_runs({name: read_metrics(path) for name, path in paths.items()}, args.window)
    else:
        if len(args.paths) != 2:
            parser.error("expected METRICS OUTPUT")
        fig = plot_run(read_metrics(args.paths[0]), args.window)
    output = args.paths[-1]
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(output)


if __name__ == "__main__":
    main()
