"""Answer grading: choice letters, numbers with tolerance, normalised free text.

Answer extraction (`final_answer`: the last complete \\boxed{}, else a stated choice letter)
lives here too, with the grading it feeds; the engine imports it from here.

Two layers:

* record-free helpers (`normalise`, `as_number`, `answers_match`, `parse_number`,
  `numbers_match`, `normalise_text`, `choice_letter`), and
* record-aware `extract_answer(text, record)` / `grade(predicted, record)`, which read a
  benchmark record's `answer_type` ("choice" | "number" | "text"), `choices` and `answer`
  (the schema of `dreamr_jax.data.datasets`).

Grading rules:

* choice: the predicted letter (from "B", "(B)", "B.", "B. text", "Option B", or a text
  equal to one choice's text) must equal the reference letter exactly;
* number: both sides parsed with `parse_number` (LaTeX \\frac / \\sqrt / \\pi, "1/2",
  thousands separators, degree signs, "\\%"/"%", trailing units and a leading "x =" are
  handled) and compared with a relative tolerance (1e-4 by default, absolute below 1); a
  percent on either side also accepts the value divided by 100 ("50%" == "0.5");
* text: equal after `normalise_text` (case, LaTeX wrappers, punctuation, articles,
  whitespace), or equal as numbers when both parse.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import string

# ---- the final answer a reasoning text states (the decode loop and the methods stop on it) ----

_BOXED = re.compile(r"\\boxed\{")
_CHOICE = re.compile(r"(?:answer|Answer|ANSWER)\s*(?:is|:)?\s*:?\s*\(?([A-J])\)?(?![A-Za-z])")


def boxed_answer(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (nested braces allowed), else None."""
    result = None
    for match in _BOXED.finditer(text):
        group = brace_group(text, match.end() - 1)
        if group is not None:
            result = group[0]
    return result


def brace_group(text: str, start: int) -> tuple[str, int] | None:
    """The content of the `{...}` group opening at text[start] (nested braces allowed) and the
    index after it; None if text[start] is not "{" or the group never closes."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def choice_answer(text: str) -> str | None:
    """A multiple-choice letter stated as an answer ("Answer: B", "the answer is (C)")."""
    found = _CHOICE.findall(text)
    return found[-1] if found else None


def final_answer(text: str) -> str | None:
    """The final answer a step states, if any: a complete \\boxed{} first, else a choice letter."""
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed.strip()
    return choice_answer(text)


# ---- grading ----

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\(text|mathrm|textbf)\{([^}]*)\}", r"\2", text)
    text = text.replace("\\!", "").replace("\\,", "").replace("{", "").replace("}", "")
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").lower()
    return text


def as_number(text: str) -> float | None:
    """A number stated by `text` ("3", "3.0", "1,000", "50%", "\\frac{1}{2}", "60°", ...), else None."""
    return parse_number(text)


def answers_match(predicted: str | None, reference: str | None, rel_tol: float = 1e-4) -> bool:
    """True when a predicted final answer matches the reference: same choice letter, numbers
    equal within a relative tolerance, or equal normalised text."""
    if predicted is None or reference is None:
        return False
    p, r = normalise(str(predicted)), normalise(str(reference))
    if len(r) == 1 and r.isalpha():
        m = re.match(r"^\(?([a-z])\)?(\b|$)", p)
        return m is not None and m.group(1) == r
    pn, rn = parse_number(str(predicted)), parse_number(str(reference))
    if pn is not None and rn is not None:
        # A unit may be left out on one side ("12" vs "12 cm") but not differ ("2 cats" vs "2 dogs").
        pu, ru = _unit_of(str(predicted)), _unit_of(str(reference))
        return numbers_match(pn, rn, rel_tol) and (not pu or not ru or pu == ru)
    return p == r


def _unit_of(text: str) -> str:
    """The trailing unit word(s) of a numeric answer ("12 cm" -> "cm"), lower case; "" if none."""
    m = _UNIT_TAIL.search(normalise(text))
    return re.sub(r"\s+", " ", m.group(0)).strip().rstrip(".") if m else ""


# ----------------------------------------------------------------------------- numbers

_LATEX_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle", "$")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree|\^\s*\{?\s*o\s*\}?(?![a-z])")
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|textbf|textit|mbox|operatorname|mathbf)\s*\{([^{}]*)\}")
_ASSIGN = re.compile(r"^[^=≈]{0,40}?(?:=|\\approx|≈)(?!.*(?:=|\\approx|≈))\s*")  # "x = ", "AB = ", "1+2 = "
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])")
_UNIT_TAIL = re.compile(r"(?:\s*(?<![a-zA-Z\\])(?!pi\b|sqrt\b)[a-zA-Z]+\.?(?:\s*(?:\^|\*\*)\s*\(?\d\)?)?)+\s*$")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}


def _latex_to_expr(t: str) -> str:
    """\\frac{a}{b} -> ((a)/(b)), \\sqrt{x} -> sqrt(x), \\pi -> pi, operators, braces -> parens."""
    out, i = [], 0
    while i < len(t):
        m = re.match(r"\\[dt]?frac\s*", t[i:])
        if m:
            j = i + m.end()
            num = brace_group(t, j)
            if num is None:  # \frac12
                if j + 1 < len(t) and t[j].isdigit() and t[j + 1].isdigit():
                    out.append(f"(({t[j]})/({t[j + 1]}))")
                    i = j + 2
                    continue
                raise ValueError("malformed \\frac")
            den = brace_group(t, num[1])
            if den is None:
                raise ValueError("malformed \\frac")
            out.append(f"(({_latex_to_expr(num[0])})/({_latex_to_expr(den[0])}))")
            i = den[1]
            continue
        m = re.match(r"\\sqrt\s*", t[i:])
        if m:
            j = i + m.end()
            root = "2"
            if j < len(t) and t[j] == "[":
                k = t.index("]", j)
                root, j = _latex_to_expr(t[j + 1:k]), k + 1
            arg = brace_group(t, j)
            if arg is None:  # \sqrt3
                m2 = re.match(r"\d+(\.\d+)?", t[j:])
                if not m2:
                    raise ValueError("malformed \\sqrt")
                arg = (m2.group(0), j + m2.end())
            out.append(f"(({_latex_to_expr(arg[0])})**(1/({root})))")
            i = arg[1]
            continue
        m = re.match(r"\\(pi|cdot|times|div)(?![a-zA-Z])", t[i:])
        if m:
            out.append({"pi": "pi", "cdot": "*", "times": "*", "div": "/"}[m.group(1)])
            i += m.end()
            continue
        if t[i] == "\\":
            raise ValueError("unknown LaTeX command")
        out.append({"{": "(", "}": ")", "^": "**", "π": "pi", "×": "*", "÷": "/", "−": "-"}.get(t[i], t[i]))
        i += 1
    return "".join(out)


def _eval_expr(expr: str) -> float:
    expr = re.sub(r"(?<=[\d.)])\s*(?=[(a-z])", "*", expr)  # 2pi, 2(3), )(  -> explicit products
    expr = re.sub(r"(?<=pi)\s*(?=[\d(])", "*", expr)
    tree = ast.parse(expr, mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == "pi":
            return math.pi
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
                and len(node.args) == 1 and not node.keywords):
            v = ev(node.args[0])
            if v < 0:
                raise ValueError("sqrt of a negative")
            return math.sqrt(v)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e12):
                raise ValueError("power too large")
            v = _BINOPS[type(node.op)](a, b)
            if isinstance(v, complex):
                raise ValueError("complex")
            return v
        raise ValueError("unsupported expression")

    value = ev(tree)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def parse_number_percent(text) -> tuple[float, bool] | None:
    """(value, stated as a percent) for a numeric answer text, else None. See `parse_number`."""
    if text is None:
        return None
    t = str(text).strip()
    if not t or len(t) > 200:
        return None
    t = re.sub(r"^\\boxed\{(.*)\}$", r"\1", t)
    for s in _LATEX_DROP:
        t = t.replace(s, "")
    t = _TEXT_CMD.sub(r" \1", t)
    t = _DEGREE.sub("", t)
    t = t.strip().rstrip(".").strip()
    t = _ASSIGN.sub("", t)
    percent = False
    if re.search(r"\\?%\s*$", t) or re.search(r"\s(?:percent|per cent)\s*$", t, re.I):
        percent = True
        t = re.sub(r"(\\?%|\s(?:percent|per cent))\s*$", "", t, flags=re.I)
    t = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), t)
    t = _UNIT_TAIL.sub("", t).strip()
    if not t:
        return None
    if _NUMBER.match(t):
        value = float(t)
        return (value, percent) if math.isfinite(value) else None
    if not re.fullmatch(r"[\d\s.+\-*/^(){}\\a-zA-Zπ×÷−\[\]]+", t) or not re.search(r"\d|\\pi|π", t):
        return None
    try:
        return _eval_expr(_latex_to_expr(t)), percent
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None


def parse_number(text) -> float | None:
    """The number a short answer states: "3", "3.0", "-2.5e3", "1,000", "1/2", "\\frac{1}{2}",
    "2\\sqrt{3}", "3\\pi", "60°", "60^\\circ", "12 cm", "x = 4", "50%" (-> 50.0); else None."""
    parsed = parse_number_percent(text)
    return None if parsed is None else parsed[0]


def numbers_match(predicted: float, reference: float, rel_tol: float = 1e-4) -> bool:
    """Equal within `rel_tol` relative to the reference (absolute below magnitude 1)."""
    return abs(predicted - reference) <= rel_tol * max(1.0, abs(reference))


def format_number(value: float) -> str:
    """A canonical short string: 3.0 -> "3", 0.5 -> "0.5"."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.12g}"


# ----------------------------------------------------------------------------- text and letters

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile("[" + re.escape(string.punctuation + "“”‘’«»…–—") + "]")


def normalise_text(text: str) -> str:
    """VQA-style free-text normalisation: LaTeX wrappers and $ dropped, lower case,
    punctuation -> space, articles (a, an, the) removed, whitespace collapsed."""
    t = str(text)
    t = _TEXT_CMD.sub(r"\1", t).replace("$", "")
    t = t.lower()
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    t = _PUNCT.sub(" ", t)
    t = _ARTICLES.sub(" ", t)
    return re.sub(r"\s+", " ", t).strip()


def _letters(num_choices: int | None) -> str:
    return string.ascii_uppercase[: num_choices] if num_choices else "ABCDEFGHIJ"


def choice_letter(text: str | None, choices=None) -> str | None:
    """The choice letter a short answer names: "B", "(B)", "B.", "B) text", "b", "Option B",
    "\\text{B}", or a text equal (normalised, or as a number) to exactly one of `choices`.
    Letters beyond the number of choices are refused."""
    if text is None:
        return None
    choices = list(choices or [])
    valid = _letters(len(choices) or None)
    t = _TEXT_CMD.sub(r"\1", str(text)).replace("$", "").replace("*", "").strip()
    t = re.sub(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*", "", t, flags=re.I).strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", t)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    m = re.match(r"^\(?([A-J])(?:\)|\.|:|\s*\)|(?=\s))\s*(.*)$", t, flags=re.S)
    if m and m.group(1) in valid:
        rest = m.group(2).strip()
        # "B. text": a text after the letter must not contradict it (nor read as a sentence)
        if not rest or (choices and _same_choice(rest, choices[valid.index(m.group(1))])):
            return m.group(1)
        if (not choices or _index_of_text(rest, choices) is None) and not re.match(r"^[a-z]", rest):
            return m.group(1)
    idx = _index_of_text(t, choices)
    return None if idx is None else valid[idx]


def _same_choice(text: str, choice: str) -> bool:
    a, b = normalise_text(text), normalise_text(choice)
    if a and a == b:
        return True
    pa, pb = parse_number(text), parse_number(choice)
    return pa is not None and pb is not None and numbers_match(pa, pb)


def _index_of_text(text: str, choices) -> int | None:
    hits = [i for i, c in enumerate(choices) if _same_choice(text, str(c))]
    return hits[0] if len(hits) == 1 else None


# ----------------------------------------------------------------------------- record-aware

_ANSWER_STATEMENT = re.compile(
    r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_LAST_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?\s*%?|[-+]?\.\d+\s*%?")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _statement(text: str) -> str | None:
    found = _ANSWER_STATEMENT.findall(text)
    if not found:
        return None
    s = found[-1].strip().strip("*").strip()
    return s.rstrip(".").strip() or None


def extract_answer(text: str | None, record: dict) -> str | None:
    """A model output's final answer for `record`: a choice letter ("choice"), a number
    ("number", canonical form, a trailing "%" kept) or `normalise`d text ("text").

    Looks at, in order: the last complete \\boxed{...}; an answer statement ("the answer is
    (C)", "Answer: 12"); the final line. None when nothing usable is found."""

    if not text:
        return None
    kind = record.get("answer_type", "text")
    choices = record.get("choices") or []
    boxed = boxed_answer(text)
    statement = _statement(text)
    last = _last_line(text)
    if kind == "choice":
        valid = _letters(len(choices) or None)
        for candidate in (boxed, statement):
            letter = choice_letter(candidate, choices)
            if letter:
                return letter
        letter = choice_answer(text)
        if letter and letter in valid:
            return letter
        last_clean = re.sub(r"^\W*(?:so|thus|therefore|hence)\b[\s,]*", "", last, flags=re.I)
        return choice_letter(last_clean, choices)
    if kind == "number":
        for candidate in (boxed, statement):
            if candidate is not None:
                parsed = parse_number_percent(candidate)
                if parsed is not None:
                    return format_number(parsed[0]) + ("%" if parsed[1] else "")
        if boxed is not None:
            return normalise(boxed)
        for source, pick in ((statement, 0), (last, -1)):  # first number stated, last on the final line
            if source:
                numbers = _LAST_NUMBER.findall(source)
                if numbers:
                    parsed = parse_number_percent(numbers[pick].replace(" ", ""))
                    if parsed is not None:
                        return format_number(parsed[0]) + ("%" if parsed[1] else "")
        return None
    for candidate in (boxed, statement, last):
        if candidate:
            return normalise(candidate)
    return None


def _references(record: dict) -> list[str]:
    ref = record.get("answer")
    refs = [] if ref is None else [str(ref)]
    refs += [str(a) for a in (record.get("meta") or {}).get("answer_aliases", ()) if a is not None]
    return refs


def _numbers_equal(predicted: str, reference: str, rel_tol: float) -> bool | None:
    p, r = parse_number_percent(predicted), parse_number_percent(reference)
    if p is None or r is None:
        return None
    (pv, pp), (rv, rp) = p, r
    if numbers_match(pv, rv, rel_tol):
        return True
    if pp and not rp and numbers_match(pv / 100, rv, rel_tol):
        return True
    if rp and not pp and numbers_match(pv, rv / 100, rel_tol):
        return True
    return False


def grade(predicted: str | None, record: dict, rel_tol: float = 1e-4) -> bool:
    """True when `predicted` (a final answer, e.g. from `extract_answer`) is right for
    `record` under its `answer_type` (module docstring for the rules)."""
    if predicted is None:
        return False
    refs = _references(record)
    if not refs:
        return False
    kind = record.get("answer_type", "text")
    if kind == "choice":
        letter = choice_letter(predicted, record.get("choices") or [])
        return letter is not None and any(letter == r.strip().upper() for r in refs)
    for ref in refs:
        if kind == "number":
            same = _numbers_equal(str(predicted), ref, rel_tol)
            if same:
                return True
            if same is None and _expression(str(predicted)) == _expression(ref) and _expression(ref):
                return True  # the same non-numeric answer, e.g. "2\\sqrt{x}" or "y=2x+1"
        else:
            if normalise_text(ref) and normalise_text(str(predicted)) == normalise_text(ref):
                return True
            p, r = _plain_number(str(predicted)), _plain_number(ref)
            if p is not None and r is not None and numbers_match(p, r, rel_tol):
                return True
    return False


def _expression(text: str) -> str:
    return normalise(text).replace(" ", "")


def _plain_number(text: str) -> float | None:
    t = normalise(text).replace(",", "")
    return float(t) if _NUMBER.match(t) else None
