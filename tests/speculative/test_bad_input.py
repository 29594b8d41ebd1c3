"""Bad inputs to the speculative reasoner fail with clear errors; solve_many isolates a broken record."""

from __future__ import annotations

import json
import shutil

import pytest

from dreamr_jax.processing import ImageError, Processor, qwen_tokenizer_dir
from dreamr_jax.speculative import ContextLengthError, SpeculativeReasoner, StepConfig
from dreamr_jax.prompts import KeywordError, Keywords
from dreamr_jax.speculative.methods import TokenizerMismatchError, check_same_tokenizer
from dreamr_jax.speculative.trace import Trace

from helpers.speculative import MID_ALPHA, QUESTION, make_reasoner


def test_multi_token_keyword_is_rejected_at_construction(loaded):
    with pytest.raises(KeywordError, match="definitely correct"):
        make_reasoner(loaded, keywords=Keywords(positive="definitely correct"))
    # the first-sub-token policy accepts it
    r = make_reasoner(loaded, keywords=Keywords(positive="definitely correct", policy="first_subtoken"))
    assert r.engine("dreamr").positive_id == loaded[2].tokenizer.encode("definitely", add_special_tokens=False)[0]


def test_tokenizer_mismatch(loaded):
    from transformers import AutoTokenizer

    proc = loaded[2]
    other = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    other.add_tokens(["<|not_in_the_target|>"])
    other_proc = Processor(other, proc.image_processor)
    check_same_tokenizer(proc, Processor(AutoTokenizer.from_pretrained(qwen_tokenizer_dir()), proc.image_processor))
    with pytest.raises(TokenizerMismatchError, match="differ"):
        check_same_tokenizer(other_proc, proc)
    with pytest.raises(TokenizerMismatchError):
        make_reasoner(loaded, draft_processor=other_proc)


def test_tokenizer_mismatch_from_checkpoint_folders(spec_pair, tmp_path):
    """A draft checkpoint whose saved tokenizer differs is refused when loaded by path."""
    from transformers import AutoTokenizer

    draft, target = spec_pair
    bad = tmp_path / "draft"
    shutil.copytree(draft, bad)
    tok = AutoTokenizer.from_pretrained(draft)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(bad)
    with pytest.raises(TokenizerMismatchError):
        SpeculativeReasoner(draft=str(bad), target=target)


def test_undecodable_image(reject_all, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match="broken.png"):
        reject_all.solve(QUESTION, image=str(bad))
    with pytest.raises(ImageError, match="missing.png"):
        reject_all.solve(QUESTION, image=str(tmp_path / "missing.png"))


def test_question_longer_than_context(reject_all):
    limit = reject_all.target.model.cfg.text.max_position_embeddings
    with pytest.raises(ContextLengthError, match=str(limit)):
        reject_all.solve("why " * (limit + 10))


def test_solve_many_isolates_a_broken_record(loaded, image_file, tmp_path):
    r = make_reasoner(loaded, steps=StepConfig(max_step_tokens=8, token_budget=16), alpha=MID_ALPHA)
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    records = [{"id": "a", "question": QUESTION, "answer": "5"},
               {"id": "b", "question": QUESTION, "image": str(bad), "answer": "5"},
               {"id": "c", "question": "What is shown?", "image": image_file}]
    out = tmp_path / "results.jsonl"
    results = r.solve_many(records, output=str(out), progress=False)
    assert [row["status"] for row in results] == ["ok", "failed", "ok"]
    assert [row["id"] for row in results] == ["a", "b", "c"]
    assert "ImageError" in results[1]["error"] and "corrupt.jpg" in results[1]["error"]
    for row in (results[0], results[2]):
        trace = Trace.from_dict(row["trace"])
        assert trace.steps and trace.num_tokens <= 16
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(ln)["status"] for ln in lines] == ["ok", "failed", "ok"]
