"""`dreamr eval` loses nothing, never runs twice on one folder, and names every bad input
(issue 14). Most tests drive `run_eval` and the real `solve_many` with a fake reasoner (no
model); the last ones run the shipped target alone from a target-only config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dreamr_jax.cli import main
from dreamr_jax.evaluate import DataError, EvalError, locked_out_dir, read_records, run_eval
from dreamr_jax.speculative import SpeculativeReasoner
from dreamr_jax.speculative.trace import Step, Trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(REPO, "configs", "synthetic.yaml")


class FakeReasoner:
    """What `run_eval` needs of a reasoner, with the real `solve_many`: `solve` answers "4" at
    once (or raises for the questions in `fail`, or waits for `gate`) and records its calls."""

    draft = object()  # a pair: every method may run
    solve_many = SpeculativeReasoner.solve_many

    def __init__(self, fail=(), gate: threading.Event | None = None):
        self.fail, self.gate, self.calls = set(fail), gate, []
        self.started = threading.Event()

    def solve(self, question, image=None, method=None):
        self.calls.append((question, method))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if (question, method) in self.fail or question in self.fail:
            raise RuntimeError(f"cannot solve {question}")
        return Trace(method=method, question=question, answer="4", wall_time=0.01, finish_reason="answer",
                     steps=[Step("so \\boxed{4}", [1, 2, 3], "target")], extra={"projected_time": 0.01})

    def warm_up_checks(self, question, image=None):
        return 0


RECORDS = [{"id": "a", "question": "qa", "answer": "4"}, {"id": "b", "question": "qb", "answer": "5"},
           {"id": "c", "question": "qc", "answer": "4"}]


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _strict_json(text):
    def no_constant(name):
        raise AssertionError(f"summary.json holds {name}, which is not JSON")

    return json.loads(text, parse_constant=no_constant)


# ---- one run per folder ----------------------------------------------------------------------------


def test_second_run_on_the_same_out_fails_at_once_and_the_first_keeps_its_results(tmp_path):
    out = str(tmp_path / "eval")
    gate = threading.Event()
    first = FakeReasoner(gate=gate)
    thread = threading.Thread(target=run_eval, args=(first, RECORDS, ["target", "sd"], out),
                              kwargs=dict(warmup=False, progress=False))
    thread.start()
    try:
        assert first.started.wait(30)  # the first run is solving
        second = FakeReasoner()
        t0 = time.perf_counter()
        with pytest.raises(EvalError, match=rf"{out} is in use by another run \(pid {os.getpid()}\)"):
            run_eval(second, RECORDS, ["target"], out, warmup=False, progress=False)
        assert time.perf_counter() - t0 < 5 and second.calls == []
    finally:
        gate.set()
        thread.join(60)
    rows = _rows(os.path.join(out, "results.jsonl"))
    assert [(r["id"], r["method"], r["status"]) for r in rows] == \
        [(i, m, "ok") for i in "abc" for m in ("target", "sd")]
    assert [r["problems"] for r in _strict_json(open(os.path.join(out, "summary.json")).read())] == [3, 3]


def test_the_cli_refuses_an_out_another_process_holds_naming_its_pid(tmp_path, monkeypatch, capsys):
    """The lock is the OS's (flock), across processes; it goes with the process that held it."""
    out = tmp_path / "eval"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": 1, "question": "q"}) + "\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from dreamr_jax.evaluate import locked_out_dir\n"
         f"with locked_out_dir({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr("dreamr_jax.cli._reasoner", _no_model)
        rc = main(["eval", "--config", SYNTHETIC, "--data", str(data), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and str(out) in err and f"pid {holder.pid}" in err, err
    finally:
        holder.communicate("", timeout=30)
    with locked_out_dir(str(out)):  # the holder is gone: no stale lock
        pass


# ---- resume, --fresh, the summary ------------------------------------------------------------------


def test_resume_solves_only_the_missing_pairs_and_the_table_covers_all(tmp_path, capsys):
    out = tmp_path / "eval"
    run_eval(FakeReasoner(fail={("qb", "sd")}), RECORDS, ["target", "sd"], str(out), warmup=False, progress=False)
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    assert json.loads(lines[3])["status"] == "failed"  # (b, sd)
    # A run killed while writing (c, target): four rows and half of the fifth.
    results.write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    capsys.readouterr()

    again = FakeReasoner()
    rows = run_eval(again, RECORDS, ["target", "sd"], str(out), warmup=False, progress=False)
    assert sorted(again.calls) == [("qb", "sd"), ("qc", "sd"), ("qc", "target")]  # failed or missing only
    printed = capsys.readouterr().out
    assert "3 of 6 (record, method) pairs are already in" in printed and "skipped" in printed
    assert "results.jsonl:5 is not a complete result row" in printed
    assert [(r["method"], r["problems"], r["failed"], r["graded"]) for r in rows] == \
        [("target", 3, 0, 3), ("sd", 3, 0, 3)]
    table = (out / "table.txt").read_text()
    assert "graded" in table.splitlines()[0]
    # The torn line stays (nothing is deleted) on a line of its own; every other line is a row.
    kept = results.read_text().splitlines()
    assert kept[:4] == lines[:4] and kept[4] == lines[4][: len(lines[4]) // 2]
    assert [json.loads(ln)["status"] for ln in kept[5:]] == ["ok"] * 3

    # A later run with fewer records and methods solves nothing; its table keeps every record of
    # its methods, and it says what else the file holds.
    rows = run_eval(FakeReasoner(), RECORDS[:1], ["target"], str(out), warmup=False, progress=False)
    assert [(r["method"], r["problems"]) for r in rows] == [("target", 3)]
    printed = capsys.readouterr().out
    assert "includes 2 records an earlier run" in printed and "also holds rows of sd" in printed


def test_solve_many_resumes_its_output_and_returns_every_row(tmp_path, capsys):
    output = str(tmp_path / "r.jsonl")
    first = FakeReasoner().solve_many(RECORDS[:2], output=output, methods=["target"], progress=False)
    second = FakeReasoner()
    rows = second.solve_many(RECORDS, output=output, methods=["target"], progress=False)
    assert second.calls == [("qc", "target")] and rows[:2] == first
    assert [r["id"] for r in rows] == ["a", "b", "c"] and len(_rows(output)) == 3
    assert "2 of 3 (record, method) pairs" in capsys.readouterr().out
    with pytest.raises(EvalError, match="unknown method 'tagret'"):  # at once, not once per record
        second.solve_many(RECORDS, output=output, methods=["tagret"], progress=False)


def test_fresh_keeps_the_old_results_under_a_timestamped_name(tmp_path, capsys):
    out = tmp_path / "eval"
    run_eval(FakeReasoner(), RECORDS[:2], ["target"], str(out), warmup=False, progress=False)
    old = (out / "results.jsonl").read_text()
    again = FakeReasoner()
    run_eval(again, RECORDS, ["target"], str(out), warmup=False, progress=False, fresh=True)
    assert len(again.calls) == 3  # started over
    kept = [n for n in os.listdir(out) if n.startswith("results.") and n != "results.jsonl"]
    assert len(kept) == 1 and (out / kept[0]).read_text() == old
    assert kept[0] in capsys.readouterr().out
    assert len(_rows(out / "results.jsonl")) == 3


def test_summary_is_strict_json_with_null_for_nan_and_accuracy_over_graded_records(tmp_path, capsys):
    out = tmp_path / "eval"
    records = [{"id": 1, "question": "q1", "answer": "4"}, {"id": 2, "question": "q2"}]  # 2 has no answer
    rows = run_eval(FakeReasoner(), records, ["target"], str(out), warmup=False, progress=False)
    summary = _strict_json((out / "summary.json").read_text())
    assert summary[0]["graded"] == 1 and summary[0]["accuracy"] == 1.0
    assert summary[0]["acceptance"] is None and rows[0]["acceptance"] != rows[0]["acceptance"]  # NaN -> null
    assert "1 of 2 records have no reference answer" in capsys.readouterr().out
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the atomic writes left no temp file


def test_a_failing_record_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "eval"
    rows = run_eval(FakeReasoner(fail={"qb"}), RECORDS, ["target"], str(out), warmup=False, progress=False)
    results = _rows(out / "results.jsonl")
    assert [r["status"] for r in results] == ["ok", "failed", "ok"]
    assert "RuntimeError: cannot solve qb" in results[1]["error"]
    assert rows[0]["failed"] == 1 and rows[0]["problems"] == 3


# ---- data files --------------------------------------------------------------------------------------

GOOD = json.dumps({"id": "a", "question": "q"})


@pytest.mark.parametrize("second_line, message", [
    (b"\xff\xfe not text", ":2: not UTF-8"),
    (b'{"question": "q"', ":2: not valid JSON"),
    (b"[1, 2]", ":2: a record must be a JSON object, got list"),
    (b'{"id": "b"}', ":2: record has no 'question' field"),
    (b'{"id": "b", "question": "  "}', ":2: 'question' must be a non-empty string"),
    (b'{"id": "b", "question": 5}', ":2: 'question' must be a non-empty string"),
    (b'{"id": [1, 2], "question": "q"}', ":2: 'id' must be a string or an integer, got [1, 2]"),
    (b'{"id": true, "question": "q"}', ":2: 'id' must be a string or an integer"),
    (b'{"id": "a", "question": "q2"}', ":2: duplicate id 'a', also on line 1"),
    (b'{"id": "b", "question": "q", "image": 5}', ":2: 'image' must be a path"),
    (b'{"id": "b", "question": "q", "image": "gone.png"}', ":2: 'image': no such image file"),
    (b'{"id": "b", "question": "q", "images": "x.png"}', ":2: 'images' must be a list of paths"),
    (b'{"id": "b", "question": "q", "images": ["gone.png"]}', ":2: 'images'[0]: no such image file"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, second_line, message):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD.encode() + b"\n" + second_line + b"\n")
    with pytest.raises(DataError) as e:
        read_records(str(data))
    assert str(e.value).startswith(str(data)) and message in str(e.value), str(e.value)


def test_data_file_paths_and_positional_ids(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such data file"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        read_records(str(tmp_path))
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q"}\n{"id": 0, "question": "q"}\n')  # the first is known by its position, 0
    with pytest.raises(DataError, match=r"d.jsonl:2: duplicate id 0, also on line 1 \(a record without an id"):
        read_records(str(data))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(b"")
    data.write_bytes(b'\xef\xbb\xbf{"question": "q", "image": "img/x.png", "images": ["img/x.png"]}\n\n'
                     b'{"question": "r", "image": null, "id": 7}\n')
    records = read_records(str(data))
    assert records[0]["image"] == str(tmp_path / "img" / "x.png") == records[0]["images"][0]
    assert records[1]["image"] is None and len(records) == 2


# ---- the CLI checks its inputs before a model loads ---------------------------------------------------


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.fixture
def target_only(tmp_path):
    """A config with a target and no draft (the shipped target, short budgets)."""
    path = tmp_path / "target_only.yaml"
    path.write_text("target: asset:target\n"
                    "spec:\n"
                    "  instruction: \"Solve step by step and put the answer in \\\\boxed{}.\"\n"
                    "  steps: {max_step_tokens: 16, token_budget: 48, max_steps: 4}\n"
                    "  solo_tokens_per_call: 48\n")
    return str(path)


@pytest.fixture
def data(tmp_path):
    from dreamr_jax.data import synthetic

    return synthetic.write_split(str(tmp_path / "world"), "test", 2)


def _cli_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--methods", "target,tagret"], "--methods: unknown method 'tagret'; known: target, draft, sd"),
    (["--methods", " , "], "--methods names no method"),
    (["--limit", "-1"], "--limit must be >= 0"),
    (["--warmup-records", "-2"], "--warmup-records must be >= 0"),
])
def test_eval_option_errors(tmp_path, monkeypatch, capsys, data, extra, message):
    monkeypatch.setattr("dreamr_jax.cli._reasoner", _no_model)
    err = _cli_error(capsys, ["eval", "--config", SYNTHETIC, "--data", data, "--out", str(tmp_path / "o")] + extra)
    assert message in err


def test_eval_path_and_data_errors(tmp_path, monkeypatch, capsys, data, target_only):
    monkeypatch.setattr("dreamr_jax.cli._reasoner", _no_model)
    base = ["eval", "--config", SYNTHETIC, "--out", str(tmp_path / "o")]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert f"--out {a_file}: is a file" in _cli_error(capsys, ["eval", "--config", SYNTHETIC, "--data", data,
                                                              "--out", str(a_file)])
    assert "missing.jsonl: no such data file" in _cli_error(capsys, base + ["--data", str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n" + '{"id": [1, 2], "question": "q"}\n')
    assert f"{bad}:2: 'id'" in _cli_error(capsys, base + ["--data", str(bad)])
    err = _cli_error(capsys, ["eval", "--config", target_only, "--data", data, "--out", str(tmp_path / "o")])
    assert "sd, specreason, lookahead, dreamr need a draft model" in err and target_only in err


def test_reason_and_demo_option_errors(tmp_path, monkeypatch, capsys, target_only):
    monkeypatch.setattr("dreamr_jax.cli._reasoner", _no_model)
    base = ["reason", "--config", SYNTHETIC, "--question", "q"]
    assert "--method: unknown method 'tagret'" in _cli_error(capsys, base + ["--method", "tagret"])
    missing = tmp_path / "no" / "t.json"
    assert f"--json {missing}: its folder" in _cli_error(capsys, base + ["--json", str(missing)])
    assert "--image" in _cli_error(capsys, base + ["--image", str(tmp_path / "gone.png")])
    # a target-only config's default method (dreamr) needs the draft it lacks
    assert "dreamr needs a draft model" in _cli_error(capsys, ["reason", "--config", target_only, "--question", "q"])
    assert "--count must be an integer >= 1" in _cli_error(capsys, ["demo", "--count", "0", "--out", str(tmp_path)])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "is a file" in _cli_error(capsys, ["demo", "--count", "1", "--out", str(a_file)])


# ---- a target alone ----------------------------------------------------------------------------------


def test_a_target_only_config_runs_the_target(tmp_path, capsys, target_only, data):
    trace_file = tmp_path / "trace.json"
    assert main(["reason", "--config", target_only, "--method", "target", "--question", "What is 2 + 3?",
                 "--json", str(trace_file)]) == 0
    assert json.loads(trace_file.read_text())["method"] == "target"
    out = tmp_path / "eval"
    assert main(["eval", "--config", target_only, "--data", data, "--methods", "target", "--out", str(out),
                 "--no-warmup"]) == 0, capsys.readouterr().err
    assert [(r["method"], r["problems"]) for r in _strict_json((out / "summary.json").read_text())] == [("target", 2)]
    # the library too: a reasoner without a draft builds, and refuses a drafting method by name
    reasoner = SpeculativeReasoner(target="asset:target")
    with pytest.raises(EvalError, match="dreamr needs a draft model"):
        reasoner.solve_many([{"question": "q"}], methods=["dreamr"], progress=False)


def test_warm_up_takes_the_first_records_and_the_longest_questions():
    from dreamr_jax.evaluate import warm_up_records

    records = [{"id": i, "question": "q" * n} for i, n in enumerate([3, 1, 9, 2, 7, 8, 1])]
    assert [r["id"] for r in warm_up_records(records, 4)] == [0, 1, 2, 5]  # first 2, then 9 and 8 chars
    assert [r["id"] for r in warm_up_records(records, 5)] == [0, 1, 2, 5, 4]  # record 2 is both: once
    assert [r["id"] for r in warm_up_records(records, 99)] == [0, 1, 2, 3, 4, 5, 6]
    assert warm_up_records(records, 0) == []
