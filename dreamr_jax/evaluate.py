"""`dreamr eval`: several methods over a data set in one run -> a table and two plots."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from .data.grading import answers_match


def read_records(path: str) -> list[dict]:
    """JSONL records {question, image? / images?, answer?, id?}; image paths are relative to the file."""
    base = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if "question" not in record:
                raise ValueError(f"{path}:{n}: record has no 'question' field")
            image = record.get("image")
            if image and not os.path.isabs(image):
                record["image"] = os.path.join(base, image)
            if record.get("images"):  # several images (MMMU, Geo3K): paths relative to the file too
                record["images"] = [p if os.path.isabs(p) else os.path.join(base, p) for p in record["images"]]
            records.append(record)
    return records


def summarise(results: list[dict], methods: Sequence[str]) -> list[dict]:
    """Per method: accuracy, acceptance, mean latency, speedup over `target` (same run, same
    problems), projected speedup from the timeline replay."""
    rows = []
    by_method = {m: [r for r in results if r["method"] == m] for m in methods}
    ok_ids = set.intersection(*[{r["id"] for r in rs if r["status"] == "ok"} for rs in by_method.values()]) if by_method else set()

    def mean_of(method, key, stat=np.mean):
        vals = [r["trace"][key] if key in r["trace"] else r["trace"]["extra"][key]
                for r in by_method[method] if r["status"] == "ok" and r["id"] in ok_ids]
        return float(stat(vals)) if vals else float("nan")

    def median_of(method, key):
        return mean_of(method, key, np.median)

    def mean_tokens(method):
        vals = [sum(len(st["token_ids"]) for st in r["trace"]["steps"])
                for r in by_method[method] if r["status"] == "ok" and r["id"] in ok_ids]
        return float(np.mean(vals)) if vals else float("nan")

    target_time = mean_of("target", "wall_time") if "target" in by_method else float("nan")
    target_proj = mean_of("target", "projected_time") if "target" in by_method else float("nan")
    target_tokens = mean_tokens("target") if "target" in by_method else float("nan")
    for m, rs in by_method.items():
        ok = [r for r in rs if r["status"] == "ok"]
        graded = [r for r in ok if r.get("reference") is not None]
        accuracy = float(np.mean([answers_match(r["trace"]["answer"], r["reference"]) for r in graded])) if graded else float("nan")
        checked = sum(r["trace"]["drafted_checked"] for r in ok)
        accepted = sum(r["trace"]["drafted_accepted"] for r in ok)
        latency = mean_of(m, "wall_time")
        projected = mean_of(m, "projected_time")
        # Per token rather than per step: the share of committed tokens the draft wrote, and the
        # trace length against the target's own on the same problems. If only the target's tokens
        # cost time, the speedup is at most 1 / (length_ratio * (1 - draft_token_share)); with
        # step acceptance a, equal step lengths and equal trace lengths that is 1 / (1 - a).
        tokens = [(len(st["token_ids"]), st["author"]) for r in ok for st in r["trace"]["steps"]]
        total = sum(n for n, _ in tokens)
        drafted = sum(n for n, who in tokens if who == "draft")
        if m == "sd":  # its steps are committed as the target's; the draft wrote the accepted proposals
            drafted = min(accepted, total)
        rows.append({
            "method": m, "problems": len(rs), "failed": len(rs) - len(ok), "accuracy": accuracy,
            "acceptance": accepted / checked if checked else float("nan"), "mean_latency_s": latency,
            "median_latency_s": median_of(m, "wall_time"),
            "speedup": target_time / latency if latency else float("nan"),
            "median_speedup": (median_of("target", "wall_time") / median_of(m, "wall_time")
                               if "target" in by_method else float("nan")),
            # XLA compilations inside the timed solves (the warm-up should leave none)
            "compiles": int(sum(r["trace"].get("extra", {}).get("compiles", 0) for r in ok)),
            "compile_s": float(sum(r["trace"].get("extra", {}).get("compile_s", 0.0) for r in ok)),
            "projected_speedup": target_proj / projected if projected else float("nan"),
            "draft_token_share": drafted / total if total else float("nan"),
            "length_ratio": mean_tokens(m) / target_tokens if target_tokens else float("nan"),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'method':<11} {'n':>4} {'fail':>4} {'acc':>7} {'accept':>7} {'draft tok':>9} {'length':>6} "
            f"{'mean s':>7} {'median s':>8} {'speedup':>8} {'median':>7} {'projected':>9} {'compiles':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        length = "-" if r["length_ratio"] != r["length_ratio"] else f"{r['length_ratio']:.2f}"
        lines.append(f"{r['method']:<11} {r['problems']:>4} {r['failed']:>4} {_pct(r['accuracy']):>7} "
                     f"{_pct(r['acceptance']):>7} {_pct(r['draft_token_share']):>9} {length:>6} "
                     f"{r['mean_latency_s']:>7.4f} {r['median_latency_s']:>8.4f} {r['speedup']:>7.2f}x "
                     f"{r['median_speedup']:>6.2f}x {r['projected_speedup']:>8.2f}x {r['compiles']:>8}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def plot_speedup_vs_acceptance(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = []
    for r in rows:
        acc = 0.0 if r["acceptance"] != r["acceptance"] else 100 * r["acceptance"]
        points.append((acc, r["speedup"], r["method"]))
        ax.scatter([acc], [r["speedup"]], s=50, label=r["method"])
    # Methods often sit close together (several near 97% acceptance): stack their labels in a
    # column beside the cluster, each joined to its point, so no two labels overlap.
    ys = [y for _, y, _ in points if y == y] or [1.0]
    step = max(max(ys) - min(ys), 0.5) / max(len(points), 1)
    label_ys = []
    for k, (x, y, name) in enumerate(sorted(points, key=lambda p: -p[1] if p[1] == p[1] else 0)):
        label_ys.append(max(ys) - k * step)
        ax.annotate(f"{name} {y:.2f}x", (x, y), xytext=(x - 35 if x > 50 else x + 10, label_ys[-1]),
                    textcoords="data", fontsize=8, arrowprops=dict(arrowstyle="-", color="grey", lw=0.6),
                    va="center")
    low, high = min(ys + label_ys + [1.0]), max(ys + label_ys + [1.0])
    ax.set_ylim(low - 0.1 * (high - low + 0.5), high + 0.1 * (high - low + 0.5))  # the labels stay inside
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlim(-5, 105)
    ax.set_xlabel("acceptance rate (%) of drafted steps (draft alone: 0)")
    ax.set_ylabel("mean wall-clock speedup over target alone")
    ax.set_title("speedup vs acceptance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(trace: dict, path: str) -> None:
    """One problem's FPSR schedule: the draft's lane (prefill, drafting) and the target's
    (prefill, checks, fallback steps) over time, with a legend; the title counts the steps and
    the accepted drafts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = {"prefill": "tab:grey", "draft": "tab:blue", "check": "tab:green", "fallback": "tab:orange",
               "decode": "tab:red", "verify": "tab:purple", "feed": "tab:brown"}
    lanes = {"draft": 1, "target": 0}
    fig, ax = plt.subplots(figsize=(9, 2.8))
    seen = set()
    for iv in trace["intervals"]:
        lane = lanes.get(iv["role"], 0)
        kind = iv["kind"]
        seen.add(kind)
        ax.broken_barh([(1000 * iv["start"], max(1000 * (iv["end"] - iv["start"]), 0.05))], (lane - 0.35, 0.7),
                       color=colours.get(kind, "tab:pink"), edgecolor="white", linewidth=0.4)
    ax.set_yticks(list(lanes.values()), [f"{k} ({'drafting' if k == 'draft' else 'checks, fallback'})"
                                         for k in lanes])
    ax.set_ylim(-0.6, 1.6)
    ax.set_xlim(0, 1000 * trace["wall_time"])
    ax.set_xlabel("milliseconds since the problem started")
    ax.legend(handles=[Patch(color=colours.get(k, "tab:pink"), label=k) for k in colours if k in seen],
              loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(seen), fontsize=8, frameon=False)
    steps = trace["steps"]
    n_draft = sum(s["author"] == "draft" for s in steps)
    ax.set_title(f"FPSR timeline: {len(steps)} steps ({n_draft} drafted and accepted), "
                 f"{1000 * trace['wall_time']:.1f} ms, projected {1000 * trace['extra'].get('projected_time', float('nan')):.1f} ms",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval(reasoner, records: list[dict], methods: Sequence[str], out_dir: str, *, warmup: bool = True,
             warmup_records: int = 8, progress: bool = True) -> list[dict]:
    """Solve `records` with each method, then write results.jsonl, summary.json, the table and
    the two plots to `out_dir`. `target` is always run: speedups are against it, same run."""
    methods = list(methods)
    if "target" not in methods:
        methods = ["target"] + methods
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.jsonl")
    if os.path.exists(results_path):
        os.remove(results_path)
    if warmup and records:
        # Compile every program the run will use before timing anything: each method on several
        # records reaches the shape buckets (prompt, step, check width, attended cache length)
        # the timed pass meets; the pass counts any compilation left and reports it.
        for m in methods:
            for record in records[:warmup_records]:
                try:
                    reasoner.solve(record["question"], record.get("images") or record.get("image"), method=m)
                except Exception as e:  # the run below records the failure per problem
                    print(f"warm-up of '{m}' failed: {type(e).__name__}: {e}")
                    break
        if "dreamr" in methods:  # check widths depend on timing: compile all of them
            first = records[0]
            try:
                reasoner.warm_up_checks(first["question"], first.get("images") or first.get("image"))
            except Exception as e:
                print(f"warm-up of dreamr's checks failed: {type(e).__name__}: {e}")
    results = reasoner.solve_many(records, output=results_path, methods=methods, progress=progress)
    rows = summarise(results, methods)
    table = format_table(rows)
    print(table)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    plot_speedup_vs_acceptance(rows, os.path.join(out_dir, "speedup_vs_acceptance.png"))
    compiled = sum(r["compiles"] for r in rows)
    if compiled:
        print(f"note: {compiled} XLA compilations ({sum(r['compile_s'] for r in rows):.2f} s) happened inside the "
              "timed solves (column 'compiles'); their time is in those latencies")
    dreamr = sorted((r for r in results if r["method"] == "dreamr" and r["status"] == "ok"),
                    key=lambda r: r["trace"]["wall_time"])
    if dreamr:  # a median problem of the measured pass, not a warm-up or outlier
        plot_timeline(dreamr[len(dreamr) // 2]["trace"], os.path.join(out_dir, "fpsr_timeline.png"))
    print(f"\nresults: {results_path}\nplots: {out_dir}/speedup_vs_acceptance.png, {out_dir}/fpsr_timeline.png")
    return rows
