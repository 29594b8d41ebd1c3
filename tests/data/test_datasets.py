"""The seven data sets' loaders on tiny local fixtures in each set's real column layout (no
network), answer extraction, grading, error messages and the JSONL export."""

from __future__ import annotations

import base64
import io
import json
import logging
import os

import datasets
import pandas as pd
import pytest
from PIL import Image

from dreamr_jax.data.datasets import (
    DatasetFormatError,
    benchmark_spec,
    extract_answer,
    grade,
    load_benchmark,
    to_jsonl,
)
from dreamr_jax.data.grading import answers_match, choice_letter, parse_number
from dreamr_jax.evaluate import read_records

datasets.disable_progress_bars()


def png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), (10, 200, 30) if mode == "RGB" else (10, 200, 30, 0)).save(buf, "PNG")
    return buf.getvalue()


def img(w: int, h: int) -> dict:
    return {"bytes": png(w, h), "path": None}


def b64(w: int, h: int) -> str:
    return base64.b64encode(png(w, h)).decode()


@pytest.fixture
def load(tmp_path):
    cache = str(tmp_path / "hf_cache")

    def _load(name, path, **kw):
        return load_benchmark(name, path=str(path), cache_dir=cache, **kw)

    return _load


def to_parquet(columns: dict, features: dict, path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return str(path)


S = datasets.Value("string")


# ----------------------------------------------------------------------------- loaders


def test_mathverse(tmp_path, load):
    cols = {
        "sample_index": ["1", "2", "3"],
        "problem_index": ["1", "2", "1"],
        "problem_version": ["Text Dominant", "Text Lite", "Vision Only"],
        "question": ["As shown in the figure, find angle ABC.\nChoices:\nA:145°\nB:165°\nC:150°\nD:135°",
                     "Find the length of AB.", ""],
        "image": [img(30, 20), img(8, 9), img(5, 5)],
        "answer": ["B", "5", "(C)"],
        "question_type": ["multi-choice", "free-form", "multi-choice"],
        "query_wo": ["q1", "q2", "Please directly answer the question in the image."],
        "query_cot": ["c1", "c2", "According to the question shown in the image, please reason first."],
    }
    feats = {k: S for k in cols} | {"image": datasets.Image()}
    path = to_parquet(cols, feats, tmp_path / "mv" / "testmini-00000-of-00001.parquet")
    recs = load("MathVerse", os.path.dirname(path))
    assert len(recs) == 3 and recs.name == "mathverse" and not recs.skipped
    r = recs[0]
    assert r["source"] == "mathverse" and r["id"] == "1"
    assert r["question"] == "As shown in the figure, find angle ABC.\nA. 145°\nB. 165°\nC. 150°\nD. 135°"
    assert r["choices"] == ["145°", "165°", "150°", "135°"]
    assert (r["answer"], r["answer_type"]) == ("B", "choice")
    assert r["image"].size == (30, 20) and r["image"].mode == "RGB" and r["images"] == [r["image"]]
    assert (recs[1]["answer"], recs[1]["answer_type"], recs[1]["choices"]) == ("5", "number", [])
    vision_only = recs[2]  # empty question -> the query_cot prompt; choices live in the image
    assert vision_only["question"].startswith("According to the question shown in the image")
    assert (vision_only["answer"], vision_only["answer_type"], vision_only["choices"]) == ("C", "choice", [])
    assert vision_only["meta"]["problem_version"] == "Vision Only"


def mmbench_columns():
    return {
        "index": [101, 102],
        "question": ["What color is the square?", "Which animal is shown?"],
        "hint": ["Look at the picture.", None],
        "A": ["green", "cat"], "B": ["red", "dog"], "C": ["blue", "None"], "D": ["black", None],
        "answer": ["A", "C"],
        "category": ["color", "animal"],
    }


def test_mmbench_hub_parquet(tmp_path, load):
    cols = mmbench_columns() | {"image": [img(12, 7), img(3, 4)]}
    feats = {k: S for k in cols} | {"index": datasets.Value("int64"), "image": datasets.Image()}
    path = to_parquet(cols, feats, tmp_path / "en" / "dev-00000-of-00001.parquet")
    recs = load("mmbench", path)
    a, b = recs
    assert a["id"] == "101" and a["question"] == (
        "Hint: Look at the picture.\nWhat color is the square?\nA. green\nB. red\nC. blue\nD. black")
    assert (a["answer"], a["answer_type"], a["image"].size) == ("A", "choice", (12, 7))
    # three options (D is null); the option text "None" stays an option
    assert b["choices"] == ["cat", "dog", "None"] and b["question"].endswith("\nC. None")
    assert b["question"].startswith("Which animal") and b["answer"] == "C"
    assert b["meta"]["category"] == "animal"
    no_hint = load("mmbench", path, use_hint=False)
    assert no_hint[0]["question"].startswith("What color")


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_mmbench_tsv_base64(tmp_path, load, fmt):
    cols = mmbench_columns() | {"image": [b64(6, 5), b64(9, 2)]}
    df = pd.DataFrame(cols)
    path = tmp_path / f"mmbench_dev_en.{fmt}"
    if fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)  # the released MMBench_DEV_EN.tsv layout
    else:
        df.to_json(path, orient="records", lines=True)
    recs = load("MMBench", path)
    assert [r["image"].size for r in recs] == [(6, 5), (9, 2)]
    assert recs[0]["id"] == "101" and recs[0]["answer"] == "A"
    assert recs[1]["choices"] == ["cat", "dog", "None"]


def test_realworldqa(tmp_path, load):
    cols = {
        "image": [img(40, 30), img(2, 3)],
        "question": ["In which direction is the car facing?\nA. Left\nB. Straight\nC. Right\n"
                     "Please answer directly with a single letter.",
                     "How many lanes are there?\nPlease answer directly with a single word or number."],
        "answer": ["C", "3"],
    }
    to_parquet(cols, {"image": datasets.Image(), "question": S, "answer": S},
               tmp_path / "rwqa" / "data" / "test-00000-of-00002.parquet")
    recs = load("RealWorldQA", tmp_path / "rwqa")
    a, b = recs
    assert a["question"] == "In which direction is the car facing?\nA. Left\nB. Straight\nC. Right"
    assert (a["choices"], a["answer"], a["answer_type"], a["id"]) == (["Left", "Straight", "Right"], "C", "choice", "0")
    assert (b["question"], b["answer"], b["answer_type"]) == ("How many lanes are there?", "3", "number")
    assert a["image"].size == (40, 30)
    kept = load("realworldqa", tmp_path / "rwqa", keep_instruction=True)
    assert kept[0]["question"].endswith("\nPlease answer directly with a single letter.")


def test_mmmu_subject_folders_and_images(tmp_path, load):
    feats = {k: S for k in ("id", "question", "options", "answer", "question_type", "subfield")}
    feats |= {f"image_{k}": datasets.Image() for k in range(1, 8)}
    none7 = {f"image_{k}": [None, None] for k in range(3, 8)}
    art = {
        "id": ["validation_Art_1", "validation_Art_2"],
        "question": ["Which animal is in <image 1>? Compare with <image 2>.", "How many legs does it have?"],
        "options": ["['cat', 'dog', '<image 2>']", "[]"],
        "answer": ["B", "4"],
        "question_type": ["multiple-choice", "open"],
        "subfield": ["Drawing", "Drawing"],
        "image_1": [img(10, 11), img(4, 4)],
        "image_2": [img(12, 13), None],
    } | none7
    root = tmp_path / "mmmu"
    to_parquet(art, feats, root / "Art" / "validation-00000-of-00001.parquet")
    dev = dict(art, id=["dev_Art_1", "dev_Art_2"])
    to_parquet(dev, feats, root / "Art" / "dev-00000-of-00001.parquet")
    math = {k: v[:1] for k, v in art.items()} | {"id": ["validation_Math_1"], "options": ["('1', '2')"],
                                                 "answer": ["A"], "question": ["Pick one."]}
    to_parquet(math, feats, root / "Math" / "validation-00000-of-00001.parquet")

    recs = load("mmmu", root)  # default split: validation, both subjects
    assert [r["id"] for r in recs] == ["validation_Art_1", "validation_Art_2", "validation_Math_1"]
    a, b, _ = recs
    assert a["question"] == ("Which animal is in [image 1]? Compare with [image 2].\n"
                             "A. cat\nB. dog\nC. [image 2]")
    assert a["choices"] == ["cat", "dog", "[image 2]"] and (a["answer"], a["answer_type"]) == ("B", "choice")
    assert [im.size for im in a["images"]] == [(10, 11), (12, 13)] and a["image"].size == (10, 11)
    assert (b["choices"], b["answer"], b["answer_type"], len(b["images"])) == ([], "4", "number", 1)
    assert [r["id"] for r in load("mmmu", root, split="dev")] == ["dev_Art_1", "dev_Art_2"]
    with pytest.raises(ValueError, match="no parquet file for split 'test'"):
        load("mmmu", root, split="test")


def test_geo3k_image_list_and_saved_dataset(tmp_path, load):
    cols = {"images": [[img(20, 10)], [img(5, 6), img(7, 8)]],
            "problem": ["<image>Find x.", "<image>Find the area of the figure."],
            "answer": ["2\\sqrt{3}", "12"]}
    feats = datasets.Features({"images": datasets.List(datasets.Image()), "problem": S, "answer": S})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols, features=feats),
                               "test": datasets.Dataset.from_dict({k: v[:1] for k, v in cols.items()}, features=feats)})
    dd.save_to_disk(str(tmp_path / "geo3k_saved"))
    recs = load("Geometry3K", tmp_path / "geo3k_saved")  # default split: train
    assert [r["question"] for r in recs] == ["Find x.", "Find the area of the figure."]
    assert [im.size for im in recs[1]["images"]] == [(5, 6), (7, 8)] and recs[0]["image"].size == (20, 10)
    assert (recs[0]["answer"], recs[0]["answer_type"]) == ("2\\sqrt{3}", "number")
    assert len(load("geo3k", tmp_path / "geo3k_saved", split="test")) == 1
    assert grade("3.4641", recs[0]) and grade("2*sqrt(3)", recs[0]) and not grade("3.5", recs[0])


def test_ocrvqa_one_record_per_pair(tmp_path, load):
    df = pd.DataFrame({
        "image": [img(9, 14), img(3, 3)],  # struct {bytes, path}, as the hub parquet stores images
        "image_id": ["0001", "0002"],
        "questions": [["Who wrote this book?", "What is the title of this book?", "Is this a comedy book?"],
                      ["What is the genre of this book?", "Is this book related to Travel?"]],
        "answers": [["Jane Austen", "Pride and Prejudice", "No"], ["Travel", "Yes"]],
        "title": ["Pride and Prejudice", "Maps"],
    })
    path = tmp_path / "ocr" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    df.to_parquet(path)
    recs = load("OCR-VQA", path)
    assert [r["id"] for r in recs] == ["0001-0", "0001-1", "0001-2", "0002-0", "0002-1"]
    assert recs[1]["question"] == "What is the title of this book?" and recs[1]["answer"] == "Pride and Prejudice"
    assert all(r["answer_type"] == "text" and r["choices"] == [] for r in recs)
    assert recs[4]["image"].size == (3, 3) and recs[0]["image"].size == (9, 14)
    assert len(load("ocrvqa", path, limit=4)) == 4
    assert grade("the pride and prejudice.", recs[1]) and not grade("Emma", recs[0])


def test_scienceqa_int_answer_to_letter(tmp_path, load):
    cols = {
        "image": [img(16, 12), None],
        "question": ["Which of these states is farthest north?", "Which word would you find on a dictionary page?"],
        "choices": [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["wax", "sour"]],
        "answer": [0, 1],
        "hint": ["", "Guide words: shake - silver"],
        "subject": ["social science", "language science"],
        "lecture": ["Maps ...", "Dictionaries ..."],
        "solution": ["West Virginia ...", "..."],
    }
    feats = {"image": datasets.Image(), "question": S, "choices": datasets.List(S), "answer": datasets.Value("int8"),
             "hint": S, "subject": S, "lecture": S, "solution": S}
    to_parquet(cols, feats, tmp_path / "sqa" / "data" / "train-00000-of-00001-1028f23e353fbe3e.parquet")
    recs = load("ScienceQA", tmp_path / "sqa")
    a, b = recs
    assert a["question"] == ("Which of these states is farthest north?\n"
                             "A. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma")
    assert (a["answer"], a["answer_type"], a["image"].size) == ("A", "choice", (16, 12))
    assert b["question"].startswith("Context: Guide words: shake - silver\nWhich word") and b["answer"] == "B"
    assert b["image"] is None and b["images"] == []
    assert b["meta"]["subject"] == "language science" and "lecture" in b["meta"]


def test_rgba_composited_on_white(tmp_path, load):
    cols = {"image": [{"bytes": png(4, 4, "RGBA"), "path": None}], "question": ["q?"], "choices": [["x", "y"]],
            "answer": [1]}
    path = to_parquet(cols, {"image": datasets.Image(), "question": S, "choices": datasets.List(S),
                             "answer": datasets.Value("int64")}, tmp_path / "s.parquet")
    r = load("sqa", path)[0]
    assert r["image"].mode == "RGB" and r["image"].getpixel((0, 0)) == (255, 255, 255)


# ----------------------------------------------------------------------------- errors


def test_missing_column_is_named(tmp_path, load):
    path = tmp_path / "sqa.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "hint": ""}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"scienceqa: row 0: column 'answer': missing") as e:
        load("scienceqa", path)
    assert e.value.column == "answer" and isinstance(e.value, ValueError)
    with pytest.raises(DatasetFormatError, match="'answer'"):  # a column missing everywhere is not skippable
        load("scienceqa", path, on_error="skip")


def bad_image_file(tmp_path) -> str:
    cols = {"index": [1, 2, 3], "question": ["q1", "q2", "q3"], "A": ["x"] * 3, "B": ["y"] * 3,
            "answer": ["A", "B", "A"], "image": [b64(2, 2), base64.b64encode(b"not a png").decode(), b64(3, 3)]}
    path = tmp_path / "mmb.jsonl"
    pd.DataFrame(cols).to_json(path, orient="records", lines=True)
    return str(path)


def test_bad_image_names_the_row(tmp_path, load):
    with pytest.raises(DatasetFormatError, match=r"mmbench: row 1: column 'image': not a readable image") as e:
        load("mmbench", bad_image_file(tmp_path))
    assert (e.value.row, e.value.column) == (1, "image")


def test_on_error_skip(tmp_path, load, caplog):
    with caplog.at_level(logging.WARNING, logger="dreamr_jax.data.datasets"):
        recs = load("mmbench", bad_image_file(tmp_path), on_error="skip")
    assert [r["id"] for r in recs] == ["1", "3"] and recs.rows_read == 3
    assert len(recs.skipped) == 1 and recs.skipped[0].row == 1
    assert "row 1" in caplog.text and "1 rows skipped" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        load("mmbench", bad_image_file(tmp_path), on_error="ignore")


def test_bad_answer_and_names(tmp_path, load):
    path = tmp_path / "sqa.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"row 0: column 'answer': 5 is not an index"):
        load("scienceqa", path)
    assert benchmark_spec("OCR-VQA").name == "ocrvqa"
    assert benchmark_spec("RealWorldQA").hub_id == "xai-org/RealworldQA"
    with pytest.raises(ValueError, match="unknown data set"):
        benchmark_spec("imagenet")


# ----------------------------------------------------------------------------- extraction and grading

CHOICE = {"answer": "B", "answer_type": "choice", "choices": ["145°", "165°", "150°", "135°"]}
NUMBER = {"answer": "3", "answer_type": "number", "choices": []}
TEXT = {"answer": "Jane Austen", "answer_type": "text", "choices": []}


@pytest.mark.parametrize("output, record, expected", [
    ("Angles sum to 180.\n\nSo the angle is 165.\n\n\\boxed{B}", CHOICE, "B"),
    ("... \\boxed{(B)}", CHOICE, "B"),
    ("... \\boxed{165^\\circ}", CHOICE, "B"),  # the choice's text -> its letter
    ("reasoning\n\nAnswer: C", CHOICE, "C"),
    ("Therefore the answer is (D).", CHOICE, "D"),
    ("so it must be\n(A)", CHOICE, "A"),
    ("The answer is 150°.", CHOICE, "C"),
    ("I have no idea", CHOICE, None),
    ("\\boxed{E}", CHOICE, None),  # out of range for four choices
    ("x = 1 + 2 \n\n\\boxed{3}", NUMBER, "3"),
    ("\\boxed{\\frac{1}{2}}", NUMBER, "0.5"),
    ("The final answer is 12 cm.", NUMBER, "12"),
    ("first 2, then 5\n\nso 7 in total", NUMBER, "7"),
    ("\\boxed{50\\%}", NUMBER, "50%"),
    ("it is written by\n\n\\boxed{\\text{Jane Austen}}", TEXT, "jane austen"),
    ("Answer: Jane Austen.", TEXT, "jane austen"),
    ("", TEXT, None),
])
def test_extract_answer(output, record, expected):
    assert extract_answer(output, record) == expected


@pytest.mark.parametrize("predicted, record, ok", [
    ("B", CHOICE, True), ("(B)", CHOICE, True), ("b", CHOICE, True), ("B. 165°", CHOICE, True),
    ("165°", CHOICE, True), ("Option B", CHOICE, True),
    ("C", CHOICE, False), ("(C)", CHOICE, False), ("150°", CHOICE, False), (None, CHOICE, False),
    ("B. 150°", CHOICE, False),  # letter and text disagree
    ("3", NUMBER, True), ("3.0", NUMBER, True), ("3.00001", NUMBER, True), ("x = 3", NUMBER, True),
    ("3 cm", NUMBER, True), ("\\frac{6}{2}", NUMBER, True), ("3^\\circ", NUMBER, True),
    ("3.1", NUMBER, False), ("30", NUMBER, False), ("three", NUMBER, False), (None, NUMBER, False),
    ("0.5", {"answer": "1/2", "answer_type": "number"}, True),
    ("\\frac{1}{2}", {"answer": "0.5", "answer_type": "number"}, True),
    ("\\dfrac{\\sqrt{3}}{2}", {"answer": "0.866025", "answer_type": "number"}, True),
    ("50%", {"answer": "0.5", "answer_type": "number"}, True),
    ("50%", {"answer": "50", "answer_type": "number"}, True),
    ("0.51", {"answer": "50%", "answer_type": "number"}, False),
    ("1,000", {"answer": "1000", "answer_type": "number"}, True),
    ("y = 2x + 1", {"answer": "y=2x+1", "answer_type": "number"}, True),
    ("jane austen.", TEXT, True), ("  JANE   Austen ", TEXT, True), ("The Jane Austen", TEXT, True),
    ("Jane Eyre", TEXT, False), ("", TEXT, False),
    ("3", {"answer": "3.0", "answer_type": "text"}, True),
    ("2 cats", {"answer": "2 dogs", "answer_type": "text"}, False),
    ("24/7", {"answer": "3.43", "answer_type": "number", "meta": {"answer_aliases": ["24/7"]}}, True),
    ("anything", {"answer": None, "answer_type": "text"}, False),
])
def test_grade(predicted, record, ok):
    assert grade(predicted, record) is ok


def test_grading_helpers():
    assert parse_number("\\frac{3}{4}") == 0.75 and parse_number("60°") == 60 and parse_number("A") is None
    assert parse_number("1e400") is None and parse_number("2x+1") is None
    assert choice_letter("The answer is (C)", ["a", "b", "c"]) == "C"
    assert choice_letter("A cat", ["dog", "bird"]) is None
    # the old record-free matcher keeps its behaviour
    assert answers_match("(B)", "B") and not answers_match("C", "B") and answers_match("3.0", "3")
    assert answers_match("\\frac{1}{2}", "0.5") and not answers_match("3.1", "3") and not answers_match(None, "3")


# ----------------------------------------------------------------------------- JSONL export


def test_to_jsonl_round_trip(tmp_path, load):
    cols = {"id": ["v_1"], "question": ["<image 1> vs <image 2>?"], "options": ["['x', 'y']"], "answer": ["A"],
            "question_type": ["multiple-choice"], "image_1": [img(5, 4)], "image_2": [img(6, 4)]}
    feats = {k: S for k in cols} | {"image_1": datasets.Image(), "image_2": datasets.Image()}
    recs = load("mmmu", to_parquet(cols, feats, tmp_path / "m.parquet"))
    recs.append({"id": "t/1", "question": "no image", "answer": "4", "source": "x", "choices": [],
                 "answer_type": "number", "images": [], "image": None})
    out = tmp_path / "export" / "data.jsonl"
    assert to_jsonl(recs, str(out), str(tmp_path / "export" / "imgs")) == 2
    back = read_records(str(out))
    assert back[0]["image"] == str(tmp_path / "export" / "imgs" / "mmmu-v_1.png")
    assert Image.open(back[0]["image"]).size == (5, 4)
    # read_records resolves every image path against the file, so `solve_many` gets all of them.
    assert back[0]["images"] == [str(tmp_path / "export" / "imgs" / n) for n in ("mmmu-v_1.png", "mmmu-v_1_2.png")]
    assert (back[0]["answer"], back[0]["choices"], back[0]["source"]) == ("A", ["x", "y"], "mmmu")
    assert back[1]["image"] is None and back[1]["id"] == "t/1" and back[1]["answer_type"] == "number"


def test_hub_ids_configs_and_streaming(monkeypatch):
    """Without `path`: the hub id, config(s) and default split go to datasets.load_dataset
    (stubbed here: no network); MMMU loads its subjects lazily; streaming rows work too."""
    calls = []

    def fake_load(hub_id, config=None, split=None, **kwargs):
        calls.append((hub_id, config, split, kwargs))
        cols = {"id": [f"{config}_1"], "question": ["q"], "options": ["['a', 'b']"], "answer": ["B"],
                "question_type": ["multiple-choice"], "image_1": [img(2, 2)]}
        feats = datasets.Features({k: S for k in cols} | {"image_1": datasets.Image()})
        ds = datasets.Dataset.from_dict(cols, features=feats)
        return ds.to_iterable_dataset() if kwargs.get("streaming") else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    recs = load_benchmark("MMMU", limit=2, streaming=True)
    assert [r["id"] for r in recs] == ["Accounting_1", "Agriculture_1"] and recs[0]["image"].size == (2, 2)
    assert calls == [("MMMU/MMMU", "Accounting", "validation", {"streaming": True}),
                     ("MMMU/MMMU", "Agriculture", "validation", {"streaming": True})]
    calls.clear()
    load_benchmark("mmmu", "dev", subjects=["Math"])
    assert calls == [("MMMU/MMMU", "Math", "dev", {})]
    calls.clear()
    with pytest.raises(DatasetFormatError):  # the stub's rows are not MMBench rows
        load_benchmark("mmbench", revision="main")
    assert calls == [("lmms-lab/MMBench", "en", "dev", {"revision": "main"})]


def test_answers_match_units_may_be_omitted_but_not_differ():
    from dreamr_jax.data.grading import answers_match

    assert answers_match("12", "12 cm") and answers_match("12 cm", "12 cm") and answers_match("3.0", "3")
    assert not answers_match("2 cats", "2 dogs") and not answers_match("7", "8")
