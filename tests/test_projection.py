"""Replay and projections (`dreamr_jax.projection`, `speculative.timeline` with priced calls,
`dreamr project`, `--project` on eval/demo): hand-made traces and a fake cost model whose
prices are worked out by hand; no models load. One end-to-end test runs the real cost model's
presets when `dreamr_jax/costmodel.py` exists."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import types
from types import SimpleNamespace

import pytest

from dreamr_jax import projection as pj
from dreamr_jax.cli import build_parser, main
from dreamr_jax.speculative.timeline import project, schedule
from dreamr_jax.speculative.trace import Interval, Step, Trace


def _old_project(trace: Trace) -> float:
    """`timeline.project` as it was before it took a duration function (verbatim)."""
    calls = sorted(trace.intervals, key=lambda i: i.start)
    projected_end: dict[int, float] = {}
    last_end = {"draft": 0.0, "target": 0.0}
    for idx, call in enumerate(calls):
        start = last_end.get(call.role, 0.0)
        for j in range(idx):
            other = calls[j]
            if other.role != call.role and other.end <= call.start:
                start = max(start, projected_end[j])
        projected_end[idx] = start + call.duration
        last_end[call.role] = projected_end[idx]
    return max(projected_end.values(), default=0.0)


def iv(role, kind, start, end, tokens=0, op="extend", cached=0, rows=1, patches=0):
    return Interval(role, kind, start, end, tokens, op=op, cached=cached, rows=rows, patches=patches)


# One DREAM-R problem, real (measured) times in seconds. The draft's step 1 is checked and
# rejected, the target writes its own step (fallback); the draft writes step 2 while the target,
# in eager mode, starts its own step 2 (a fallback chunk cancelled when the check accepts).
HAND = [
    iv("target", "prefill", 0.0, 4.0, 40, "prefill", patches=16),   # 1
    iv("draft", "prefill", 0.5, 2.0, 40, "prefill", patches=16),    # 2
    iv("draft", "draft", 2.0, 3.0, 10, "decode", cached=40),        # 3  step 1 drafted
    iv("target", "check", 4.0, 5.0, 12, "extend", cached=40),       # 4  check of step 1: rejected
    iv("target", "fallback", 5.0, 7.0, 8, "decode", cached=41),     # 5  the target's step 1
    iv("draft", "draft", 7.5, 8.0, 10, "decode", cached=49),        # 6  step 2 drafted
    iv("target", "fallback", 7.2, 7.9, 2, "decode", cached=49),     # 7  eager chunk of step 2, cancelled
    iv("target", "check", 8.1, 9.0, 12, "extend", cached=49),       # 8  check of step 2: accepted
]
# The projected hardware's seconds for each call (keyed by role, kind and real start).
PRICED = {("target", "prefill", 0.0): 3.0, ("draft", "prefill", 0.5): 1.0, ("draft", "draft", 2.0): 0.5,
          ("target", "check", 4.0): 1.5, ("target", "fallback", 5.0): 2.0, ("draft", "draft", 7.5): 0.5,
          ("target", "fallback", 7.2): 0.25, ("target", "check", 8.1): 1.5}


def priced(call: Interval) -> float:
    return PRICED[(call.role, call.kind, call.start)]


def test_replay_of_a_hand_made_trace():
    trace = Trace("dreamr", intervals=list(HAND))
    rep = pj.replay(trace, priced)
    # In the order of the real starts (1, 2, 3, 4, 5, 7, 6, 8); a call starts when its role's last
    # call ended and when every call of the other role that had ended (real times) before its
    # real start has ended (projected times):
    # 1 T prefill : 0                                   -> [0.0, 3.0]
    # 2 D prefill : 0 (T prefill ends 4.0 > 0.5)        -> [0.0, 1.0]
    # 3 D draft   : after 2 (T prefill ends 4.0 > 2.0)  -> [1.0, 1.5]
    # 4 T check   : after 1 (3.0); D 2, 3 ended by 4.0 (1.5)            -> [3.0, 4.5]
    # 5 T fallbk  : after 4 (4.5); D 2, 3 (1.5)                         -> [4.5, 6.5]
    # 7 T eager   : after 5 (6.5); D 6 not yet (real end 8.0 > 7.2)     -> [6.5, 6.75]
    # 6 D draft   : after 3 (1.5); T 1, 4, 5 ended by 7.5 (6.5); T 7 ends 7.9 > 7.5 -> [6.5, 7.0]
    # 8 T check   : after 7 (6.75); D 6 ended by 8.1 (7.0)              -> [7.0, 8.5]
    assert rep.seconds == pytest.approx(8.5)
    ends = {(c.role, c.kind, c.start): (s, e) for c, s, e in rep.calls}
    assert ends[("target", "fallback", 7.2)] == pytest.approx((6.5, 6.75))
    assert ends[("draft", "draft", 7.5)] == pytest.approx((6.5, 7.0))
    # busy seconds per role and kind: the cancelled eager chunk costs its time too
    assert rep.busy["target"] == pytest.approx({"prefill": 3.0, "check": 3.0, "fallback": 2.25})
    assert rep.busy["draft"] == pytest.approx({"prefill": 1.0, "draft": 1.0})
    assert rep.busy_time("target") == pytest.approx(8.25)
    assert project(trace, priced) == rep.seconds
    # with the recorded durations: the same as the timeline projection of the run


def test_generalised_timeline_default_equals_the_old_projection():
    rng = random.Random(0)
    traces = [Trace("dreamr", intervals=list(HAND)), Trace("target")]
    for _ in range(200):  # random two-role schedules: each role's calls back to back with gaps
        calls = []
        for role in ("draft", "target"):
            t = rng.uniform(0, 1)
            for _ in range(rng.randint(0, 8)):
                d = rng.uniform(0, 1)
                calls.append(Interval(role, rng.choice(["draft", "check", "fallback"]), t, t + d))
                t += d + rng.choice([0.0, rng.uniform(0, 0.5)])
        rng.shuffle(calls)
        traces.append(Trace("dreamr", intervals=calls))
    for trace in traces:
        assert project(trace) == _old_project(trace)  # exactly, not approximately
        assert project(trace, lambda c: c.duration) == _old_project(trace)
    with pytest.raises(ValueError, match="target check call .* finite number of seconds >= 0"):
        schedule(Trace("dreamr", intervals=[iv("target", "check", 0.0, 1.0)]), lambda c: -1.0)


# ---- a fake cost model: seconds = per_token x tokens / devices, a tenth of it for prefill/extend ---------


class FakeCostModelError(ValueError):
    pass


def fake_costmodel(fits: list, priced_calls: list | None = None) -> types.ModuleType:
    priced_calls = [] if priced_calls is None else priced_calls
    m = types.ModuleType("dreamr_jax.costmodel")
    m.CostModelError = FakeCostModelError
    hw = {"l40s": SimpleNamespace(name="l40s", peak_flops=362e12, mem_bandwidth=864e9, memory=48e9)}
    specs = {"small": SimpleNamespace(name="small", per_token=0.01, max_kv=1000),
             "big:int4": SimpleNamespace(name="big:int4", per_token=0.1, max_kv=1000),
             "huge": SimpleNamespace(name="huge", per_token=1.0, max_kv=50)}

    def hardware(name):
        if name not in hw:
            raise FakeCostModelError(f"unknown hardware {name!r}; known: l40s")
        return hw[name]

    def model_spec(name):
        if name not in specs:
            raise FakeCostModelError(f"unknown model {name!r}; known: {', '.join(specs)}")
        return specs[name]

    def call_seconds(spec, hw, devices, op, *, tokens, rows=1, cached=0, patches=0):
        if op not in ("prefill", "extend", "decode") or tokens < 1 or (op != "prefill" and tokens < rows):
            raise FakeCostModelError(f"{op}: bad shape, tokens={tokens}, rows={rows}")
        priced_calls.append((op, tokens, rows, cached, patches))
        return spec.per_token * tokens / devices * (1.0 if op == "decode" else 0.1)

    def check_fits(spec, hw, devices, *, kv_tokens, rows=1):
        fits.append((spec.name, devices, kv_tokens, rows))
        if rows * kv_tokens > spec.max_kv:
            raise FakeCostModelError(f"{spec.name} needs {rows} x {kv_tokens} KV tokens of memory on {devices} "
                                     f"devices; {hw.name} holds {spec.max_kv}")

    m.hardware, m.model_spec, m.call_seconds, m.check_fits = hardware, model_spec, call_seconds, check_fits
    return m


@pytest.fixture
def fits(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "dreamr_jax.costmodel", fake_costmodel(calls))
    return calls


def _row(rid, method, intervals, tokens, wall, author="target"):
    trace = Trace(method, steps=[Step("x", list(range(tokens)), author)], wall_time=wall, intervals=intervals,
                  finish_reason="answer", answer="4")
    trace.extra["projected_time"] = project(trace)  # as `SpeculativeReasoner.solve` records it
    return {"id": rid, "method": method, "reference": "4", "status": "ok", "trace": trace.to_dict()}


def hand_rows() -> list[dict]:
    T, D = "target", "draft"
    return [
        _row("a", "target", [iv(T, "prefill", 0, 1, 10, "prefill"), iv(T, "decode", 1, 3, 20, "decode", cached=10)],
             20, 3.0),
        _row("b", "target", [iv(T, "prefill", 0, 1, 10, "prefill"), iv(T, "decode", 1, 4, 30, "decode", cached=10)],
             30, 4.0),
        _row("c", "target", [iv(T, "prefill", 0, 1, 10, "prefill"), iv(T, "decode", 1, 11, 99, "decode", cached=10)],
             99, 11.0),
        _row("a", "dreamr", [iv(T, "prefill", 0, 1, 10, "prefill"), iv(D, "prefill", 0, 0.5, 10, "prefill"),
                             iv(D, "draft", 0.5, 1.0, 20, "decode", cached=10),
                             iv(T, "check", 1.0, 2.0, 22, "extend", cached=10)], 20, 2.0, author="draft"),
        _row("b", "dreamr", [iv(T, "prefill", 0, 1, 10, "prefill"), iv(D, "prefill", 0, 0.5, 10, "prefill"),
                             iv(D, "draft", 0.5, 1.0, 30, "decode", cached=10),
                             iv(T, "check", 1.0, 2.0, 32, "extend", cached=10),
                             iv(T, "fallback", 2.0, 3.0, 10, "decode", cached=11)], 10, 3.0),
        {"id": "c", "method": "dreamr", "reference": "4", "status": "error", "error": "boom"},
    ]


# Hand-priced (target 0.1 s/token, draft 0.01 s/token; prefill and extend a tenth of that):
#   target a: prefill 10 -> 0.1, decode 20 -> 2.0: 2.1 s;  b: 0.1 + 3.0 = 3.1 s;  c: 0.1 + 9.9 = 10.0 s
#   dreamr a: T prefill [0, 0.1], D prefill [0, 0.01], D draft 20 -> [0.01, 0.21],
#             T check 22 -> 0.22 after the draft (ended by the check's real start) -> [0.21, 0.43]: 0.43 s
#   dreamr b: D draft 30 -> [0.01, 0.31], check 32 -> [0.31, 0.63], fallback 10 -> 1.0 -> [0.63, 1.63]: 1.63 s
#   dreamr c failed: speedups compare a and b only
TARGET_AB = (2.1 + 3.1) / 2
DREAMR_AB = (0.43 + 1.63) / 2


def _by_method(summaries):
    return {s["method"]: s for s in summaries}


def test_project_results_with_a_fake_cost_model(fits):
    cm = sys.modules["dreamr_jax.costmodel"]
    hw, small, big = cm.hardware("l40s"), cm.model_spec("small"), cm.model_spec("big:int4")
    out = _by_method(pj.project_results(hand_rows(), small, big, hw, 1, 1, source="run/results.jsonl"))
    assert list(out) == ["target", "dreamr"]
    t, d = out["target"], out["dreamr"]
    assert t["records"] == 3 and d["records"] == 2 and d["compared"] == 2
    assert t["projected_latency_s"] == pytest.approx((2.1 + 3.1 + 10.0) / 3)
    assert t["projected_speedup"] == pytest.approx(1.0)
    assert d["projected_latency_s"] == pytest.approx(DREAMR_AB)
    assert d["projected_speedup"] == pytest.approx(TARGET_AB / DREAMR_AB)  # 2.6 / 1.03 = 2.52x
    assert d["measured_speedup"] == pytest.approx((3.0 + 4.0) / (2.0 + 3.0))  # wall clocks of a and b
    # the target's projected time in dreamr: prefill 0.1 + 0.1, checks 0.22 + 0.32, fallback 1.0 (of 1.74)
    shares = d["target_time_shares"]
    assert shares["prefill"] == pytest.approx(0.2 / 1.74)
    assert shares["check"] == pytest.approx(0.54 / 1.74)
    assert shares["fallback"] == pytest.approx(1.0 / 1.74)
    assert shares["decode"] == 0.0 and shares["verify"] == 0.0
    assert d["target_busy_share"] == pytest.approx(1.74 / (0.43 + 1.63))
    assert t["target_time_shares"]["decode"] == pytest.approx(14.9 / 15.2)  # decodes 2.0 + 3.0 + 9.9 of 15.2
    # per role: target decodes 10 tokens in 1.0 s (100 ms each), the draft 50 in 0.5 s (10 ms),
    # two checks of 0.22 and 0.32 s (270 ms each)
    assert d["roles"]["target"]["ms_per_decoded_token"] == pytest.approx(100.0)
    assert d["roles"]["draft"]["ms_per_decoded_token"] == pytest.approx(10.0)
    assert d["roles"]["target"]["ms_per_check"] == pytest.approx(270.0)
    assert d["roles"]["draft"]["ms_per_check"] is None
    assert t["roles"]["target"]["ms_per_decoded_token"] == pytest.approx(100.0)  # 14.9 s / 149 tokens
    assert t["roles"]["draft"] == {"ms_per_decoded_token": None, "ms_per_check": None}
    # the models were checked to fit the longest context each role held: the target prompt 10 +
    # 99 tokens of record c; the draft's prompt 10 + its 30 drafted tokens of record b
    assert sorted(fits) == [("big:int4", 1, 109, 1), ("small", 1, 40, 1)]
    # device counts divide the fake's seconds: everything halves, the speedup stays
    half = _by_method(pj.project_results(hand_rows(), small, big, hw, 2, 2))
    assert half["dreamr"]["projected_latency_s"] == pytest.approx(DREAMR_AB / 2)
    # the same with a pricing function passed in (no cost model involved)
    rate = {"draft": 0.01, "target": 0.1}
    direct = _by_method(pj.project_results(
        hand_rows(), seconds_of=lambda c: rate[c.role] * c.tokens * (1.0 if c.op == "decode" else 0.1)))
    assert direct["dreamr"]["projected_speedup"] == pytest.approx(TARGET_AB / DREAMR_AB)


def test_price_calls_passes_each_calls_shape(monkeypatch):
    priced_calls = []
    cm = fake_costmodel([], priced_calls)
    monkeypatch.setitem(sys.modules, "dreamr_jax.costmodel", cm)
    seconds_of = pj.price_calls(cm.model_spec("small"), cm.model_spec("big:int4"), cm.hardware("l40s"), 2, 4)
    # target: 0.1 s/token over 4 devices, a tenth for prefill / extend; draft: 0.01 s/token over 2
    assert seconds_of(iv("target", "prefill", 0, 1, 40, "prefill", patches=16)) == pytest.approx(0.1 * 40 / 4 * 0.1)
    assert seconds_of(iv("draft", "draft", 0, 1, 12, "decode", cached=40, rows=3)) == pytest.approx(0.01 * 12 / 2)
    # a call that recorded fewer new tokens than rows still ran a (padded) token per row
    assert seconds_of(iv("target", "check", 0, 1, 0, "extend", cached=7, rows=4)) == pytest.approx(0.1 * 4 / 4 * 0.1)
    assert priced_calls == [("prefill", 40, 1, 0, 16), ("decode", 12, 3, 40, 0), ("extend", 4, 4, 7, 0)]
    # the cost model's refusal names the call and the file
    seconds_of = pj.price_calls(None, cm.model_spec("big:int4"), cm.hardware("l40s"), 1, 1, source="r.jsonl")
    with pytest.raises(pj.ProjectionError, match=r"r.jsonl: cannot price a target fallback call \(verify"):
        seconds_of(iv("target", "fallback", 0, 1, 3, "verify"))
    with pytest.raises(pj.ProjectionError, match="devices must be an integer >= 1"):
        pj.price_calls(None, cm.model_spec("big:int4"), cm.hardware("l40s"), 1, 0)


def test_kv_tokens_needed_counts_rows():
    T = "target"
    rows = [_row(1, "lookahead", [iv(T, "prefill", 0, 1, 30, "prefill"),
                                  # 4 rows of 50 cached + 10 new each: 4 x 60 > the prompt 30 + 20 committed
                                  iv(T, "fallback", 1, 2, 40, "decode", cached=50, rows=4)], 20, 2.0),
            _row(2, "target", [iv(T, "prefill", 0, 1, 100, "prefill")], 90, 2.0)]  # 100 + 90: one row of 190
    assert pj.kv_tokens_needed(rows) == {"draft": (0, 1), "target": (60, 4)}
    assert pj.kv_tokens_needed(rows[1:]) == {"draft": (0, 1), "target": (190, 1)}


def test_models_that_do_not_fit_are_an_error_before_replaying(fits):
    cm = sys.modules["dreamr_jax.costmodel"]
    with pytest.raises(FakeCostModelError, match="huge needs 1 x 109 KV tokens"):
        pj.project_results(hand_rows(), cm.model_spec("small"), cm.model_spec("huge"), cm.hardware("l40s"), 1, 1,
                           seconds_of=None)


def test_results_without_target_rows_are_an_error():
    rows = [r for r in hand_rows() if r["method"] != "target"]
    with pytest.raises(pj.ProjectionError, match=r"run/results.jsonl: holds no solved `target` rows"):
        pj.project_results(rows, seconds_of=lambda c: 1.0, source="run/results.jsonl")
    failed = [dict(r, status="error") if r["method"] == "target" else r for r in hand_rows()]
    with pytest.raises(pj.ProjectionError, match="no solved `target` rows"):
        pj.project_results(failed, seconds_of=lambda c: 1.0)


def test_old_traces_without_op_are_an_error_naming_the_file(fits):
    rows = hand_rows()
    for r in rows:  # as written before calls recorded their shapes
        for i in r.get("trace", {}).get("intervals", []):
            for key in ("op", "cached", "rows", "patches"):
                i.pop(key)
    with pytest.raises(pj.ProjectionError, match=r"old/results.jsonl: .*before calls recorded their shapes; rerun"):
        pj.project_results(rows, seconds_of=lambda c: 1.0, source="old/results.jsonl")
    # and when a single call lacks it, priced one by one
    cm = sys.modules["dreamr_jax.costmodel"]
    seconds_of = pj.price_calls(None, cm.model_spec("big:int4"), cm.hardware("l40s"), 1, 1, source="old.jsonl")
    with pytest.raises(pj.ProjectionError, match="old.jsonl: .*rerun"):
        seconds_of(Interval("target", "check", 0.0, 1.0, 5))
    with pytest.raises(pj.ProjectionError, match="draft calls but no draft model"):
        seconds_of(iv("draft", "draft", 0.0, 1.0, 5, "decode"))


def test_project_option_parsing_keeps_the_targets_colon():
    for command in (["eval", "--config", "c.yaml", "--data", "d.jsonl"], ["demo"]):
        args = build_parser().parse_args(command + ["--project", "l40s:qwen3-vl-2b:qwen3-vl-32b:int4",
                                                    "--project-devices", "2:4"])
        p = pj.Projection.parse(args.project, args.project_devices)
        assert (p.hardware, p.draft, p.target) == ("l40s", "qwen3-vl-2b", "qwen3-vl-32b:int4")
        assert (p.draft_devices, p.target_devices) == (2, 4)
        assert p.column == "projected@l40s"
        assert build_parser().parse_args(command).project is None
    assert pj.Projection.parse("hw/my.json:a:b").column == "projected@my"
    # a quantised draft: the width right after the draft is the draft's (no model is named "int4")
    p = pj.Projection.parse("l40s:qwen3-vl-2b:int4:qwen3-vl-32b:int4")
    assert (p.draft, p.target) == ("qwen3-vl-2b:int4", "qwen3-vl-32b:int4")
    assert pj.Projection.parse("l40s:d:int4").target == "int4"  # nothing after it: the target's name
    assert (pj.Projection.parse("l40s:a:b").draft_devices, pj.Projection.parse("l40s:a:b").target_devices) == (1, 1)
    for bad in ("l40s", "l40s:qwen3-vl-2b", "l40s::big", ":a:b"):
        with pytest.raises(pj.ProjectionError, match="expected HW:DRAFT:TARGET"):
            pj.Projection.parse(bad)
    for bad in ("0:1", "2", "a:b", "1:2:3"):
        with pytest.raises(pj.ProjectionError, match="--project-devices"):
            pj.Projection.parse("l40s:a:b", bad)


def test_eval_and_demo_check_project_before_work(fits, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?"}\n')
    base = ["eval", "--config", "configs/synthetic.yaml", "--data", str(data), "--out", str(tmp_path / "o")]
    for extra, message in ((["--project", "gpu9:small:big:int4"], "unknown hardware 'gpu9'"),
                           (["--project", "l40s:small:bigger"], "unknown model 'bigger'"),
                           (["--project", "l40s:small:big:int4", "--project-devices", "0:1"], "device counts"),
                           (["--project-devices", "2:4"], "--project-devices needs --project")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
        assert main(["demo", "--out", str(tmp_path / "o"), "--count", "1"] + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_eval_table_gets_the_projected_column(fits, capsys):
    from dreamr_jax.evaluate import add_projection, format_table, summarise

    results = hand_rows()
    rows = summarise(results, ["target", "dreamr"])
    line = add_projection(rows, results, pj.Projection.parse("l40s:small:big:int4").resolve(), "r.jsonl")
    # as the table's other speedups: over the records every method solved (a and b)
    assert rows[1]["projected@l40s"] == pytest.approx(TARGET_AB / DREAMR_AB)
    table = format_table(rows)
    assert "projected@l40s" in table.splitlines()[0] and "2.52x" in table.splitlines()[3]
    assert line.startswith("projected@l40s: assumptions: hardware l40s")
    # a projection that cannot be made leaves the column empty with a note
    old = hand_rows()
    for r in old:
        for i in r.get("trace", {}).get("intervals", []):
            i["op"] = ""
    rows = summarise(old, ["target", "dreamr"])
    line = add_projection(rows, old, pj.Projection.parse("l40s:small:big:int4").resolve(), "r.jsonl")
    assert line.startswith("note: no projected@l40s column: r.jsonl: ") and "rerun" in line
    assert "projected@l40s" in format_table(rows) and rows[1]["projected@l40s"] != rows[1]["projected@l40s"]


def _write_results(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_project_command(fits, tmp_path, capsys):
    results = _write_results(tmp_path / "results.jsonl", hand_rows())
    out_json = tmp_path / "p.json"
    rc = main(["project", "--results", results, "--hardware", "l40s", "--draft", "small", "--target", "big:int4",
               "--draft-devices", "1", "--target-devices", "1", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "2.52x" in out and "assumptions: hardware l40s (362 TFLOP/s, 864 GB/s, 48.0 GB); draft small on 1 device; "\
        "target big:int4 on 1 device" in out
    doc = json.loads(out_json.read_text())
    assert doc["assumptions"]["target"] == "big:int4"
    d = doc["methods"]["dreamr"]
    assert d["projected_speedup"] == pytest.approx(TARGET_AB / DREAMR_AB)
    assert d["projected_latency_s"] == pytest.approx(DREAMR_AB)
    assert d["roles"]["target"]["ms_per_check"] == pytest.approx(270.0)
    assert d["roles"]["draft"]["ms_per_decoded_token"] == pytest.approx(10.0)
    assert doc["methods"]["target"]["roles"]["draft"]["ms_per_check"] is None
    assert os.path.getsize(tmp_path / "projected_speedup.png") > 0  # beside the results by default
    plot = tmp_path / "elsewhere.png"
    assert main(["project", "--results", results, "--hardware", "l40s", "--draft", "small", "--target", "big:int4",
                 "--plot", str(plot)]) == 0
    assert plot.exists()


def test_project_command_bad_inputs(fits, tmp_path, capsys):
    results = _write_results(tmp_path / "results.jsonl", hand_rows())
    no_target = _write_results(tmp_path / "nt.jsonl", [r for r in hand_rows() if r["method"] != "target"])
    base = ["--hardware", "l40s", "--draft", "small", "--target", "big:int4"]
    cases = [
        (["--results", str(tmp_path / "missing.jsonl")] + base, "missing.jsonl: no such results file"),
        (["--results", str(tmp_path)] + base, "is a folder"),
        (["--results", results, "--hardware", "gpu9", "--draft", "small", "--target", "big:int4"],
         "unknown hardware 'gpu9'"),
        (["--results", results, "--hardware", "l40s", "--draft", "small", "--target", "nope"], "unknown model 'nope'"),
        (["--results", results] + base + ["--target-devices", "0"], "--target-devices must be >= 1"),
        (["--results", results] + base + ["--draft-devices", "-1"], "--draft-devices must be >= 1"),
        (["--results", no_target] + base, "holds no solved `target` rows"),
        (["--results", results, "--hardware", "l40s", "--target", "big:int4"], "no draft model was given"),
        (["--results", results] + base + ["--json", str(tmp_path / "no" / "p.json")], "does not exist"),
        (["--results", results, "--hardware", "l40s", "--draft", "small", "--target", "huge"], "huge needs"),
    ]
    for argv, message in cases:
        assert main(["project"] + argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not (tmp_path / "projected_speedup.png").exists()  # every error came before any output


def test_missing_cost_model_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "dreamr_jax.costmodel", None)  # its import fails, as if it were absent
    results = _write_results(tmp_path / "results.jsonl", hand_rows())
    with pytest.raises(pj.ProjectionError, match="need the cost model"):
        pj.Projection.parse("l40s:a:b").resolve()
    assert main(["project", "--results", results, "--hardware", "l40s", "--target", "x"]) == 2
    assert "need the cost model (dreamr_jax/costmodel.py)" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("dreamr_jax.costmodel") is None,
                    reason="dreamr_jax/costmodel.py (the cost model) is not in this checkout yet")
def test_project_command_end_to_end_with_real_presets(tmp_path, capsys):
    results = _write_results(tmp_path / "results.jsonl", hand_rows())
    out_json = tmp_path / "p.json"
    rc = main(["project", "--results", results, "--hardware", "l40s", "--draft", "qwen3-vl-2b",
               "--target", "qwen3-vl-32b:int4", "--draft-devices", "2", "--target-devices", "4",
               "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "assumptions: hardware" in captured.out and "qwen3-vl-32b:int4 on 4 devices" in captured.out
    doc = json.loads(out_json.read_text())
    for method in ("target", "dreamr"):
        m = doc["methods"][method]
        assert m["projected_latency_s"] > 0 and m["projected_speedup"] > 0
        assert m["roles"]["target"]["ms_per_decoded_token"] > 0
    assert doc["methods"]["target"]["projected_speedup"] == pytest.approx(1.0)
    assert doc["methods"]["dreamr"]["roles"]["target"]["ms_per_check"] > 0
    assert (tmp_path / "projected_speedup.png").exists()


class HandReasoner:
    """What `run_eval` needs of a reasoner, with the real `solve_many`: `solve` returns the hand
    traces above (record c fails for dreamr)."""

    draft = object()

    def __init__(self):
        from dreamr_jax.speculative import SpeculativeReasoner

        self.solve_many = SpeculativeReasoner.solve_many.__get__(self)
        self.traces = {(r["id"], r["method"]): r.get("trace") for r in hand_rows()}

    def solve(self, question, image=None, method=None):
        trace = self.traces[(question[1:], method)]
        if trace is None:
            raise RuntimeError("cannot solve")
        return Trace.from_dict(trace)

    def warm_up_checks(self, question, image=None):
        return 0


def test_run_eval_with_project_adds_the_column_to_table_and_summary(fits, tmp_path, capsys):
    from dreamr_jax.evaluate import run_eval

    records = [{"id": k, "question": f"q{k}", "answer": "4"} for k in "abc"]
    out = tmp_path / "eval"
    run_eval(HandReasoner(), records, ["target", "dreamr"], str(out), warmup=False, progress=False,
             projection=pj.Projection.parse("l40s:small:big:int4", "1:1").resolve())
    printed = capsys.readouterr().out
    assert "projected@l40s: assumptions: hardware l40s" in printed
    summary = {r["method"]: r for r in json.loads((out / "summary.json").read_text())}
    assert summary["dreamr"]["projected@l40s"] == pytest.approx(TARGET_AB / DREAMR_AB)  # records a and b
    assert summary["target"]["projected@l40s"] == pytest.approx(1.0)
    assert "projected@l40s" in (out / "table.txt").read_text().splitlines()[0]


def test_steady_state_speedup_and_the_acceptance_it_needs():
    """The steady-state model against its formula worked by hand, and the bisection finding the
    acceptance for a speedup (None when even 100% falls short)."""
    from dreamr_jax.projection import acceptance_for, steady_state_speedup

    # L = 10 tokens, t_d = 1, t_t = 4, t_c = 8: accepted step max(10, 8) = 10, rejected
    # max(40, 10 + 8) = 40; target alone 40 per step
    assert steady_state_speedup(1.0, 1.0, 4.0, 8.0, 10) == pytest.approx(40 / 10)
    assert steady_state_speedup(0.5, 1.0, 4.0, 8.0, 10) == pytest.approx(40 / (0.5 * 10 + 0.5 * 40))
    assert steady_state_speedup(0.5, 1.0, 4.0, 8.0, 10, length_ratio=1.25) == pytest.approx(40 / 25 / 1.25)
    # 2x: 40 / (10 a + 40 (1 - a)) = 2  ->  a = 2/3
    assert acceptance_for(2.0, 1.0, 4.0, 8.0, 10) == pytest.approx(2 / 3, abs=1e-9)
    assert acceptance_for(4.5, 1.0, 4.0, 8.0, 10) is None
