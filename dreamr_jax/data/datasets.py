"""The paper's data sets through Hugging Face `datasets`, as one record schema.

Evaluation: MathVerse, MMBench, RealWorldQA, MMMU. Training: Geo3K, OCR-VQA, ScienceQA.

    from dreamr_jax.data.datasets import load_benchmark, extract_answer, grade
    records = load_benchmark("mmbench", split="dev", limit=100)           # hub (online)
    records = load_benchmark("mathverse", path="data/mathverse/")         # local files
    ok = grade(extract_answer(model_output, records[0]), records[0])

Every loader yields plain dicts (what `SpeculativeReasoner.solve_many` and `to_jsonl` read)::

    {"id": str, "source": str,            # e.g. "mathverse"
     "question": str,                     # the full prompt text; choices appended as "A. ..." lines
     "images": list[PIL.Image.Image],     # RGB, may be empty
     "image": PIL.Image.Image | None,     # images[0] (convenience; `solve_many` reads this one)
     "choices": list[str],                # [] when free-form
     "answer": str | None,                # a letter for "choice", else the reference text / number;
                                          # None where the split hides its answers
     "answer_type": "choice" | "number" | "text",
     "meta": dict}                        # per-set extras (category, subject, version, row, ...)

Sources (`path=` a local file or folder of parquet / arrow / json / jsonl / tsv / csv files,
or a `save_to_disk` folder; without `path` the hub id below, which needs network):

=============  =============================  ===============  ==========================================
name           hub id (config)                default split    columns read (real layout)
=============  =============================  ===============  ==========================================
mathverse      AI4Math/MathVerse (testmini)   testmini         sample_index, problem_index,
                                                               problem_version, question, image,
                                                               answer, question_type ("multi-choice" |
                                                               "free-form"), query_wo, query_cot,
                                                               metadata; multi-choice questions carry
                                                               "Choices:\\nA:...\\nB:..." in `question`
mmbench        lmms-lab/MMBench (en)          dev              index, question, hint, A, B, C, D (E, F
                                                               when present; unused ones null / NaN),
                                                               answer (letter; or int `label`),
                                                               category, l2-category, image (Image
                                                               feature, or base64 string in the TSV
                                                               release: read .tsv files directly)
realworldqa    xai-org/RealworldQA            test             image, question, answer; the question
                                                               already lists "A. ..." choices and ends
                                                               with "Please answer directly ..."
mmmu           MMMU/MMMU (30 subject configs) validation       id, question, options (str repr of a
                                                               python list), answer, image_1..image_7,
                                                               question_type ("multiple-choice" |
                                                               "open"), subfield, img_type,
                                                               topic_difficulty; "<image k>" in text
geo3k          hiyouga/geometry3k             train            images (list of Image), problem
                                                               ("<image>Find x."), answer (free-form)
ocrvqa         howard-hou/OCR-VQA             train            image, image_id, questions (list),
                                                               answers (list), title, genre, ...;
                                                               one record per question/answer pair
scienceqa      derek-thomas/ScienceQA         train            image (may be None), question, choices
                                                               (list), answer (int index), hint, task,
                                                               grade, subject, topic, category, skill,
                                                               lecture, solution
=============  =============================  ===============  ==========================================

Per-set decisions: MMBench / ScienceQA prepend the hint ("Hint: ..." / "Context: ...", option
`use_hint`); MMMU's "<image k>" placeholders become "[image k]" and the non-empty image_k
columns become `images` in k order; MathVerse rewrites its "Choices:" block as "A. ..." lines
(option `prompt="question" | "query_cot" | "query_wo"`; a vision-only row with an empty
question falls back to `query_cot`); RealWorldQA drops its "Please answer directly ..."
instruction (which fights step-by-step reasoning) unless `keep_instruction=True`; Geo3K drops
its "<image>" tag. Ids: the set's own id column, else the row number in the split (OCR-VQA:
"{image_id}-{k}").

Errors: a missing column, an empty required value or an undecodable image raise
`DatasetFormatError` (a ValueError) naming the data set, the row and the column. With
`on_error="skip"` a bad row is logged (a warning naming the row) and left out; the returned
`Benchmark` (a list) counts them in `.skipped`. A column missing from the whole data always
raises.
"""

from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import io
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterator

from .grading import choice_letter, extract_answer, grade, parse_number  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"


class DatasetFormatError(ValueError):
    """A row that does not fit its data set's layout: names the data set, row and column."""

    def __init__(self, dataset: str, row: int | None, column: str | None, problem: str):
        self.dataset, self.row, self.column, self.problem = dataset, row, column, problem
        where = [dataset]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(": ".join(where) + f": {problem}")


class Benchmark(list):
    """The records of one load (a list), with `.name`, `.split`, `.skipped` (the
    DatasetFormatErrors of rows left out under on_error="skip") and `.rows_read`."""

    def __init__(self, records=(), *, name: str = "", split: str | None = None,
                 skipped: list[DatasetFormatError] | None = None, rows_read: int = 0):
        super().__init__(records)
        self.name, self.split, self.skipped, self.rows_read = name, split, list(skipped or []), rows_read

    def summary(self) -> str:
        return (f"{self.name} ({self.split}): {len(self)} records from {self.rows_read} rows, "
                f"{len(self.skipped)} rows skipped")


# ----------------------------------------------------------------------------- images


def _decode_bytes(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return _rgb(im)


def _rgb(im):
    """RGB, transparent pixels composited on white (ScienceQA / MathVerse diagrams are PNGs with alpha)."""
    from PIL import Image

    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _open_path(path: str, base_dir: str | None):
    from PIL import Image

    candidates = [path] if os.path.isabs(path) or not base_dir else [os.path.join(base_dir, path), path]
    for p in candidates:
        if os.path.isfile(p):
            with Image.open(p) as im:
                im.load()
                return _rgb(im)
    return None


def to_pil(value: Any, base_dir: str | None = None):
    """A PIL RGB image from what a data set stores: a PIL image, a {"bytes", "path"} dict
    (bytes possibly base64 text, as in JSON), raw bytes, a base64 string (MMBench TSV), a file
    path (relative to `base_dir`), a numpy array; None / NaN / "" -> None. Raises ValueError."""
    from PIL import Image

    if _empty(value):
        return None
    if isinstance(value, Image.Image):
        value.load()
        return _rgb(value)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return to_pil(data, base_dir)
        if path:
            found = _open_path(path, base_dir)
            if found is not None:
                return found
            import datasets

            return _rgb(datasets.Image().decode_example({"path": path, "bytes": None}))  # hub / URL paths
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(value))
    if isinstance(value, str):
        s = value.strip()
        if len(s) < 1024 and not s.startswith("data:"):
            found = _open_path(s, base_dir)
            if found is not None:
                return found
            if re.search(r"\.(png|jpe?g|gif|bmp|webp|tiff?)$", s, re.I):
                raise ValueError(f"image file not found: {s}")
        if s.startswith("data:"):
            s = s.split(",", 1)[-1]
        try:
            data = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"neither an image file nor base64 image data ({e})") from None
        return _decode_bytes(data)
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return _rgb(Image.fromarray(value))
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


# ----------------------------------------------------------------------------- rows


def _empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan")  # "nan": pandas' missing cell


class _Row:
    """One raw row (images still undecoded) with its position, for error messages."""

    def __init__(self, dataset: str, index: int, data: dict, base_dir: str | None):
        self.dataset, self.index, self.data, self.base_dir = dataset, index, data, base_dir

    def error(self, column: str | None, problem: str) -> DatasetFormatError:
        return DatasetFormatError(self.dataset, self.index, column, problem)

    def has(self, column: str) -> bool:
        return column in self.data and not _empty(self.data[column])

    def get(self, column: str, required: bool = True, default=None):
        if column not in self.data:
            if required:
                raise self.error(column, f"missing (the row has columns {sorted(self.data)})")
            return default
        value = self.data[column]
        if _empty(value):
            if required:
                raise self.error(column, "empty")
            return default
        return value

    def text(self, column: str, required: bool = True, default: str = "") -> str:
        value = self.get(column, required, None)
        return default if value is None else str(value).strip()

    def image(self, column: str, required: bool = False, value=dataclasses.MISSING):
        raw = self.get(column, required) if value is dataclasses.MISSING else value
        try:
            im = to_pil(raw, self.base_dir)
        except Exception as e:  # PIL raises many types for bad data
            raise self.error(column, f"not a readable image ({type(e).__name__}: {e})") from e
        if im is None and required:
            raise self.error(column, "empty")
        return im


# ----------------------------------------------------------------------------- text helpers


def _with_choices(question: str, choices: list[str]) -> str:
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join([question.rstrip()] + lines) if lines else question


def _parse_markers(block: str) -> list[str]:
    """Choices from "A:1 B:2", "A. x\\nB. y", "(A) x (B) y": the markers A, B, C... in order."""
    starts, pos = [], 0
    for letter in LETTERS:
        m = re.compile(rf"(?:^|(?<=[\s,;]))\(?{letter}\s*[:.)：]\s*").search(block, pos)
        if not m:
            break
        starts.append((m.start(), m.end()))
        pos = m.end()
    if len(starts) < 2 or block[: starts[0][0]].strip():
        return []
    texts = []
    for i, (_, end) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else len(block)
        texts.append(block[end:stop].strip().rstrip(",;").strip())
    return texts


def _choice_block(question: str) -> tuple[str, list[str]]:
    """(body, choices) for a question ending in a "Choices:" / "Options:" block; else (question, [])."""
    m = re.search(r"(?:^|\n)\s*(?:Choices|Options)\s*[:：]\s*", question, re.I)
    if not m:
        return question, []
    choices = _parse_markers(question[m.end():])
    return (question[: m.start()].rstrip(), choices) if choices else (question, [])


def _choice_lines(question: str) -> tuple[list[str], list[str], list[str]]:
    """(body lines, choices, tail lines) for a question with "A. ..." lines (RealWorldQA)."""
    lines = question.splitlines()
    for first, line in enumerate(lines):
        if re.match(r"^\s*\(?A[.:)]\s*\S", line):
            choices, j = [], first
            while j < len(lines) and len(choices) < len(LETTERS):
                m = re.match(rf"^\s*\(?{LETTERS[len(choices)]}[.:)]\s*(.*)$", lines[j])
                if not m:
                    break
                choices.append(m.group(1).strip())
                j += 1
            if len(choices) >= 2:
                return lines[:first], choices, lines[j:]
    return lines, [], []


_INSTRUCTION = re.compile(
    r"^\s*(?:please\s+)?(?:answer|respond|select|choose)\b.*(?:directly|single|letter|word|phrase|number)", re.I)


def _answer_kind(answer: str | None) -> str:
    return "number" if answer is not None and parse_number(answer) is not None else "text"


def _letter_answer(row: _Row, column: str, answer, choices: list[str]) -> str | None:
    """A reference letter from "B", "(B)", "b", or a choice's text."""
    if answer is None:
        return None
    letter = choice_letter(str(answer), choices)
    if letter is None:
        raise row.error(column, f"answer {answer!r} is not one of the {len(choices) or 'listed'} choices' "
                                "letters or texts")
    return letter


def _list_value(row: _Row, column: str, value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as e:
            raise row.error(column, f"not a list literal ({e})") from None
        if isinstance(parsed, (list, tuple)):
            return list(parsed)
    raise row.error(column, f"expected a list, got {type(value).__name__}")


def _record(source, rid, question, images, choices, answer, answer_type, meta) -> dict:
    images = [im for im in images if im is not None]
    return {"id": str(rid), "source": source, "question": question, "images": images,
            "image": images[0] if images else None, "choices": [str(c) for c in choices],
            "answer": None if answer is None else str(answer).strip(), "answer_type": answer_type,
            "meta": {k: v for k, v in meta.items() if not _empty(v)}}


# ----------------------------------------------------------------------------- converters: row -> records


def _mathverse(row: _Row, prompt: str = "question") -> list[dict]:
    if prompt not in ("question", "query_cot", "query_wo"):
        raise ValueError(f"mathverse: prompt must be 'question', 'query_cot' or 'query_wo', not {prompt!r}")
    qtype = row.text("question_type", required=False)
    question = row.text(prompt, required=False)
    if not question:  # vision-only versions: the question is drawn in the image
        question = row.text("query_cot", required=False) or row.text("query_wo", required=False)
    if not question:
        raise row.error(prompt, "empty (and no query_cot / query_wo to fall back to)")
    image = row.image("image", required=False)
    is_choice = "choice" in qtype.lower()
    choices: list[str] = []
    if is_choice and prompt == "question":
        body, choices = _choice_block(question)
        if choices:
            question = _with_choices(body, choices)
    answer = row.text("answer", required=False) or None
    if is_choice:
        answer = _letter_answer(row, "answer", answer, choices)
    meta = {"problem_index": row.get("problem_index", False), "problem_version": row.get("problem_version", False),
            "question_type": qtype, "row": row.index}
    if isinstance(row.data.get("metadata"), dict):
        meta.update({k: v for k, v in row.data["metadata"].items() if isinstance(v, (str, int, float))})
    rid = row.get("sample_index", False, row.index)
    return [_record("mathverse", rid, question, [image], choices, answer,
                    "choice" if is_choice else _answer_kind(answer), meta)]


def _mmbench(row: _Row, use_hint: bool = True) -> list[dict]:
    question = row.text("question")
    choices = []
    for letter in LETTERS:
        if not row.has(letter):
            break
        choices.append(str(row.data[letter]).strip())
    if len(choices) < 2:
        raise row.error("A" if not choices else "B", "fewer than two options in columns A, B, ...")
    hint = row.text("hint", required=False) if use_hint else ""
    text = (f"Hint: {hint}\n" if hint else "") + question
    if "answer" in row.data:
        answer = _letter_answer(row, "answer", row.get("answer", False), choices)
    elif "label" in row.data:  # int label layout
        label = row.get("label", False)
        answer = None if label is None or int(label) < 0 else LETTERS[int(label)]
    else:
        raise row.error("answer", f"missing (the row has columns {sorted(row.data)})")
    image = row.image("image", required=True)
    meta = {"category": row.get("category", False), "l2-category": row.get("l2-category", False),
            "mmbench_source": row.get("source", False), "split": row.get("split", False), "row": row.index}
    return [_record("mmbench", row.get("index", False, row.index), _with_choices(text, choices), [image],
                    choices, answer, "choice", meta)]


def _realworldqa(row: _Row, keep_instruction: bool = False) -> list[dict]:
    raw = row.text("question")
    body, choices, tail = _choice_lines(raw)
    if not keep_instruction:
        tail = [ln for ln in tail if not _INSTRUCTION.match(ln)]
        while body and _INSTRUCTION.match(body[-1]):
            body = body[:-1]
    question = "\n".join(body).strip()
    if choices:
        question = _with_choices(question, choices)
    if tail and "\n".join(tail).strip():
        question = question + "\n" + "\n".join(tail).strip()
    answer = row.text("answer", required=False) or None
    kind = _answer_kind(answer)
    if choices and answer is not None:
        letter = choice_letter(answer, choices)
        if letter is not None:
            answer, kind = letter, "choice"
    if not choices and answer is not None and kind == "text" and re.fullmatch(r"[A-J]", answer):
        kind = "choice"  # choices drawn in the image
    image = row.image("image", required=True)
    return [_record("realworldqa", row.get("id", False, row.index), question, [image], choices, answer, kind,
                    {"row": row.index})]


def _mmmu_text(text: str) -> str:
    return re.sub(r"<image (\d+)>", r"[image \1]", text)


def _mmmu(row: _Row) -> list[dict]:
    question = _mmmu_text(row.text("question"))
    options = _list_value(row, "options", row.get("options", False, "[]"))
    qtype = row.text("question_type", required=False) or ("multiple-choice" if options else "open")
    images = []
    for k in range(1, 8):
        column = f"image_{k}"
        if row.has(column):
            images.append(row.image(column))
    raw_answer = row.text("answer", required=False) or None
    aliases: list[str] = []
    if raw_answer is not None and raw_answer.startswith("["):
        try:
            parsed = [str(a) for a in ast.literal_eval(raw_answer)]
            raw_answer, aliases = (parsed[0], parsed[1:]) if parsed else (None, [])
        except (ValueError, SyntaxError):
            pass
    if raw_answer == "?":  # the test split hides its answers
        raw_answer = None
    meta = {"subfield": row.get("subfield", False), "img_type": row.get("img_type", False),
            "topic_difficulty": row.get("topic_difficulty", False), "question_type": qtype, "row": row.index}
    if qtype == "multiple-choice" and options:
        choices = [_mmmu_text(str(o)) for o in options]
        answer = _letter_answer(row, "answer", raw_answer, choices)
        if aliases:
            meta["answer_aliases"] = [choice_letter(a, choices) for a in aliases]
        return [_record("mmmu", row.get("id", False, row.index), _with_choices(question, choices), images,
                        choices, answer, "choice", meta)]
    if aliases:
        meta["answer_aliases"] = aliases
    return [_record("mmmu", row.get("id", False, row.index), question, images, [], raw_answer,
                    _answer_kind(raw_answer), meta)]


def _geo3k(row: _Row) -> list[dict]:
    problem = row.text("problem")
    question = re.sub(r"\s*<image>\s*", " ", problem).strip()
    if "images" in row.data:
        values = _list_value(row, "images", row.get("images"))
        images = [row.image("images", value=v) for v in values]
        if not any(im is not None for im in images):
            raise row.error("images", "no image")
    else:
        images = [row.image("image", required=True)]
    answer = row.text("answer")
    return [_record("geo3k", row.get("id", False, row.index), question, images, [], answer, _answer_kind(answer),
                    {"row": row.index})]


def _ocrvqa(row: _Row) -> list[dict]:
    questions = _list_value(row, "questions", row.get("questions"))
    answers = _list_value(row, "answers", row.get("answers"))
    if len(questions) != len(answers):
        raise row.error("answers", f"{len(answers)} answers for {len(questions)} questions")
    image = row.image("image", required=True)
    image_id = row.get("image_id", False, row.index)
    meta = {"title": row.get("title", False), "genre": row.get("genre", False), "image_id": str(image_id),
            "row": row.index}
    return [_record("ocrvqa", f"{image_id}-{k}", str(q).strip(), [image], [], str(a).strip(), "text", meta)
            for k, (q, a) in enumerate(zip(questions, answers))]


def _scienceqa(row: _Row, use_hint: bool = True) -> list[dict]:
    question = row.text("question")
    choices = [str(c).strip() for c in _list_value(row, "choices", row.get("choices"))]
    if len(choices) < 2:
        raise row.error("choices", f"{len(choices)} choices")
    raw = row.get("answer")
    try:
        index = int(raw)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(choices):
        raise row.error("answer", f"{raw!r} is not an index into the {len(choices)} choices")
    hint = row.text("hint", required=False) if use_hint else ""
    text = (f"Context: {hint}\n" if hint else "") + question
    image = row.image("image", required=False)
    meta = {k: row.get(k, False) for k in ("task", "grade", "subject", "topic", "category", "skill", "lecture",
                                             "solution")}
    meta["row"] = row.index
    return [_record("scienceqa", row.get("id", False, row.index), _with_choices(text, choices), [image], choices,
                    LETTERS[index], "choice", meta)]


# ----------------------------------------------------------------------------- registry


MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    role: str  # "eval" | "train"
    hub_id: str
    configs: tuple  # hub configs loaded (and concatenated); (None,) for the default one
    default_split: str
    required: tuple  # columns every row must have; a tuple entry lists alternatives
    convert: Callable[..., list[dict]]
    options: tuple = ()  # keyword options of `convert`


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "mathverse": BenchmarkSpec("mathverse", "eval", "AI4Math/MathVerse", ("testmini",), "testmini",
                               ("question", "answer", "question_type"), _mathverse, ("prompt",)),
    "mmbench": BenchmarkSpec("mmbench", "eval", "lmms-lab/MMBench", ("en",), "dev",
                             ("question", "A", "B", ("answer", "label"), "image"), _mmbench, ("use_hint",)),
    "realworldqa": BenchmarkSpec("realworldqa", "eval", "xai-org/RealworldQA", (None,), "test",
                                 ("question", "answer", "image"), _realworldqa, ("keep_instruction",)),
    "mmmu": BenchmarkSpec("mmmu", "eval", "MMMU/MMMU", MMMU_SUBJECTS, "validation",
                          ("question", "options", "answer", "image_1"), _mmmu),
    "geo3k": BenchmarkSpec("geo3k", "train", "hiyouga/geometry3k", (None,), "train",
                           (("images", "image"), "problem", "answer"), _geo3k),
    "ocrvqa": BenchmarkSpec("ocrvqa", "train", "howard-hou/OCR-VQA", (None,), "train",
                            ("image", "questions", "answers"), _ocrvqa),
    "scienceqa": BenchmarkSpec("scienceqa", "train", "derek-thomas/ScienceQA", (None,), "train",
                               ("question", "choices", "answer"), _scienceqa, ("use_hint",)),
}

_ALIASES = {"mathverse": "mathverse", "mmbench": "mmbench", "mmbenchen": "mmbench", "realworldqa": "realworldqa",
            "rwqa": "realworldqa", "mmmu": "mmmu", "geo3k": "geo3k", "geometry3k": "geo3k", "ocrvqa": "ocrvqa",
            "scienceqa": "scienceqa", "sqa": "scienceqa"}


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The spec of a data set by name, case- and punctuation-insensitive ("OCR-VQA", "realworld_qa")."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key not in _ALIASES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[_ALIASES[key]]


# ----------------------------------------------------------------------------- opening sources

_FORMATS = (("parquet", ("parquet",)), ("arrow", ("arrow",)), ("json", ("jsonl", "json")),
            ("csv", ("tsv", "csv")))
_SPLIT_WORDS = {"train", "test", "validation", "valid", "val", "dev", "testmini", "minival"}


def _split_tokens(relpath: str) -> set[str]:
    return set(re.split(r"[/\\_.\-]", relpath.lower()))


def _data_files(spec: BenchmarkSpec, folder: str, split: str | None) -> tuple[str, list[str]]:
    found: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            ext = f.rsplit(".", 1)[-1].lower() if "." in f else ""
            for builder, exts in _FORMATS:
                if ext in exts:
                    found.setdefault(builder, []).append(os.path.join(root, f))
    for builder, _ in _FORMATS:
        files = found.get(builder)
        if not files:
            continue
        rel = {f: os.path.relpath(f, folder) for f in files}
        splits = {t for f in files for t in _split_tokens(rel[f]) & _SPLIT_WORDS}
        if split is not None:
            chosen = [f for f in files if split.lower() in _split_tokens(rel[f])]
            if not chosen and splits:
                raise ValueError(f"{spec.name}: no {builder} file for split {split!r} in {folder} "
                                 f"(files name the splits {sorted(splits)})")
            return builder, chosen or files
        if len(splits) > 1:
            chosen = [f for f in files if spec.default_split in _split_tokens(rel[f])]
            if not chosen:
                raise ValueError(f"{spec.name}: {folder} holds the splits {sorted(splits)}; pass split=")
            return builder, chosen
        return builder, files
    raise ValueError(f"{spec.name}: no parquet / arrow / json / jsonl / tsv / csv files under {folder}")


def _pick_split(spec: BenchmarkSpec, dd, split: str | None, where: str):
    if split is not None:
        if split not in dd:
            raise ValueError(f"{spec.name}: {where} has no split {split!r} (it has {sorted(dd)})")
        return dd[split]
    if len(dd) == 1:
        return next(iter(dd.values()))
    if spec.default_split in dd:
        return dd[spec.default_split]
    raise ValueError(f"{spec.name}: {where} holds the splits {sorted(dd)}; pass split=")


def _open_local(spec: BenchmarkSpec, path: str, split: str | None, load_kwargs: dict):
    import datasets

    if not os.path.exists(path):
        raise FileNotFoundError(f"{spec.name}: no such file or folder: {path}")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json")):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(spec, ds, split, path)
            return [(ds, path)]
        builder, files = _data_files(spec, path, split)
        base = path
    else:
        ext = path.rsplit(".", 1)[-1].lower()
        builder = next((b for b, exts in _FORMATS if ext in exts), None)
        if builder is None:
            raise ValueError(f"{spec.name}: cannot read {path}: expected .parquet, .arrow, .json, .jsonl, .tsv or .csv")
        files, base = [path], os.path.dirname(os.path.abspath(path))
    kwargs = dict(load_kwargs)
    if builder == "csv":
        kwargs.setdefault("delimiter", "\t" if files[0].lower().endswith(".tsv") else ",")
        kwargs.setdefault("keep_default_na", False)  # an option text "None" / "NA" stays text
        kwargs.setdefault("na_values", [""])
    ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    return [(ds, base)]


def _open_hub(spec: BenchmarkSpec, split: str, config, load_kwargs: dict):
    import datasets

    configs = spec.configs if config is None else ((config,) if isinstance(config, str) else tuple(config))
    return ((datasets.load_dataset(spec.hub_id, c, split=split, **load_kwargs), None) for c in configs)  # lazily


def _raw_rows(ds) -> Iterator[dict]:
    """Rows as python dicts with images left undecoded ({"bytes", "path"} dicts)."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        for table in ds.with_format("arrow").iter(batch_size=32):
            yield from table.to_pylist()
    elif isinstance(ds, datasets.IterableDataset):
        yield from ds.decode(False)
    else:
        raise TypeError(f"expected a datasets.Dataset or IterableDataset, got {type(ds).__name__}")


def _check_columns(spec: BenchmarkSpec, ds):
    columns = getattr(ds, "column_names", None)
    if not columns:
        return  # streaming without known features: checked per row
    for need in spec.required:
        alternatives = need if isinstance(need, tuple) else (need,)
        if not any(c in columns for c in alternatives):
            raise DatasetFormatError(spec.name, 0, " or ".join(alternatives),
                                     f"missing from every row (the data has columns {sorted(columns)})")


# ----------------------------------------------------------------------------- public API


def iter_benchmark(name: str, split: str | None = None, *, path: str | None = None, limit: int | None = None,
                   on_error: str = "raise", config=None, skipped: list | None = None, stats: dict | None = None,
                   **kwargs) -> Iterator[dict]:
    """Records of one data set, lazily (`load_benchmark` for the arguments). Rows left out
    under on_error="skip" are appended to `skipped` (as DatasetFormatErrors) when given;
    `stats["rows"]` counts the rows read."""
    stats = {} if stats is None else stats
    stats.setdefault("rows", 0)
    spec = benchmark_spec(name)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in spec.options}
    if spec.name == "mmmu" and "subjects" in kwargs:
        config = kwargs.pop("subjects")
    if path is not None:
        sources = _open_local(spec, os.fspath(path), split, kwargs)
    else:
        sources = _open_hub(spec, split or spec.default_split, config, kwargs)
    count, sources = 0, iter(sources)
    while limit is None or count < limit:  # check before opening the next source (MMMU: the next subject)
        try:
            ds, base = next(sources)
        except StopIteration:
            return
        _check_columns(spec, ds)
        for index, data in enumerate(_raw_rows(ds)):
            if limit is not None and count >= limit:
                return
            row = _Row(spec.name, index, data, base)
            stats["rows"] += 1
            try:
                for need in spec.required:
                    alternatives = need if isinstance(need, tuple) else (need,)
                    if not any(c in data for c in alternatives):
                        raise row.error(" or ".join(alternatives), f"missing (the row has columns {sorted(data)})")
                records = spec.convert(row, **options)
            except DatasetFormatError as e:
                if on_error == "raise":
                    raise
                logger.warning("skipping a row: %s", e)
                if skipped is not None:
                    skipped.append(e)
                continue
            for record in records:
                if limit is not None and count >= limit:
                    return
                yield record
                count += 1


def load_benchmark(name: str, split: str | None = None, *, path: str | None = None, limit: int | None = None,
                   on_error: str = "raise", config=None, **kwargs) -> Benchmark:
    """Load one of the paper's data sets as records (module docstring for the schema).

    name: mathverse | mmbench | realworldqa | mmmu | geo3k | ocrvqa | scienceqa (any case;
        "OCR-VQA", "geometry3k", "sqa" also work).
    split: the split (default: the set's evaluation / training split, table above); for a
        local folder it selects the files whose names carry it ("test-00000-of-00001.parquet").
    path: a local parquet / arrow / json / jsonl / tsv / csv file, a folder of them, or a
        `save_to_disk` folder. Without it: the hub id (network needed).
    limit: at most this many records (OCR-VQA: question/answer pairs).
    on_error: "raise" (default) or "skip" a row that does not fit (logged; `.skipped`).
    config: the hub config (MMMU: a subject or a list of them; `subjects=` too).
    kwargs: the set's options (mathverse `prompt`, mmbench / scienceqa `use_hint`,
        realworldqa `keep_instruction`); the rest go to `datasets.load_dataset` (cache_dir,
        revision, streaming, token, ...)."""
    spec = benchmark_spec(name)
    skipped: list[DatasetFormatError] = []
    stats: dict = {}
    records = list(iter_benchmark(name, split, path=path, limit=limit, on_error=on_error, config=config,
                                  skipped=skipped, stats=stats, **kwargs))
    result = Benchmark(records, name=spec.name, split=split or (None if path else spec.default_split),
                       skipped=skipped, rows_read=stats["rows"])
    if skipped:
        logger.warning("%s", result.summary())
    return result


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "record"


def to_jsonl(records, path: str, image_dir: str | None = None) -> int:
    """Write records as the JSONL that `dreamr eval` / `evaluate.read_records` reads:
    {"id", "question", "image" (a PNG path relative to the JSONL file), "answer", "source",
    "choices", "answer_type"} (+ "images", all the PNG paths, for multi-image records; only
    "image" reaches the model through `read_records`). Images go to `image_dir` (default:
    "images" beside the file). Returns the number of records written."""
    base = os.path.dirname(os.path.abspath(path))
    image_dir = os.path.join(base, "images") if image_dir is None else os.path.abspath(image_dir)
    os.makedirs(base, exist_ok=True)
    used: set[str] = set()
    n = 0
    with open(path, "w") as f:
        for record in records:
            stem = _safe_name(f"{record.get('source', 'data')}-{record.get('id', n)}")
            while stem in used:
                stem += "_"
            used.add(stem)
            images = record.get("images")
            if images is None:
                images = [] if record.get("image") is None else [record["image"]]
            paths = []
            for k, im in enumerate(images):
                if im is None:
                    continue
                os.makedirs(image_dir, exist_ok=True)
                file = os.path.join(image_dir, f"{stem}.png" if k == 0 else f"{stem}_{k + 1}.png")
                to_pil(im).save(file)
                paths.append(os.path.relpath(file, base))
            row = {"id": str(record.get("id", n)), "question": record["question"],
                   "image": paths[0] if paths else None, "answer": record.get("answer"),
                   "source": record.get("source"), "choices": list(record.get("choices") or []),
                   "answer_type": record.get("answer_type", "text")}
            if len(paths) > 1:
                row["images"] = paths
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkSpec", "DatasetFormatError", "MMMU_SUBJECTS", "benchmark_spec",
           "extract_answer", "grade", "iter_benchmark", "load_benchmark", "to_jsonl", "to_pil"]
