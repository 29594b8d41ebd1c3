"""Projections: what a measured run would take on other hardware with other models.

A trace records every device call of a solve with its shape (`Interval.op`, `tokens`, `cached`,
`rows`, `patches`). `replay` re-runs a trace's schedule (`speculative.timeline.schedule`: each role in
its recorded order, every cross-role ordering of the real run kept) with each call priced by a
duration function; `price_calls` makes that function from the cost model
(`dreamr_jax.costmodel.call_seconds`: a model spec, a hardware description and a device count
per role); `project_results` does it for every row of a results file and summarises per method
(projected mean latency, projected speedup over `target`, where the target's time goes, and
per role the milliseconds per decoded token and per check). `dreamr project` prints it;
`dreamr eval/demo --project HW:DRAFT:TARGET` adds the projected speedup as a column.

What is projected is the schedule the run took: the same steps, acceptances and check packing.
A policy that reacts to timing (FPSR packs checks by what is ready) might choose differently on
the projected hardware; the replay keeps the measured choices.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .speculative.results import json_safe, read_results, write_atomically
from .speculative.timeline import schedule
from .speculative.trace import Interval, Trace

SecondsOf = Callable[[Interval], float]
ROLES = ("draft", "target")
# Where the target's time can go (the kinds `Interval.kind` records for the target); anything
# else it records is counted under "other".
TARGET_KINDS = ("prefill", "check", "fallback", "decode", "verify")
WIDTHS = ("int4", "bf16", "fp16", "fp32")  # the cost model's `name:width` suffixes


class ProjectionError(ValueError):
    """A bad input to a projection (option, results file, trace); the message names it."""


def _costmodel():
    try:
        return importlib.import_module("dreamr_jax.costmodel")
    except ModuleNotFoundError as e:
        if e.name != "dreamr_jax.costmodel":
            raise
        raise ProjectionError("projections need the cost model (dreamr_jax/costmodel.py), which this "
                              "installation does not have") from None


# ---- one trace ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Replay:
    """One trace replayed with priced calls: the projected wall-clock (`seconds`) and each
    call's projected (start, end) in the order of the real starts."""

    seconds: float
    calls: list[tuple[Interval, float, float]]

    @property
    def busy(self) -> dict[str, dict[str, float]]:
        """role -> kind -> projected busy seconds."""
        out: dict[str, dict[str, float]] = {}
        for call, start, end in self.calls:
            kinds = out.setdefault(call.role, {})
            kinds[call.kind] = kinds.get(call.kind, 0.0) + (end - start)
        return out

    def busy_time(self, role: str) -> float:
        return sum(self.busy.get(role, {}).values())


def replay(trace: Trace, seconds_of: SecondsOf) -> Replay:
    """`trace`'s calls replayed (`speculative.timeline.schedule`) with `seconds_of(call)` seconds each."""
    calls = schedule(trace, seconds_of)
    return Replay(max((end for _, _, end in calls), default=0.0), calls)


def _old_trace_error(source: str, what: str) -> ProjectionError:
    return ProjectionError(
        f"{source}: {what} does not record the shape of its device calls (`op`): it was written before calls "
        "recorded their shapes; rerun the evaluation (dreamr eval --fresh, or dreamr demo) to project it")


def price_calls(draft_spec, target_spec, hw, draft_devices: int, target_devices: int, *,
                source: str = "this trace") -> SecondsOf:
    """The duration function that prices a call with `costmodel.call_seconds`: the call's role
    picks (spec, devices), its op / tokens / rows / cached / patches the shape. A call without an
    `op` (a trace written before shapes were recorded) is a `ProjectionError` naming `source`."""
    cm = _costmodel()
    _check_devices(draft_devices, "draft")
    _check_devices(target_devices, "target")
    roles = {"draft": (draft_spec, draft_devices), "target": (target_spec, target_devices)}

    def seconds_of(call: Interval) -> float:
        if not call.op:
            raise _old_trace_error(source, f"a {call.role} {call.kind} call at {call.start:.6f} s")
        if call.role not in roles:
            raise ProjectionError(f"{source}: a call of unknown role {call.role!r} (known: draft, target)")
        spec, devices = roles[call.role]
        if spec is None:
            raise ProjectionError(f"{source}: its traces have {call.role} calls but no {call.role} model was given")
        rows = max(int(call.rows), 1)
        # A call ran at least one (padded) token per row even when it recorded fewer new ones
        # (a row with nothing pending, a decode stopped at once): price it as that.
        tokens = max(int(call.tokens), 1 if call.op == "prefill" else rows)
        try:
            return float(cm.call_seconds(spec, hw, devices, call.op, tokens=tokens, rows=rows,
                                         cached=max(int(call.cached), 0), patches=max(int(call.patches), 0)))
        except ValueError as e:
            raise ProjectionError(f"{source}: cannot price a {call.role} {call.kind} call ({call.op}, {call.tokens} "
                                  f"tokens, {call.rows} rows, {call.cached} cached): {e}") from e

    return seconds_of


def _check_devices(devices, role: str) -> None:
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ProjectionError(f"{role} devices must be an integer >= 1, got {devices!r}")


# ---- a results file -------------------------------------------------------------------------------


def read_result_rows(path: str) -> list[dict]:
    """The rows of a results JSONL (`dreamr eval` / `dreamr demo`), the latest of each
    (record, method) pair; a missing file or folder is a `ProjectionError`."""
    if not os.path.exists(path):
        raise ProjectionError(f"--results {path}: no such results file (dreamr eval / dreamr demo write "
                              "OUT/results.jsonl)")
    if os.path.isdir(path):
        raise ProjectionError(f"--results {path}: is a folder; give its results.jsonl")
    return list(read_results(path).values())


def _solved(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and isinstance(r.get("trace"), dict)]


def _methods(rows: Sequence[dict], methods: Optional[Sequence[str]]) -> list[str]:
    if methods is not None:
        return list(dict.fromkeys(methods))
    seen = list(dict.fromkeys(r["method"] for r in rows))
    return (["target"] if "target" in seen else []) + [m for m in seen if m != "target"]


def check_rows(rows: Sequence[dict], source: str = "results", *, has_draft: bool = True) -> list[dict]:
    """The solved rows, after checking what a projection needs of them: solved `target` rows
    (speedups are against it), traces that record each call's shape, and no draft calls when
    there is no draft model to price them."""
    solved = _solved(rows)
    if not any(r["method"] == "target" for r in solved):
        raise ProjectionError(f"{source}: holds no solved `target` rows; projected speedups are over the target "
                              "alone on the same records (dreamr eval always runs it: rerun with it)")
    for r in solved:
        if any(not iv.get("op") for iv in r["trace"].get("intervals", [])):
            raise _old_trace_error(source, f"the trace of record {r.get('id')!r} ({r['method']})")
        if not has_draft and any(iv.get("role") == "draft" for iv in r["trace"].get("intervals", [])):
            raise ProjectionError(f"{source}: record {r.get('id')!r} ({r['method']}) has draft calls but no draft "
                                  "model was given to price them (--draft)")
    return solved


def kv_tokens_needed(rows: Sequence[dict]) -> dict[str, tuple[int, int]]:
    """Per role, the largest KV cache it held in any solved trace, as (tokens per row, rows): the
    longest prompt + the trace's committed tokens, or more where a call held more (drafts ahead
    of the commit point, a check's packed drafts, lookahead's parallel rows: rows of cached + new
    tokens each)."""
    need = {role: (0, 1) for role in ROLES}
    for r in _solved(rows):
        t = r["trace"]
        committed = sum(len(s.get("token_ids", [])) for s in t.get("steps", []))
        for iv in t.get("intervals", []):
            role = iv.get("role")
            if role not in need:
                continue
            n_rows = max(int(iv.get("rows", 1) or 1), 1)
            tokens = int(iv.get("tokens", 0) or 0)
            held = [(int(iv.get("cached", 0) or 0) + -(-tokens // n_rows), n_rows)]  # per row, rounded up
            if iv.get("op") == "prefill" or iv.get("kind") == "prefill":
                held.append((tokens + committed, 1))
            for kv, n in held:
                if kv * n > need[role][0] * need[role][1]:
                    need[role] = (kv, n)
    return need


def check_fits(draft_spec, target_spec, hw, draft_devices: int, target_devices: int, kv_tokens) -> None:
    """`costmodel.check_fits` for each role given, with its `kv_tokens_needed` (tokens per row,
    rows) or one token count for both; its `CostModelError` names the memory needed."""
    cm = _costmodel()
    if isinstance(kv_tokens, int):
        kv_tokens = {role: (kv_tokens, 1) for role in ROLES}
    for spec, devices, role in ((draft_spec, draft_devices, "draft"), (target_spec, target_devices, "target")):
        if spec is not None:
            tokens, rows = kv_tokens.get(role, (0, 1))
            cm.check_fits(spec, hw, devices, kv_tokens=int(tokens), rows=int(rows))


def project_results(rows: Sequence[dict], draft_spec=None, target_spec=None, hw=None, draft_devices: int = 1,
                    target_devices: int = 1, *, seconds_of: Optional[SecondsOf] = None, source: str = "results",
                    methods: Optional[Sequence[str]] = None) -> list[dict]:
    """Per method (target first): every solved trace of `rows` replayed with priced calls.

    The calls are priced by `seconds_of` when given, else by the cost model (`price_calls` with
    the specs, `hw` and the device counts) after checking that both models fit their devices
    with the longest context the traces reached (`kv_tokens_needed`). Each method's dict:
    `records` (solved), `projected_latency_s` (mean over them), `projected_speedup` and
    `measured_speedup` (mean target latency / mean latency over the records both solved: the
    projected seconds and the measured wall-clock), `compared` (those records),
    `target_time_shares` (share of the target's projected busy seconds in each kind of call:
    prefill, check, fallback, decode, verify, other), `target_busy_share` (the target's busy
    seconds over the projected latency) and `roles`: per role `ms_per_decoded_token` (projected
    ms of its decode calls per token they generated) and `ms_per_check` (projected ms per check
    call); None where a role made no such call."""
    solved = check_rows(rows, source, has_draft=seconds_of is not None or draft_spec is not None)
    if seconds_of is None:
        _check_devices(draft_devices, "draft")
        _check_devices(target_devices, "target")
        check_fits(draft_spec, target_spec, hw, draft_devices, target_devices, kv_tokens_needed(solved))
        seconds_of = price_calls(draft_spec, target_spec, hw, draft_devices, target_devices, source=source)
    methods = _methods(solved, methods)
    per_method: dict[str, dict] = {}  # method -> id key -> (projected s, measured s, Replay)
    for m in methods:
        per_method[m] = {}
        for r in solved:
            if r["method"] == m:
                rep = replay(Trace.from_dict(r["trace"]), seconds_of)
                per_method[m][json.dumps(r["id"], default=str)] = (rep.seconds, float(r["trace"].get("wall_time", 0.0)),
                                                                    rep)
    target = per_method.get("target") or {
        json.dumps(r["id"], default=str): (replay(Trace.from_dict(r["trace"]), seconds_of).seconds,
                                           float(r["trace"].get("wall_time", 0.0)), None)
        for r in solved if r["method"] == "target"}
    out = []
    for m in methods:
        runs = per_method[m]
        both = [k for k in runs if k in target]
        out.append(_method_summary(m, runs, target, both))
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def _method_summary(method: str, runs: dict, target: dict, both: list) -> dict:
    latency = float(np.mean([p for p, _, _ in runs.values()])) if runs else float("nan")
    proj_speedup = meas_speedup = float("nan")
    if both:
        proj_speedup = _ratio(float(np.mean([target[k][0] for k in both])), float(np.mean([runs[k][0] for k in both])))
        meas_speedup = _ratio(float(np.mean([target[k][1] for k in both])), float(np.mean([runs[k][1] for k in both])))
    target_kinds: dict[str, float] = {}
    decode_s = {role: 0.0 for role in ROLES}
    decoded = {role: 0 for role in ROLES}
    check_s = {role: 0.0 for role in ROLES}
    checks = {role: 0 for role in ROLES}
    for _, _, rep in runs.values():
        for call, start, end in rep.calls:
            seconds = end - start
            if call.role == "target":
                kind = call.kind if call.kind in TARGET_KINDS else "other"
                target_kinds[kind] = target_kinds.get(kind, 0.0) + seconds
            if call.role in decode_s and call.op == "decode":
                decode_s[call.role] += seconds
                decoded[call.role] += call.tokens
            if call.role in check_s and call.kind == "check":
                check_s[call.role] += seconds
                checks[call.role] += 1
    target_busy = sum(target_kinds.values())
    shares = {k: _ratio(target_kinds.get(k, 0.0), target_busy) for k in TARGET_KINDS + ("other",)}
    return {
        "method": method, "records": len(runs), "compared": len(both),
        "projected_latency_s": latency, "projected_speedup": proj_speedup, "measured_speedup": meas_speedup,
        "target_time_shares": shares,
        "target_busy_share": _ratio(target_busy, sum(p for p, _, _ in runs.values())),
        "roles": {role: {"ms_per_decoded_token": 1000 * decode_s[role] / decoded[role] if decoded[role] else None,
                         "ms_per_check": 1000 * check_s[role] / checks[role] if checks[role] else None}
                  for role in ROLES},
    }


# ---- the assumptions: hardware, models, devices --------------------------------------------------


def parse_devices(text: str, flag: str = "--project-devices") -> tuple[int, int]:
    """'DRAFT:TARGET' device counts, each an integer >= 1."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        draft, target = int(parts[0]), int(parts[1])
    except ValueError:
        raise ProjectionError(f"{flag} {text!r}: expected DRAFT:TARGET device counts, e.g. 2:4") from None
    if draft < 1 or target < 1:
        raise ProjectionError(f"{flag} {text!r}: device counts must be >= 1")
    return draft, target


@dataclasses.dataclass
class Projection:
    """Hardware, the two models and their device counts, as named on the command line
    (`HW:DRAFT:TARGET`, `--project-devices D:T`); `resolve` looks them up in the cost model."""

    hardware: str
    draft: str
    target: str
    draft_devices: int = 1
    target_devices: int = 1
    hw: object = None
    draft_spec: object = None
    target_spec: object = None

    @classmethod
    def parse(cls, text: str, devices: str = "1:1", flag: str = "--project") -> "Projection":
        """`HW:DRAFT:TARGET`: the hardware up to the first colon, the draft up to the next, and the
        rest the target (whose name may hold a colon itself: `qwen3-vl-32b:int4`). A width right
        after the draft (`l40s:qwen3-vl-2b:int4:qwen3-vl-32b`) belongs to the draft: no model
        name starts with one."""
        parts = [p.strip() for p in str(text).split(":", 2)]
        if len(parts) != 3 or not all(parts):
            raise ProjectionError(f"{flag} {text!r}: expected HW:DRAFT:TARGET, e.g. "
                                  "l40s:qwen3-vl-2b:qwen3-vl-32b:int4")
        width, _, rest = parts[2].partition(":")
        if width in WIDTHS and rest.strip():
            parts = [parts[0], f"{parts[1]}:{width}", rest.strip()]
        draft_devices, target_devices = parse_devices(devices)
        return cls(*parts, draft_devices, target_devices)

    @property
    def label(self) -> str:
        """The hardware as a short name (a JSON file's stem): the column is `projected@<label>`."""
        if self.hardware.endswith(".json") or os.sep in self.hardware:
            return os.path.splitext(os.path.basename(self.hardware))[0]
        return self.hardware

    @property
    def column(self) -> str:
        return f"projected@{self.label}"

    def resolve(self) -> "Projection":
        """Look up the hardware and both models (the cost model's errors name what is unknown)
        and check that each model's weights fit its devices; before any work."""
        cm = _costmodel()
        _check_devices(self.draft_devices, "draft")
        _check_devices(self.target_devices, "target")
        self.hw = cm.hardware(self.hardware)
        self.draft_spec = cm.model_spec(self.draft) if self.draft else None
        self.target_spec = cm.model_spec(self.target)
        check_fits(self.draft_spec, self.target_spec, self.hw, self.draft_devices, self.target_devices, 0)
        return self

    def project(self, rows: Sequence[dict], *, source: str = "results",
                methods: Optional[Sequence[str]] = None) -> list[dict]:
        if self.hw is None:
            self.resolve()
        return project_results(rows, self.draft_spec, self.target_spec, self.hw, self.draft_devices,
                               self.target_devices, source=source, methods=methods)

    def assumptions(self) -> str:
        draft = (f"draft {self.draft} on {self.draft_devices} device{'s' * (self.draft_devices != 1)}"
                 if self.draft else "no draft model")
        return (f"assumptions: hardware {describe_hardware(self.hw, self.hardware)}; {draft}; target {self.target} on "
                f"{self.target_devices} device{'s' * (self.target_devices != 1)}; each role on its own devices, "
                f"the measured schedule replayed with every call priced by the cost model")

    def to_dict(self) -> dict:
        return {"hardware": self.hardware, "draft": self.draft, "target": self.target,
                "draft_devices": self.draft_devices, "target_devices": self.target_devices}


def describe_hardware(hw, fallback: str = "") -> str:
    if hw is None:
        return fallback
    name = getattr(hw, "name", None) or fallback
    bits = []
    flops, bandwidth, memory = (getattr(hw, k, None) for k in ("peak_flops", "mem_bandwidth", "memory"))
    if isinstance(flops, (int, float)) and flops:
        bits.append(f"{flops / 1e12:g} TFLOP/s")
    if isinstance(bandwidth, (int, float)) and bandwidth:
        bits.append(f"{bandwidth / 1e9:g} GB/s")
    if isinstance(memory, (int, float)) and memory:
        bits.append(f"{memory / 1e9:.1f} GB")
    return f"{name} ({', '.join(bits)})" if bits else str(name)


# ---- output: table, JSON, plot ---------------------------------------------------------------------


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(summaries: Sequence[dict]) -> str:
    head = (f"{'method':<11} {'n':>4} {'proj s':>9} {'proj x':>7} {'meas x':>7} | target time: {'prefill':>7} "
            f"{'check':>6} {'fallbk':>6} {'decode':>6} {'verify':>6} | {'tgt ms/tok':>10} {'drf ms/tok':>10} "
            f"{'ms/check':>8}")
    lines = [head, "-" * len(head)]
    for s in summaries:
        sh = s["target_time_shares"]
        pct = [_fmt(100 * sh[k], ".1f") + "%" if sh[k] == sh[k] else "-"
               for k in ("prefill", "check", "fallback", "decode", "verify")]
        roles = s["roles"]
        lines.append(f"{s['method']:<11} {s['records']:>4} {_fmt(s['projected_latency_s'], '.4f'):>9} "
                     f"{_fmt(s['projected_speedup'], '.2f') + 'x':>7} {_fmt(s['measured_speedup'], '.2f') + 'x':>7} | "
                     f"{'':>12} {pct[0]:>7} {pct[1]:>6} {pct[2]:>6} {pct[3]:>6} {pct[4]:>6} | "
                     f"{_fmt(roles['target']['ms_per_decoded_token'], '.3f'):>10} "
                     f"{_fmt(roles['draft']['ms_per_decoded_token'], '.3f'):>10} "
                     f"{_fmt(roles['target']['ms_per_check'], '.2f'):>8}")
    return "\n".join(lines)


def to_json(summaries: Sequence[dict], projection: Optional[Projection] = None, source: str = "") -> dict:
    doc = {"results": source, "assumptions": projection.to_dict() if projection else None,
           "methods": {s["method"]: {k: v for k, v in s.items() if k != "method"} for s in summaries}}
    return json_safe(doc)


def plot_projected_speedup(summaries: Sequence[dict], path: str, title: str = "") -> None:
    """Per method, the measured speedup over the target beside the projected one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["method"] for s in summaries]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4.2))
    for offset, key, label, colour in ((-0.2, "measured_speedup", "measured", "tab:grey"),
                                       (0.2, "projected_speedup", "projected", "tab:blue")):
        vals = [s[key] if s[key] == s[key] else 0.0 for s in summaries]
        bars = ax.bar(x + offset, vals, 0.4, label=label, color=colour)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}x", (b.get_x() + b.get_width() / 2, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, names)
    ax.set_ylabel("mean speedup over target alone")
    ax.set_title(title or "projected vs measured speedup", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def check_output_path(path: Optional[str], flag: str) -> None:
    """An output file's folder must exist and the path must not be a folder."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ProjectionError(f"{flag} {path}: is a folder")
    if not os.path.isdir(folder):
        raise ProjectionError(f"{flag} {path}: its folder {folder} does not exist")


def speedup_column(projection: Projection, results: Sequence[dict], methods: Sequence[str],
                   source: str = "results") -> dict[str, float]:
    """{method: projected speedup} for `dreamr eval/demo --project`."""
    return {s["method"]: s["projected_speedup"] for s in projection.project(results, source=source, methods=methods)}


# ---- FPSR's steady state: speedup as a function of acceptance ---------------------------------


def steady_state_speedup(acceptance: float, t_draft: float, t_target: float, t_check: float, step_tokens: float,
                         length_ratio: float = 1.0) -> float:
    """dreamr over the target alone per reasoning step, in FPSR's steady state with each role on
    its own devices (a model of ours; the paper gives no closed form): the target alone takes
    L t_t per step; an accepted step costs max(L t_d, t_c) (drafting pipelines against the
    checks), a rejected one max(L t_t, L t_d + t_c) (the target's own step, started with the
    draft's, commits once the check failed). t_d, t_t: seconds per decoded token; t_c: seconds
    per check of one step; L: tokens per step; `length_ratio`: dreamr's trace length over the
    target's. Its bound as t_d, t_c -> 0 is 1 / (1 - acceptance)."""
    a, L = acceptance, step_tokens
    per_step = a * max(L * t_draft, t_check) + (1 - a) * max(L * t_target, L * t_draft + t_check)
    return L * t_target / (per_step * length_ratio)


def acceptance_for(speedup: float, t_draft: float, t_target: float, t_check: float, step_tokens: float,
                   length_ratio: float = 1.0) -> float | None:
    """The lowest acceptance at which `steady_state_speedup` reaches `speedup` (it grows with
    acceptance), or None if not even at 100%."""
    args = (t_draft, t_target, t_check, step_tokens, length_ratio)
    if steady_state_speedup(1.0, *args) < speedup:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection to well below a rounding of the printed share
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if steady_state_speedup(mid, *args) < speedup else (lo, mid)
    return hi
