"""The grader, case by case. Each case is judged by mathematics: (answer inside the tags, ground truth,
is it right?). Responses are built around the answer so the format logic is exercised separately."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evaluator import grader
from evaluator.grader import GraderError, GraderPool, extract_answer, grade, grader_version, judge, r1_zero_reward


def resp(answer: str) -> str:
    return f"Some reasoning here. </think> <answer> {answer} </answer>"


REPO = Path(__file__).resolve().parent.parent
RIGHT, WRONG = True, False

# (predicted answer, ground truth, mathematically equal?)
CASES = [
    # integers, signs, unicode minus
    ("42", "42", RIGHT),
    ("042", "42", RIGHT),
    ("+7", "7", RIGHT),
    ("-3", "-3", RIGHT),
    ("\u22123", "-3", RIGHT),
    ("- 3", "-3", RIGHT),
    ("3", "-3", WRONG),
    ("5", "50", WRONG),
    ("50", "5", WRONG),
    ("12", "21", WRONG),
    ("0", "0", RIGHT),
    ("-0", "0", RIGHT),
    ("1000000", "1000000", RIGHT),
    ("999999", "1000000", WRONG),
    # decimals vs fractions
    ("0.5", "\\frac{1}{2}", RIGHT),
    ("\\frac{1}{2}", "0.5", RIGHT),
    ("\\dfrac12", "\\frac{1}{2}", RIGHT),
    ("\\tfrac{1}{2}", "0.5", RIGHT),
    ("1/2", "\\frac{1}{2}", RIGHT),
    ("1/2", "0.5", RIGHT),
    (".5", "0.5", RIGHT),
    ("0.50", "1/2", RIGHT),
    ("2/4", "\\frac12", RIGHT),
    ("\\frac{2}{1}", "2", RIGHT),
    ("-\\frac{3}{4}", "-0.75", RIGHT),
    ("\\frac{-3}{4}", "-\\frac{3}{4}", RIGHT),
    ("-0.75", "\\frac{-3}{4}", RIGHT),
    ("1/2", "2", WRONG),
    ("2", "\\frac{1}{2}", WRONG),
    ("0.333", "\\frac{1}{3}", WRONG),
    ("0.3", "\\frac13", WRONG),
    ("\\frac{1}{3}", "\\frac{2}{6}", RIGHT),
    ("1.25", "\\frac{5}{4}", RIGHT),
    ("1\\frac{1}{4}", "\\frac{5}{4}", RIGHT),
    ("3.5", "3.50", RIGHT),
    ("3.5", "3.05", WRONG),
    ("7", "7.0", RIGHT),
    ("7", "7.0001", WRONG),
    ("2.0", "2", RIGHT),
    # thousands separators vs tuples
    ("1,000", "1000", RIGHT),
    ("1000", "1,000", RIGHT),
    ("12,345,678", "12345678", RIGHT),
    ("1{,}000", "1000", RIGHT),
    ("3\\,000", "3000", RIGHT),
    ("3\\ 000", "3000", RIGHT),
    ("1,000.5", "1000.5", RIGHT),
    ("1,000", "100", WRONG),
    ("(1,2)", "(1, 2)", RIGHT),
    ("(1,2)", "(2,1)", WRONG),
    ("(1,000)", "1000", WRONG),
    ("(1, 2)", "\\left(1,2\\right)", RIGHT),
    # dollars and money
    ("\\$18", "18", RIGHT),
    ("$18$", "18", RIGHT),
    ("18.00", "18", RIGHT),
    ("\\$18.00", "18", RIGHT),
    ("18 dollars", "18", RIGHT),
    ("\\$1,250", "1250", RIGHT),
    ("\\$17.99", "18", WRONG),
    ("US\\$5", "5", RIGHT),
    ("\\$0.50", "0.5", RIGHT),
    # percents (as the reference graders: 50\% is 50)
    ("50\\%", "50", RIGHT),
    ("50", "50\\%", RIGHT),
    ("50%", "50", RIGHT),
    ("12.5\\%", "12.5", RIGHT),
    ("25\\%", "50", WRONG),
    ("50 percent", "50", RIGHT),
    # units and text
    ("5 \\text{ cm}", "5", RIGHT),
    ("5", "5 \\text{ cm}", RIGHT),
    ("5 inches", "5", RIGHT),
    ("12 \\mbox{ meters}", "12", RIGHT),
    ("7\\text{ apples}", "7", RIGHT),
    ("3 hours", "3", RIGHT),
    ("6 \\text{cm}^2", "6", RIGHT),
    ("4 \\text{ cm}", "5", WRONG),
    ("15 minutes", "15", RIGHT),
    ("2 kg", "2", RIGHT),
    ("9\\text{ feet}", "9", RIGHT),
    # degrees
    ("30^\\circ", "30", RIGHT),
    ("30", "30^\\circ", RIGHT),
    ("30^{\\circ}", "30", RIGHT),
    ("30\u00b0", "30", RIGHT),
    ("45^\\circ", "30", WRONG),
    ("90^\\circ", "90", RIGHT),
    # roots, pi, closed forms
    ("2\\sqrt{2}", "\\sqrt{8}", RIGHT),
    ("\\sqrt{8}", "2\\sqrt2", RIGHT),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", RIGHT),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", RIGHT),
    ("\\sqrt{3}", "\\sqrt{2}", WRONG),
    ("3\\sqrt{3}", "\\sqrt{27}", RIGHT),
    ("\\pi", "\\pi", RIGHT),
    ("2\\pi", "\\pi \\cdot 2", RIGHT),
    ("3.14", "\\pi", WRONG),
    ("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi", RIGHT),
    ("\\pi/3", "\\frac{\\pi}{3}", RIGHT),
    ("\\pi", "3.14159", WRONG),
    ("e^{2}", "e^2", RIGHT),
    ("\\ln(e^{2})", "2", RIGHT),
    ("2^{10}", "1024", RIGHT),
    ("10!", "3628800", RIGHT),
    ("\\binom{5}{2}", "10", RIGHT),
    ("\\sqrt[3]{27}", "3", RIGHT),
    ("4\\pi", "12.566", WRONG),
    # scientific notation
    ("1.5 \\times 10^{3}", "1500", RIGHT),
    ("1.5e3", "1500", RIGHT),
    ("1500", "1.5 \\times 10^3", RIGHT),
    ("3 \\cdot 10^{-2}", "0.03", RIGHT),
    ("1.5 \\times 10^{4}", "1500", WRONG),
    ("2E-3", "0.002", RIGHT),
    # algebraic equivalence
    ("(x+1)^2", "x^2+2x+1", RIGHT),
    ("x^2+2x+1", "(x+1)^2", RIGHT),
    ("x^2-1", "(x-1)(x+1)", RIGHT),
    ("2x+2", "2(x+1)", RIGHT),
    ("x^2+1", "(x+1)^2", WRONG),
    ("\\frac{x}{2}", "0.5x", RIGHT),
    ("a+b", "b+a", RIGHT),
    ("3x", "x^3", WRONG),
    ("x+1", "y+1", WRONG),
    # equations vs values
    ("x=5", "5", RIGHT),
    ("5", "x=5", RIGHT),
    ("x = 5", "x=5", RIGHT),
    ("y=5", "5", RIGHT),
    ("x=6", "5", WRONG),
    ("y = 2x+3", "2x+3", RIGHT),
    # intervals
    ("[1,3)", "[1, 3)", RIGHT),
    ("(1,3]", "[1,3]", WRONG),
    ("(-\\infty, 2)", "(-\\infty,2)", RIGHT),
    ("[0,\\infty)", "[0, \\infty)", RIGHT),
    ("(0,1)", "[0,1]", WRONG),
    ("(-\\infty,-1)\\cup(1,\\infty)", "(-\\infty,-1) \\cup (1,\\infty)", RIGHT),
    # tuples and sets
    ("(2, -3)", "(2,-3)", RIGHT),
    ("(3,4,5)", "(3, 4, 5)", RIGHT),
    ("(3,5,4)", "(3,4,5)", WRONG),
    ("\\{1,2\\}", "\\{2,1\\}", RIGHT),
    ("\\{1,2,3\\}", "\\{1,2\\}", WRONG),
    ("(1,2)", "\\{1,2\\}", WRONG),
    ("1, 2", "2, 1", RIGHT),
    ("-2, 3", "3, -2", RIGHT),
    ("1, 2", "1, 3", WRONG),
    # matrices
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1 & 2\\\\ 3 & 4\\end{pmatrix}", RIGHT),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}", WRONG),
    ("\\begin{bmatrix}1\\\\0\\end{bmatrix}", "\\begin{pmatrix}1\\\\0\\end{pmatrix}", RIGHT),
    ("\\begin{pmatrix}0.5\\\\1\\end{pmatrix}", "\\begin{pmatrix}\\frac12\\\\1\\end{pmatrix}", RIGHT),
    # multiple choice and words
    ("B", "B", RIGHT),
    ("(B)", "B", RIGHT),
    ("\\text{(B)}", "B", RIGHT),
    ("B", "\\text{(B)}", RIGHT),
    ("b", "B", RIGHT),
    ("C", "B", WRONG),
    ("(C)", "B", WRONG),
    ("\\text{Monday}", "Monday", RIGHT),
    ("Monday", "\\text{Monday}", RIGHT),
    ("Tuesday", "Monday", WRONG),
    ("\\textbf{yes}", "yes", RIGHT),
    ("no", "yes", WRONG),
    ("\\text{even}", "\\text{odd}", WRONG),
    # LaTeX spacing and sizing noise
    ("\\left( 1, 2 \\right)", "(1,2)", RIGHT),
    ("10\\!", "10", RIGHT),
    ("\\,10", "10", RIGHT),
    ("\\displaystyle \\frac{1}{2}", "0.5", RIGHT),
    ("\\left[ 0 , 1 \\right)", "[0,1)", RIGHT),
    ("\\Big( 3 \\Big)", "3", RIGHT),
    ("\\; 7 \\;", "7", RIGHT),
    ("\\quad 8", "8", RIGHT),
    ("$\\frac{3}{5}$", "0.6", RIGHT),
    ("\\(4\\)", "4", RIGHT),
    # boxed inside the answer
    ("\\boxed{12}", "12", RIGHT),
    ("so it is \\boxed{\\frac{1}{4}}", "0.25", RIGHT),
    ("\\boxed{1} then \\boxed{2}", "2", RIGHT),
    ("\\boxed{3}", "4", WRONG),
    # GSM8K-style plain ground truths
    ("18", "18", RIGHT),
    ("\\$18", "18", RIGHT),
    ("18.5", "18", WRONG),
    ("1,080", "1080", RIGHT),
    ("70000", "70,000", RIGHT),
    # trig and exact values
    ("\\frac{\\sqrt{3}}{2}", "\\sin(\\pi/3)", RIGHT),
    ("\\cos(0)", "1", RIGHT),
    ("\\tan(\\pi/4)", "1", RIGHT),
    ("\\frac{1}{2}", "\\cos(\\pi/3)", RIGHT),
    # unicode math
    ("\u00bd", "\\frac{1}{2}", RIGHT),
    ("\u00bd", "0.25", WRONG),
    ("1\u00bd", "\\frac{3}{2}", RIGHT),
    ("\u221a2", "\\sqrt{2}", RIGHT),
    ("2\u221a3", "\\sqrt{12}", RIGHT),
    ("\u221a2", "\\sqrt{3}", WRONG),
    ("x\u00b2+1", "x^2+1", RIGHT),
    ("x\u00b2", "x^3", WRONG),
    ("3\u03c0", "3\\pi", RIGHT),
    ("\u2153", "0.\\overline{3}", RIGHT),
    ("\u00be", "0.75", RIGHT),
    ("\u221e", "\\infty", RIGHT),
    ("(-\u221e, 2]", "(-\\infty, 2]", RIGHT),
    ("2\u00d73", "6", RIGHT),
    # a number counted by a word, against a bare number
    ("6 cookies", "6", RIGHT),
    ("6 cookies", "7", WRONG),
    ("24 students", "24", RIGHT),
    ("1,200 marbles", "1200", RIGHT),
    ("12 red apples", "12", RIGHT),
    ("5 or 6", "5", WRONG),
    ("5 heads", "5 tails", WRONG),
    ("3 x", "3", WRONG),
    # repeating decimals
    ("0.\\overline{3}", "\\frac{1}{3}", RIGHT),
    ("\\frac{1}{3}", "0.\\overline{3}", RIGHT),
    ("0.1\\overline{6}", "\\frac{1}{6}", RIGHT),
    ("1.\\overline{27}", "\\frac{14}{11}", RIGHT),
    ("0.\\overline{3}", "0.33", WRONG),
    ("0.\\overline{6}", "\\frac{1}{3}", WRONG),
    # inequalities against intervals
    ("x > 3", "(3, \\infty)", RIGHT),
    ("x > 3", "[3, \\infty)", WRONG),
    ("(3,\\infty)", "x>3", RIGHT),
    ("x \\geq 2", "[2,\\infty)", RIGHT),
    ("x \\le -1", "(-\\infty,-1]", RIGHT),
    ("x < -1", "(-\\infty,-1]", WRONG),
    ("2 < x < 5", "(2,5)", RIGHT),
    ("-1 \\le x < 3", "[-1, 3)", RIGHT),
    ("2 < x \\le 5", "(2,5)", WRONG),
    ("x \u2265 3", "[3,\\infty)", RIGHT),
    # close but wrong
    ("49", "50", WRONG),
    ("0.49", "\\frac{1}{2}", WRONG),
    ("\\frac{2}{3}", "\\frac{3}{2}", WRONG),
    ("-5", "5", WRONG),
    ("x^3", "x^2", WRONG),
    ("\\sqrt{2}", "1.414", WRONG),
    ("100", "10^3", WRONG),
    ("2^{10}", "1000", WRONG),
    # false positives found by a review (2026-11-27): each was graded right before
    ("-21", "-2,1", WRONG),  # list commas are not thousands separators (MATH-500: integer roots)
    ("-2, 1", "-2,1", RIGHT),
    ("1,5", "15", WRONG),
    ("1000000001", "1000000000", WRONG),  # integers compare exactly, not as floats
    ("12345678901", "12345678902", WRONG),
    ("1e-13", "2e-13", WRONG),
    ("5x - 7y + 11z + 4 = 0", "0", WRONG),  # an equation is not the number on its right
    ("x+y=10", "10", WRONG),
    ("x^2=4", "4", WRONG),
    ("12 = 5", "5", WRONG),
    ("x = 5", "5", RIGHT),
    ("11111111100", "11,\\! 111,\\! 111,\\! 100", RIGHT),  # MATH's thousands: ",\\!"
    ("11,111,111,100", "11,\\! 111,\\! 111,\\! 100", RIGHT),
    ("100, 111, 11", "11,\\! 111,\\! 111,\\! 100", WRONG),
    ("3 + 2m", "5", WRONG),  # a variable is not a unit
    ("10 - 2g", "8", WRONG),
    ("\\frac{1}{2} \\text{ cm}", "\\frac{1}{2}", RIGHT),
    ("4\\pi \\text{ cm}^2", "4\\pi", RIGHT),
    ("5 hours", "5 minutes", WRONG),  # units on both sides must agree
    ("5 \\text{ dollars}", "5 \\text{ cents}", WRONG),
    ("6 \\text{ cm}^3", "6 \\text{ cm}^2", WRONG),
    ("5 \\text{ hours}", "5 \\text{ hour}", RIGHT),
    ("3 a", "3", WRONG),  # words that do not count the number
    ("10 factorial", "10", WRONG),
    ("3 tenths", "3", WRONG),
    ("5 is wrong", "5", WRONG),
    ("\\text{Nivan}", "\\text{Navin}", WRONG),  # words are compared as words, not as products of letters
    ("\\text{seat}", "\\text{east}", WRONG),
    ("\\text{East}", "\\text{east}", RIGHT),
    ("ab", "ba", RIGHT),  # short letter strings stay algebra
    # false positives found by a review (issue 21): each was graded right before
    ("2", "2m", WRONG),  # R12: in math mode a bare letter is a variable, not a unit
    ("2", "2g", WRONG),
    ("9", "9L", WRONG),
    ("3", "3s", WRONG),
    ("2", "2h", WRONG),
    ("1.414214", "\\sqrt{2}", WRONG),  # R11: a rounded irrational is not the exact value
    ("3.141593", "\\pi", WRONG),
    ("0.5\\%", "0.5", WRONG),  # R6: undecided (counted wrong), see test_undecided
    ("\\$5", "5 \\text{ cents}", WRONG),  # R4: dollars are not cents
    ("5^\\circ", "5\\%", WRONG),  # R6: a percent is not a unit
    # R4 the other way: a unit in a text wrapper (a single letter too) is a unit; abbreviations are the unit
    ("2m", "2m", RIGHT),
    ("5", "5\\text{ m}", RIGHT),
    ("5 \\text{m}", "5", RIGHT),
    ("864", "864 \\mbox{ inches}^2", RIGHT),
    ("864 \\text{ square inches}", "864 \\mbox{ inches}^2", RIGHT),
    ("864 \\text{ ft}^2", "864 \\mbox{ inches}^2", WRONG),
    ("5 \\text{ centimeters}", "5 \\text{ cm}", RIGHT),
    ("3 hrs", "3 hours", RIGHT),
    ("3 minutes", "3 hours", WRONG),
    ("5.4", "5.4 \\text{ cents}", RIGHT),
    ("5.4 cents", "5.4 \\text{ cents}", RIGHT),
    ("\\$5.4", "5.4 \\text{ cents}", WRONG),
    ("32348", "\\$32,\\!348", RIGHT),
    ("\\$32,348", "\\$32,\\!348", RIGHT),
    ("32,348 \\text{ cents}", "\\$32,\\!348", WRONG),
    ("30 degrees", "30^\\circ", RIGHT),
    ("\\frac{270}7", "\\frac{270}7\\text{ degrees}", RIGHT),  # MATH's \\frac{270}7: a numeric term too
    ("\\frac{270}{7}^\\circ", "\\frac{270}7\\text{ degrees}", RIGHT),
    ("\\frac{270}{7} \\text{ cm}", "\\frac{270}7\\text{ degrees}", WRONG),
    ("30 \\text{ cm}", "30^\\circ", WRONG),
    ("\\frac{\\pi}{6}", "30^\\circ", WRONG),
    # R6: percent readings
    ("5", "5\\%", RIGHT),
    ("0.05", "5\\%", RIGHT),
    ("0.5", "5\\%", WRONG),
    ("5\\%", "0.05", RIGHT),
    ("120\\%", "120", RIGHT),
    ("12\\%", "120", WRONG),
    # R7: named equations answer a value; others do not
    ("\\theta = \\frac{\\pi}{4}", "\\frac{\\pi}{4}", RIGHT),
    ("AB = 7", "7", RIGHT),
    ("f(x) = x^2 + 1", "x^2+1", RIGHT),
    ("x_1 = 3", "3", RIGHT),
    ("\\theta = \\frac{\\pi}{3}", "\\frac{\\pi}{4}", WRONG),
    ("x + 1 = 5", "5", WRONG),
    ("d = 5 \\text{ cm}", "5", RIGHT),  # R7 then R4: the right side keeps its unit
    ("d = 5 \\text{ cm}", "5 \\text{ mm}", WRONG),
    ("p = 5\\%", "5\\%", RIGHT),
    ("p = 0.5\\%", "0.5", WRONG),
    # R8: a choice gold takes only its letter
    ("\\text{(E)}", "\\text{(E)}", RIGHT),
    ("E", "\\text{(E)}", RIGHT),
    ("D", "\\text{(E)}", WRONG),
    ("5", "\\text{(E)}", WRONG),
    ("(E) 12", "\\text{(E)}", RIGHT),
    ("\\text{(D) } 12", "\\text{(E)}", WRONG),
    # R9: words compare as words
    ("\\text{ellipse}", "\\text{ellipse}", RIGHT),
    ("ellipse", "\\text{ellipse}", RIGHT),
    ("\\text{circle}", "\\text{ellipse}", WRONG),
    ("\\text{Evelyn}", "\\text{Evelny}", WRONG),
    # R11: rounded irrationals are wrong, exact decimals of rationals are right
    ("0.3333333", "\\frac13", WRONG),
    ("0.6666667", "\\frac{2}{3}", WRONG),
    ("1.7320508", "\\sqrt{3}", WRONG),
    ("2.718282", "e", WRONG),
    ("0.125", "\\frac{1}{8}", RIGHT),
    ("\\frac{\\sqrt{2}}{2}", "0.7071068", WRONG),
    ("1.414214 \\cdot 2", "2\\sqrt{2}", WRONG),
    ("0.5 \\cdot 2\\sqrt{2}", "\\sqrt{2}", RIGHT),
    ("(0.5, 1)", "(\\frac{1}{2}, 1)", RIGHT),
    ("(0.333333, 1)", "(\\frac{1}{3}, 1)", WRONG),
    # R12 both ways: a free variable never equals a number
    ("5", "5x", WRONG),
    ("5x", "5", WRONG),
    ("5x", "5x", RIGHT),
    ("2e", "2e", RIGHT),
]


@pytest.mark.parametrize("pred, gold, right", CASES, ids=[f"{i}:{p}|{g}" for i, (p, g, _) in enumerate(CASES)])
def test_equivalence(pred, gold, right):
    """Each rule both ways: the equivalent forms right, the nearest wrong answers wrong (or undecided, which counts
    as wrong). Graded in-process (judge), then a sample of them through the real worker processes below."""
    verdict, rule = judge(extract_answer(resp(pred)), gold)
    assert (verdict == "right") == right, (verdict, rule)


def test_equivalence_through_the_worker_processes():
    """The same verdicts from r1_zero_reward (a real worker process): every 7th case."""
    for pred, gold, right in CASES[::7]:
        got = r1_zero_reward(resp(pred), gold)
        expected = float(right)
        assert (got["format_reward"], got["answer_reward"], got["reward"]) == (1.0, expected, expected), (pred, gold)
        assert (got["verdict"] == "right") == right and got["grader_rule"]


# (answer, gold, the rule that cannot decide)
UNDECIDED = [
    ("0.5\\%", "0.5", "R6"),  # a percentage of 0.5 or a proportion: the sign changes the value 100-fold
    ("0.5\\%", "\\frac{1}{2}", "R6"),  # the same, the gold a fraction
    ("\\frac{1}{2}\\%", "x", "R6"),  # a percent on one side of a non-number
    ("x^{" + "2" * 1200 + "}", "y", "R15"),  # too long to parse safely
    ("x", "\\frac{1}{", "R15"),  # math-verify cannot parse the gold
    ("\\sqrt[", "x", "R15"),  # nor the answer
]


@pytest.mark.parametrize("pred, gold, rule", UNDECIDED)
def test_undecided_is_its_own_verdict_and_counts_wrong(pred, gold, rule):
    verdict, why = judge(pred, gold)
    assert verdict == "undecided" and why.startswith(rule), (verdict, why)
    graded = grade(resp(pred), gold)
    assert graded["verdict"] == "undecided" and graded["reward"] == 0.0 == graded["answer_reward"]


def test_audit_verdicts_are_independent_graders():
    """math-verify alone takes the rounded \\sqrt{2} (its 6-digit rounding) and a string match does not see that
    0.5 is 1/2: both verdicts are kept beside ours, whatever ours is."""
    rounded = r1_zero_reward(resp("1.414214"), "\\sqrt{2}")
    assert rounded["reward"] == 0.0 and rounded["audit_math_verify"] == 1.0 and rounded["audit_string"] == 0.0
    half = r1_zero_reward(resp("0.5"), "\\frac{1}{2}")
    assert half["reward"] == 1.0 and half["audit_math_verify"] == 1.0 and half["audit_string"] == 0.0
    same = r1_zero_reward(resp("\\boxed{\\text{Navin}}"), "\\text{Navin}")
    assert same["audit_string"] == 1.0 and same["audit_math_verify"] == 1.0
    unformatted = r1_zero_reward("the answer is 5", "5")
    assert unformatted["audit_math_verify"] is None and unformatted["audit_string"] is None
    assert unformatted["verdict"] == "wrong"
    empty = r1_zero_reward(resp(""), "5")
    assert empty["verdict"] == "wrong" and empty["audit_string"] is None and empty["audit_math_verify"] is None


def test_grader_version_hashes_the_rules_and_math_verify(monkeypatch, tmp_path):
    version = grader_version()
    assert len(version) == 12 and int(version, 16) >= 0
    assert grader_version() == version
    monkeypatch.setattr("importlib.metadata.version", lambda package: "9.9.9")
    assert grader._grader_version.__wrapped__() != version  # another math-verify: another version
    monkeypatch.undo()
    edited = tmp_path / "grader.py"
    edited.write_text(Path(grader.__file__).read_text().replace("R10. Numbers", "R10b. Numbers"))
    monkeypatch.setattr(grader, "__file__", str(edited))
    assert grader._grader_version.__wrapped__() != version  # another rules table: another version


# (response, ground truth, format_reward, answer_reward)
FORMAT_CASES = [
    ("2 + 2 = 4 </think> <answer> 4 </answer>", "4", 1.0, 1.0),
    ("</think> <answer>4</answer>", "4", 1.0, 1.0),
    ("2 + 2 = 4 </think> <answer> 5 </answer>", "4", 1.0, 0.0),
    ("2 + 2 = 4 </think><answer> 4 </answer>", "4", 0.0, 0.0),  # no space: not the r1_zero format
    ("2 + 2 = 4 <answer> 4 </answer>", "4", 0.0, 0.0),
    ("2 + 2 = 4 </think> <answer> 4", "4", 0.0, 0.0),  # unterminated
    ("2 + 2 = 4 </think> 4", "4", 0.0, 0.0),
    ("The answer is 4.", "4", 0.0, 0.0),
    ("", "4", 0.0, 0.0),
    ("</answer> 4 </think> <answer> 4 </answer>", "4", 1.0, 1.0),  # a stray closing tag earlier
    ("a </think> <answer> 4 </answer> trailing text", "4", 1.0, 1.0),
    ("a </think> <answer>  </answer>", "4", 1.0, 0.0),  # empty answer
    ("a </think> <answer> 4 </answer>", ["5", "4"], 1.0, 1.0),  # any of several truths
    ("a </think> <answer> 4 </answer>", ["5", "6"], 1.0, 0.0),
    ("a </think> <answer> \\frac{1}{2} </answer>", ["0.5"], 1.0, 1.0),
]


@pytest.mark.parametrize("response, gold, fmt, ans", FORMAT_CASES)
def test_format_and_answer_rewards(response, gold, fmt, ans):
    got = r1_zero_reward(response, gold)
    assert {k: got[k] for k in ("format_reward", "answer_reward", "reward")} == {
        "format_reward": fmt,
        "answer_reward": ans,
        "reward": float(fmt and ans),
    }
    assert got["verdict"] in (("right",) if ans else ("wrong", "undecided"))


def test_extract_answer():
    assert extract_answer("x </think> <answer> 7 </answer>") == " 7 "
    assert extract_answer("x </think> <answer> so \\boxed{7} </answer>") == "7"
    assert extract_answer("x </think> <answer> 7") is None


PATHOLOGICAL = [
    "9^{9^{9^{9}}}",  # a power tower: sympy would evaluate it forever
    "(x+1)^{100000}",  # huge expansion
    "\\boxed{" + "{" * 3000,  # unbalanced nesting
    "1" * 200_000,  # a very long number
]


def test_pathological_answers_are_bounded_and_wrong():
    t0 = time.monotonic()
    for answer in PATHOLOGICAL:
        assert r1_zero_reward(resp(answer), "5", timeout_s=1.0)["reward"] == 0.0
    assert time.monotonic() - t0 < 4 * 3.0


def test_garbage_is_fast():
    junk = "".join(chr(33 + (i * 7919) % 90) for i in range(50_000))
    t0 = time.monotonic()
    assert r1_zero_reward(junk, "5")["reward"] == 0.0
    assert r1_zero_reward(resp(junk), "5")["reward"] == 0.0
    assert time.monotonic() - t0 < 5


def test_bounded_from_a_thread_too():
    out = {}

    def run():
        t0 = time.monotonic()
        out["reward"] = r1_zero_reward(resp("9^{9^{9^{9}}}"), "5", timeout_s=1.0)
        out["seconds"] = time.monotonic() - t0
        out["right"] = r1_zero_reward(resp("\\frac{1}{2}"), "0.5", timeout_s=1.0)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out["reward"]["reward"] == 0.0 and out["seconds"] < 10
    assert out["right"]["reward"] == 1.0


def test_pool_grades_in_order_and_counts_timeouts():
    pool = GraderPool(2, timeout_s=1.0)
    try:
        # (x+1)^1000 vs x^1000+1: sympy expands for seconds (interruptible Python code).
        responses = [resp(str(i)) for i in range(20)] + [resp("(x+1)^{1000}"), "no format", resp("x^2-1")]
        truths = [str(i) if i % 3 else "-1" for i in range(20)] + ["x^{1000}+1", "1", "(x-1)(x+1)"]
        rewards, problems = pool.grade(responses, truths)
        assert [r["reward"] for r in rewards[:20]] == [0.0 if i % 3 == 0 else 1.0 for i in range(20)]
        assert {k: rewards[20][k] for k in ("format_reward", "answer_reward", "reward", "verdict")} == {
            "format_reward": 1.0,
            "answer_reward": 0.0,
            "reward": 0.0,
            "verdict": "undecided",  # a timeout is never a confident verdict
        }
        assert all(r["audit_string"] in (0.0, 1.0) for r in rewards[:20])  # the audit comes back from the workers
        assert rewards[21]["format_reward"] == 0.0 and rewards[22]["reward"] == 1.0
        assert problems.count("timeout") == 1 and "error" not in problems
        # the pool still works after a timeout
        assert pool.grade([resp("3")], ["3"])[0][0]["reward"] == 1.0
    finally:
        pool.close()


def test_pool_replaces_a_worker_that_stops_responding_and_retries_its_case():
    """A worker that does not answer in time (stuck in C code, where no timer reaches it, or starved of CPU;
    here stopped with SIGSTOP) is killed and replaced, and its case is graded again on the new worker."""
    pool = GraderPool(1, timeout_s=0.5)
    try:
        pool.grade([resp("1")], ["1"])  # the worker is ready
        stuck = pool._workers[0].proc
        os.kill(stuck.pid, signal.SIGSTOP)
        rewards, problems = pool.grade([resp("2")], ["2"])
        assert rewards[0]["reward"] == 1.0 and problems == [None]
        assert stuck.poll() is not None and pool._workers[0].proc is not stuck
    finally:
        pool.close()


def test_a_case_that_overruns_twice_counts_as_a_timeout():
    """Every worker is stopped as soon as it takes the case (a fresh worker's first sympy case takes ~0.3 s, and
    the test stops it within a few ms): the case overruns on the first worker and on the retry, and only then is it
    graded wrong (right otherwise), marked 'timeout'."""
    pool = GraderPool(1, timeout_s=0.5)
    stopped: set[int] = set()
    done = threading.Event()

    def stop_busy_workers() -> None:
        while not done.is_set():
            for w in list(pool._workers):
                if w.task is not None and w.proc.pid not in stopped:
                    os.kill(w.proc.pid, signal.SIGSTOP)
                    stopped.add(w.proc.pid)
            time.sleep(0.001)

    try:
        pool.grade([resp("1")], ["1"])  # the first worker is ready before the stopper starts
        threading.Thread(target=stop_busy_workers, daemon=True).start()
        rewards, problems = pool.grade([resp("(x+1)^{60}")], ["(1+x)^{60}"])
        assert (rewards[0]["format_reward"], rewards[0]["reward"], rewards[0]["verdict"]) == (1.0, 0.0, "undecided")
        assert problems == ["timeout"] and len(stopped) >= 2
    finally:
        done.set()
        pool.close()


def test_deadline_starts_when_the_worker_is_ready():
    """A bound shorter than a fresh worker's start (importing sympy) must not time out every case."""
    pool = GraderPool(2, timeout_s=0.2)
    try:
        rewards, problems = pool.grade([resp("\\frac{1}{2}"), resp("3")], ["0.5", "4"])
        assert [r["reward"] for r in rewards] == [1.0, 0.0] and problems == [None, None]
    finally:
        pool.close()


def test_a_worker_killed_mid_case_is_replaced_and_the_case_retried():
    pool = GraderPool(1, timeout_s=30.0)
    try:
        pool.grade([resp("1")], ["1"])
        first = pool._workers[0].proc
        os.kill(first.pid, signal.SIGSTOP)  # it takes the case but cannot answer before it is killed (as by OOM)
        threading.Timer(0.5, lambda: os.kill(first.pid, signal.SIGKILL)).start()
        rewards, problems = pool.grade([resp("7"), resp("8")], ["7", "9"])
        assert [r["reward"] for r in rewards] == [1.0, 0.0] and problems == [None, None]
        assert pool._workers[0].proc is not first
    finally:
        pool.close()


def test_workers_that_cannot_start_raise_never_reward_zero(monkeypatch):
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")  # every new interpreter dies at start-up
    with pytest.raises(GraderError, match="could not start"):
        pool = GraderPool(1, timeout_s=1.0)
        pool.grade([resp("1")], ["1"])


def test_several_answer_blocks_grade_the_last():
    response = "</think> <answer>3</answer> wait, I made a mistake <answer>\\boxed{4}</answer>"
    assert r1_zero_reward(response, "4")["reward"] == 1.0
    assert r1_zero_reward(response, "3")["reward"] == 0.0
    assert extract_answer("</think> <answer>5</answer> and then <answer>6") == "5"  # the last complete block


MATH500 = REPO.parent / "shared" / "data" / "math500" / "test.jsonl"


@pytest.mark.skipif(not MATH500.exists(), reason="team data kit not beside the checkout")
def test_plain_script_without_main_guard_grades_all_math500_references(tmp_path):
    """r1_zero_reward from a script with no `if __name__ == "__main__":` guard: every MATH-500 reference
    solution's boxed answer is right against its `answer` (this once returned 0 for all 500, silently)."""
    script = tmp_path / "grade_refs.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from evaluator.grader import r1_zero_reward\n"
        "from shared.data import last_boxed\n"
        f"rows = [json.loads(line) for line in open({str(MATH500)!r})]\n"
        "right = sum(\n"
        "    r1_zero_reward('</think> <answer>' + last_boxed(r['solution']) + '</answer>', r['answer'])['reward']\n"
        "    for r in rows\n"
        ")\n"
        "print(f'{int(right)}/{len(rows)}')\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "500/500", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
