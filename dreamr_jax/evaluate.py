"""`dreamr eval`: several methods over a data set in one run -> a table and two plots.

An evaluation never loses a result: rows are appended to `results.jsonl` as they finish, a rerun
resumes (skips the (record id, method) pairs already there with status ok), `fresh=True` moves
the old file aside instead of deleting it, one run at a time holds the output folder
(`locked_out_dir`), and the table, summary and plots are replaced atomically."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from typing import Sequence

import numpy as np

from .data.grading import answers_match
# The results file's rows and the method check are shared with the engine (`solve_many` writes
# the rows), so they live below both; callers still import EvalError and check_methods from here.
from .speculative.results import (EvalError, check_methods, json_safe, read_results, result_key, write_atomically,
                                  write_text)



class DataError(EvalError):
    """A data file that does not fit the record schema; the message names the file and line."""


def read_records(path: str) -> list[dict]:
    """JSONL records {question, image? / images?, answer?, id?}; image paths are relative to the file.

    Everything is checked here, before a model loads, and a bad line raises `DataError` naming
    `file:line`: UTF-8 JSON objects, a non-empty string `question`, an `id` that is a string or
    an integer and unique (a record without one is numbered by its position from 0, as
    `solve_many` numbers it), and images that are paths to existing files. `answer` may be
    missing: such records are solved but not graded."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such data file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a JSONL data file")
    base = os.path.dirname(os.path.abspath(path))
    records, id_lines = [], {}
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from e
    for n, raw in enumerate(lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e})") from e
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: 'question' must be a non-empty string, got {question!r}"
                            if "question" in record else f"{where}: record has no 'question' field")
        if "id" in record and (not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool)):
            raise DataError(f"{where}: 'id' must be a string or an integer, got {record['id']!r}")
        rid = record.get("id", len(records))  # the key results are stored (and resumed) under
        if rid in id_lines:
            first, first_implicit = id_lines[rid]
            note = (" (a record without an id is numbered by its position from 0)"
                    if first_implicit or "id" not in record else "")
            raise DataError(f"{where}: duplicate id {rid!r}, also on line {first}{note}")
        id_lines[rid] = (n, "id" not in record)
        image = record.get("image")
        if image is not None:
            record["image"] = _image_path(image, base, f"{where}: 'image'")
        images = record.get("images")
        if images is not None:  # several images (MMMU, Geo3K): paths relative to the file too
            if not isinstance(images, list):
                raise DataError(f"{where}: 'images' must be a list of paths, got {type(images).__name__}")
            record["images"] = [_image_path(p, base, f"{where}: 'images'[{k}]") for k, p in enumerate(images)]
        records.append(record)
    return records


def _image_path(image, base: str, where: str) -> str:
    if not isinstance(image, str) or not image:
        raise DataError(f"{where} must be a path to an image file, got {image!r}")
    resolved = image if os.path.isabs(image) else os.path.join(base, image)
    if not os.path.isfile(resolved):
        raise DataError(f"{where}: no such image file {resolved}")
    return resolved


# ---- the output folder: one run at a time, results kept ---------------------------------------------

_held = {}  # lock file -> [thread id, depth]: the CLI and run_demo take the lock before models load, run_eval again


def check_out_dir(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvalError(f"--out {out_dir}: is a file, not a folder")


@contextlib.contextmanager
def locked_out_dir(out_dir: str):
    """Hold `out_dir` (created if missing) for one run: an exclusive `flock` on `out_dir/.lock`,
    which holds the holder's pid. A second run on the folder fails at once naming that pid
    instead of deleting or interleaving the first one's results. The OS drops the lock when the
    process ends, however it ends, so a crash leaves no stale lock. Re-entrant in one thread."""
    check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(out_dir, ".lock"))
    held = _held.get(path)
    if held and held[0] == threading.get_ident():
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EvalError(f"{out_dir} is in use by another run (pid {holder}); wait for it to end or "
                        f"choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[path] = [threading.get_ident(), 1]
        yield
    finally:
        _held.pop(path, None)
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def _set_aside(path: str) -> str:
    """Rename `path` to a timestamped name beside it (never over an existing file)."""
    stem, ext = os.path.splitext(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new, k = f"{stem}.{stamp}{ext}", 1
    while os.path.exists(new):
        new, k = f"{stem}.{stamp}-{k}{ext}", k + 1
    os.replace(path, new)
    return new


def summarise(results: list[dict], methods: Sequence[str]) -> list[dict]:
    """Per method: accuracy, acceptance, mean latency, speedup over `target` (same run, same
    problems), projected speedup from the timeline replay."""
    rows = []
    by_method = {m: [r for r in results if r["method"] == m] for m in methods}
    ok_ids = (set.intersection(*[{r["id"] for r in rs if r["status"] == "ok"} for rs in by_method.values()])
              if by_method else set())

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
        accuracy = (float(np.mean([answers_match(r["trace"]["answer"], r["reference"]) for r in graded]))
                    if graded else float("nan"))
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
            "method": m, "problems": len(rs), "failed": len(rs) - len(ok),
            "graded": len(graded), "accuracy": accuracy,  # over `graded`: solved records with a reference answer
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
            "mean_tokens": mean_tokens(m),  # committed trace tokens per problem (the records all solved)
        })
    return rows


def format_table(rows: list[dict]) -> str:
    # `--project HW:DRAFT:TARGET` adds a `projected@HW` column (`add_projection`)
    extra = [k for k in (rows[0] if rows else {}) if k.startswith("projected@")]
    head = (f"{'method':<11} {'n':>4} {'fail':>4} {'graded':>6} {'acc':>7} {'accept':>7} {'draft tok':>9} "
            f"{'length':>6} {'mean s':>7} {'median s':>8} {'speedup':>8} {'median':>7} {'projected':>9} "
            f"{'compiles':>8}" + "".join(f" {k:>{max(len(k), 8)}}" for k in extra))
    lines = [head, "-" * len(head)]
    for r in rows:
        length = "-" if r["length_ratio"] != r["length_ratio"] else f"{r['length_ratio']:.2f}"
        lines.append(f"{r['method']:<11} {r['problems']:>4} {r['failed']:>4} {r['graded']:>6} "
                     f"{_pct(r['accuracy']):>7} {_pct(r['acceptance']):>7} {_pct(r['draft_token_share']):>9} "
                     f"{length:>6} {r['mean_latency_s']:>7.4f} {r['median_latency_s']:>8.4f} {r['speedup']:>7.2f}x "
                     f"{r['median_speedup']:>6.2f}x {r['projected_speedup']:>8.2f}x {r['compiles']:>8}"
                     + "".join(f" {_speedup(r.get(k)):>{max(len(k), 8)}}" for k in extra))
    return "\n".join(lines)


def _speedup(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f}x"


def add_projection(rows: list[dict], results: list[dict], projection, source: str = "results") -> str:
    """`--project`: each summary row gets `projection.column` (`projected@HW`), the method's
    speedup over `target` with every call of its traces priced on the projected hardware and
    models (`dreamr_jax.projection`), over the records every method solved (as `speedup`). A
    projection that cannot be made (traces without call shapes, a context that does not fit)
    leaves the column empty with a note: the measured results stand. Returns the line to print
    under the table (the projection's assumptions, or that note)."""
    from .projection import speedup_column

    methods = [r["method"] for r in rows]
    ok = [{r["id"] for r in results if r["method"] == m and r["status"] == "ok"} for m in methods]
    common = set.intersection(*ok) if ok else set()
    try:
        speedups = speedup_column(projection, [r for r in results if r["id"] in common], methods, source)
        line = f"{projection.column}: {projection.assumptions()}"
    except ValueError as e:
        speedups, line = {}, f"note: no {projection.column} column: {e}"
    for r in rows:
        r[projection.column] = speedups.get(r["method"], float("nan"))
    return line


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
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
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
                 f"{1000 * trace['wall_time']:.1f} ms, "
                 f"projected {1000 * trace['extra'].get('projected_time', float('nan')):.1f} ms",
                 fontsize=10)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def run_eval(reasoner, records: list[dict], methods: Sequence[str], out_dir: str, *, warmup: bool = True,
             warmup_records: int = 8, progress: bool = True, fresh: bool = False, projection=None) -> list[dict]:
    """Solve `records` with each method, then write results.jsonl, summary.json, the table and
    the two plots to `out_dir`. `target` is always run: speedups are against it, same run.
    A `projection.Projection` (`--project`) adds its `projected@HW` speedup column.

    Holds `out_dir` for the run (`locked_out_dir`). Resumes: the (record id, method) pairs
    results.jsonl already holds with status ok are not solved again, and the table covers every
    row of the file, old and new. `fresh` moves an old results.jsonl aside (to a timestamped
    name) and starts a new one."""
    methods = list(dict.fromkeys(["target"] + list(methods)))  # target first, each method once
    check_methods(methods, has_draft=getattr(reasoner, "draft", None) is not None)
    with locked_out_dir(out_dir):
        results_path = os.path.join(out_dir, "results.jsonl")
        if fresh and os.path.exists(results_path):
            print(f"starting fresh: the previous results are kept as {_set_aside(results_path)}")
        done = {k for k, row in read_results(results_path, warn=False).items() if row.get("status") == "ok"}
        pending = [m for m in methods
                   if any(result_key(r.get("id", i), m) not in done for i, r in enumerate(records))]
        if warmup and records and pending:
            _warm_up(reasoner, records, warmup_records, pending)
        reasoner.solve_many(records, output=results_path, methods=methods, progress=progress)
        # The table covers this run's methods over every row of the file (resumed ones too), the
        # latest row of each pair; rows of other methods stay in the file, named below.
        results = list(read_results(results_path, warn=False).values())
        others = sorted({r["method"] for r in results} - set(methods))
        results = [r for r in results if r["method"] in methods]
        rows = summarise(results, methods)
        projected = add_projection(rows, results, projection, results_path) if projection is not None else None
        table = format_table(rows)
        print(table)
        if projected:
            print(projected)
        _report_coverage(results, records, others)
        write_text(os.path.join(out_dir, "summary.json"),
                   json.dumps(json_safe(rows), indent=2, allow_nan=False) + "\n")
        write_text(os.path.join(out_dir, "table.txt"), table + "\n")
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


def warm_up_records(records: list[dict], count: int) -> list[dict]:
    """The `count` records a warm-up solves: the first half of them the run's first records, the
    rest those with the longest questions (a long prompt pushes the cache past length buckets
    the first records may not reach), each record once."""
    longest = sorted(range(len(records)), key=lambda i: -len(str(records[i].get("question", ""))))
    first = range(min(len(records), count - count // 2))
    return [records[i] for i in list(dict.fromkeys([*first, *longest]))[:count]]


def _warm_up(reasoner, records: list[dict], count: int, methods: Sequence[str]) -> None:
    """Compile every program the run will use before timing anything: each method on
    `warm_up_records` reaches the shape buckets (prompt, step, check width, attended cache
    length) the timed pass meets; the pass counts any compilation left and reports it."""
    chosen = warm_up_records(records, count)
    for m in methods:
        for record in chosen:
            try:
                reasoner.solve(record["question"], record.get("images") or record.get("image"), method=m)
            except Exception as e:  # the run records the failure per problem
                print(f"warm-up of '{m}' failed: {type(e).__name__}: {e}")
                break
    if "dreamr" in methods:  # check widths depend on timing: compile all of them
        first = records[0]
        try:
            reasoner.warm_up_checks(first["question"], first.get("images") or first.get("image"))
        except Exception as e:
            print(f"warm-up of dreamr's checks failed: {type(e).__name__}: {e}")


def _report_coverage(results: list[dict], records: list[dict], other_methods: Sequence[str]) -> None:
    """Say what the table stands on: records without a reference answer (solved, not in `acc`),
    rows an earlier run on this folder left for records this run's data lacks (in the table),
    and for methods this run did not ask for (not in it)."""
    ids = {json.dumps(r["id"], default=str) for r in results}
    ungraded = {json.dumps(r["id"], default=str) for r in results if r.get("reference") is None}
    if ungraded:
        print(f"note: {len(ungraded)} of {len(ids)} records have no reference answer: 'acc' is over the "
              f"'graded' ones only")
    ours = {json.dumps(r.get("id", i), default=str) for i, r in enumerate(records)}
    if ids - ours:
        print(f"note: the table includes {len(ids - ours)} records an earlier run on this folder solved that this "
              f"run's data does not hold (--fresh starts over)")
    if other_methods:
        print(f"note: results.jsonl also holds rows of {', '.join(other_methods)} (an earlier run's); "
              f"not in this table")
