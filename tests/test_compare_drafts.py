"""`bench.world.compare_drafts`'s bookkeeping, without models: the redundant steps counted from
result rows, and an output folder that holds another checkpoint's results refused."""

from __future__ import annotations

import json

import pytest

from dreamr_jax.bench.world import _claim, redundant_steps
from dreamr_jax.data import synthetic


def _row(index, method, steps, status="ok"):
    return {"id": f"synthetic-test-{index}", "method": method, "status": status,
            "trace": {"text": "".join(t + "\n\n" for t in steps)}}


def test_redundant_steps_are_counted_from_the_trace_text():
    p0, p1 = synthetic.make_problem(0, "test", 0), synthetic.make_problem(0, "test", 1)
    with_both = list(p1.steps[:-1]) + [synthetic.CHECK_STEP, p1.steps[-1]]
    rows = [_row(0, "draft", p0.steps), _row(1, "draft", with_both), _row(2, "draft", ["x"], status="error"),
            _row(0, "dreamr", p0.steps)]
    assert redundant_steps(rows, "draft") == 0.5  # (0 + 1) over the two solved rows
    assert redundant_steps(rows, "draft", ids={"synthetic-test-1"}) == 1.0
    assert redundant_steps(rows, "dreamr") == 0.0


def test_an_out_folder_of_another_checkpoint_is_refused(tmp_path):
    first = {"draft": "a", "target": "t", "split": "test", "count": 100}
    _claim(str(tmp_path / "before"), first, fresh=False)
    _claim(str(tmp_path / "before"), first, fresh=False)  # the same checkpoints: resumed
    other = dict(first, draft="b")
    with pytest.raises(ValueError, match="holds results of .*'a'.*pass --fresh"):
        _claim(str(tmp_path / "before"), other, fresh=False)
    _claim(str(tmp_path / "before"), other, fresh=True)
    assert json.loads((tmp_path / "before" / "checkpoints.json").read_text()) == other


def test_named_paths_name_the_flag():
    from dreamr_jax.bench.report import named_paths

    assert named_paths(["b=x", "a=y=z"], "--draft", "CHECKPOINT") == {"b": "x", "a": "y=z"}
    with pytest.raises(ValueError, match="--draft 'x': expected NAME=CHECKPOINT"):
        named_paths(["x"], "--draft", "CHECKPOINT")
    with pytest.raises(ValueError, match="--runs: the name 'a' is given twice"):
        named_paths(["a=1", "a=2"], "--runs", "METRICS")
