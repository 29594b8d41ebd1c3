"""Answer parsing (dreamr_jax.data.grading): the last complete box, then a choice letter."""

from __future__ import annotations

from dreamr_jax.data.grading import boxed_answer, final_answer


def test_final_answer_and_boxed():
    assert boxed_answer(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert boxed_answer(r"\boxed{{a}{b}{c}}") == "{a}{b}{c}"
    assert final_answer(r"first \boxed{3} then \boxed{4}.") == "4"  # the last box wins
    assert final_answer(r"first \boxed{3} then \boxed{4") == "3"  # an incomplete box is ignored
    assert final_answer(r"\boxed{12") is None
    assert final_answer(r"\boxed{ 7 }") == "7"
    assert final_answer("The answer is (C).") == "C"
    assert final_answer("Answer: B") == "B"
    assert final_answer(r"Answer: B, but really \boxed{D}") == "D"  # a box beats a letter
    assert final_answer("The Answer is Bob") is None  # a word, not a choice letter
    assert final_answer("no answer here") is None
    assert final_answer("") is None
