"""Math answer grading for r1_zero responses: written rules on top of math-verify, an audit, never a hang.

Pipeline for one (response, ground truth):
1. Format: `</think> <answer>` followed later by `</answer>`; the answer is the text between the tags
   (the last \\boxed{} inside them when there is one).
2. The rules below, in order; the first that decides gives the verdict. What no rule decides goes to
   math-verify (sympy) on the normalised texts: its parse failing on either side is `undecided`.
3. The verdict is "right", "wrong" or "undecided"; undecided counts as wrong in every accuracy, and its rate
   is reported (grader/undecided_rate). Two independent audit graders run on the same answer: math-verify
   alone (its own parse of the answer text, its defaults) and a plain normalised string match.

Rules (what counts as the same answer). Sources: [MATH] the MATH / MATH-500 answer conventions (gold answers
of data/math500, gsm8k, aime24); [MV#n] a false positive or negative reported in huggingface/Math-Verify's
issue n; [CS336] the CS336 reference grader's normalisations; [TeX] LaTeX's own meaning.

R1.  Presentation is not content: $, \\( \\), \\[ \\], \\left/\\right/\\big, \\, \\! \\; \\quad, \\displaystyle, \\dfrac
     and \\tfrac (= \\frac), a trailing period, unicode minus/fractions/roots/powers/symbols
     Why: they change how an answer looks, not its value. Source: [MATH], [CS336].
R2.  \\text{}, \\mbox{}, \\mathrm{}, \\textbf{} wrap words: a wrapped word is read as a word
     Why: text mode is prose, not a product of variables. Source: [TeX], [MV#37].
R3.  Thousands separators in a number (1,000; 1{,}000; 1\\,000; MATH's 1,\\!000) go; a comma elsewhere separates list
     items (-2,1 is a list)
     Why: MATH writes thousands so; a list of roots is not a number. Source: [MATH], [CS336].
R4.  A unit is a word after one numeric term (5 cm, 5 \\text{ hours}, \\$5 = 5 dollars, 30^\\circ = 30 degrees, 6
     cookies); a single letter is a unit only inside a text wrapper. Units on both sides must be the same unit
     (singular/plural and the usual abbreviations are the same); a unit on one side only is dropped
     Why: MATH golds omit units the question fixes; 5 hours is not 5 minutes; in math mode 2m is 2 times m. Source:
     [MATH], [TeX].
R5.  Words that are arithmetic or prose (or, and, times, factorial, tenths, is, ...) are never a unit
     Why: "5 or 6", "10 factorial" do not state the number. Source: [MATH].
R6.  A percent sign is part of the value's kind: p% against a gold g without one is right when p/100 = g, or when p = g
     and abs(g) > 1 (the gold is a percentage written bare, GSM8K/MATH 'what percent'); p = g with abs(g) <= 1 is
     undecided (a proportion or a percentage: the sign changes the value 100-fold). A gold g% takes p = g or p = g/100.
     A percent on one side and a unit on the other is wrong
     Why: a percent is not silently dropped; the rules cannot know which the question asked. Source: [MATH], issue 21.
R7.  An equation `name = value` (x = 5, \\theta = ..., AB = 5, f(x) = ...) answers a gold value by its right side; any
     other equation (12 = 5, x + y = 10) against a value is wrong
     Why: math-verify compares the right side alone. Source: [MV#14], [MV#60].
R8.  A gold that is a choice letter (A-E, (B), \\text{(B)}) takes only that letter, any case
     Why: the option's content cannot be checked without the question. Source: [MATH].
R9.  Word answers (text-wrapped on either side, or letter strings longer than 3) compare as words, case-insensitive
     Why: Navin is not Nivan although the products of their letters are equal. Source: [MATH], [MV#37].
R10. Numbers (integers, decimals, scientific notation, a/b, \\frac{a}{b}, repeating decimals 0.\\overline{3}) compare
     exactly as rationals
     Why: 1000000001 is not 1000000000; a decimal is the exact rational it writes. Source: [MATH], [MV#21].
R11. Beyond plain numbers, math-verify compares with floats rounded at 12 digits, not 6: a rounded irrational (1.414214
     for \\sqrt{2}, 3.141593 for \\pi, 0.3333333 for 1/3) is wrong
     Why: we cannot know the question asked to round; exact symbolic equality. Source: [MV#21], [MV#48], [MV#4].
R12. A bare letter in math mode is a variable: an expression with a free variable (3 + 2m, 2g, 9L) never equals a
     number, either way round
     Why: math-verify would drop the letter as a unit. Source: [TeX], [MV#41].
R13. An inequality in one variable is its interval (x > 3 = (3, \\infty)); a set \\{...\\} is never a tuple or interval;
     an unordered list of answers (1, 2 = 2, 1) compares as a set
     Why: MATH 'enter all solutions separated by commas'; sympy compares only elements. Source: [MATH], [MV#10],
     [MV#71].
R14. Everything else is math-verify's symbolic equality (fractions, roots, \\pi, intervals, tuples, matrices, algebraic
     identities, equations) with its units stripping off (R4 decides units)
     Why: sympy decides equality better than strings. Source: [MV].
R15. Undecided: math-verify cannot parse one side, an answer too long (over 1,000 characters) or a power too large to
     evaluate, R6's ambiguity
     Why: a confident wrong verdict is worse than a counted 'undecided'. Source: issue 21.

Bounding: math-verify's own timeout uses signal.alarm, which only works in a main thread. We switch
it off and bound every grade ourselves: in a process's main thread with an interval timer, and
always, in `GraderPool`, by killing a worker that overruns (sympy can sit in C code that no signal
interrupts). A grade that times out is retried once, then counted (a grader 'timeout'); the audit has a bound
of its own (an audit that times out has no verdict, None).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

from shared.data import ANSWER_RE, last_boxed

MAX_ANSWER_CHARS = 1000
"""Answers longer than this are not parsed symbolically (they are garbage or a proof, not an answer)."""

MAX_DEFAULT_WORKERS = 16
"""Grading workers when none is configured: each holds sympy (~100 MB); 16 grade 5,000 answers in seconds."""

WORKER_START_TIMEOUT_S = 120.0
"""A grading worker that has not imported sympy and math-verify by then is broken, not slow."""

MATH_VERIFY_FLOAT_ROUNDING = 6
"""math-verify's default float rounding: the audit's math-verify-alone grader runs with its defaults."""

EXACT_FLOAT_DIGITS = 12
"""R11: math-verify rounds floats at this many digits (its default, 6, takes 1.414214 for \\sqrt{2})."""

RIGHT, WRONG, UNDECIDED = "right", "wrong", "undecided"

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
_FORMAT_OPEN = "</think> <answer>"
_NO_ANSWER = {"verdict": WRONG, "grader_rule": "format", "audit_math_verify": None, "audit_string": None}
_ZERO = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0, **_NO_ANSWER}


def _formatted_wrong(verdict: str = UNDECIDED, rule: str = "grader failure") -> dict[str, Any]:
    """A formatted answer the grader could not judge (timeout, error): never a confident verdict."""
    return {
        "format_reward": 1.0,
        "answer_reward": 0.0,
        "reward": 0.0,
        **_NO_ANSWER,
        "verdict": verdict,
        "grader_rule": rule,
    }


class GradeTimeout(BaseException):
    """BaseException: math-verify and sympy catch Exception broadly and would swallow it."""


def grader_version() -> str:
    """Short hex hash of this module's source (the rules table and the code that applies it) and of the installed
    math-verify, latex2sympy2_extended and sympy: part of every result and of the evaluation-config id."""
    return _grader_version()


@lru_cache(maxsize=1)
def _grader_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256(Path(__file__).read_bytes())
    for package in ("math-verify", "latex2sympy2_extended", "sympy"):
        try:
            h.update(f"{package}=={version(package)}".encode())
        except PackageNotFoundError:
            h.update(f"{package} missing".encode())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Extraction


def extract_answer(response: str) -> str | None:
    """Answer text of a well-formatted response, else None. With several <answer> blocks the last complete
    one is the final answer (models restate and correct themselves)."""
    block = _answer_block(response)
    if block is None:
        return None
    boxed = last_boxed(block)
    return boxed if boxed is not None else block


def _answer_block(response: str) -> str | None:
    start = response.find(_FORMAT_OPEN)
    if start < 0:
        return None
    blocks = ANSWER_RE.findall(response, start + len(_FORMAT_OPEN) - len("<answer>"))
    return blocks[-1] if blocks else None


# --------------------------------------------------------------------------------------------------
# Normalisation (string level, cheap): R1-R6, R13's intervals


_TEXT_COMMANDS = r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)"
_TEXT_WRAPPER = re.compile(_TEXT_COMMANDS + r"\s*\{([^{}]*)\}")
_WORD_WRAPPER = re.compile(_TEXT_COMMANDS + r"\s*\{\s*[A-Za-z][A-Za-z ]*\}")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_THOUSANDS_BANG = re.compile(r"(\d),\\!\s*(?=\d{3}(?!\d))")
"""MATH writes thousands as 11,\\!111 (a list is "11, 111"): the comma before \\! is a separator."""
_THOUSANDS_LATEX = re.compile(r"^[-+]?\d{1,3}(?:\{,\}\d{3})+(?:\.\d+)?$")
_SPACED_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:(?:\\,|\\ |~|\s)\d{3})+(?:\.\d+)?$")
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\^\{\\text\{o\}\})$")
_PERCENT = re.compile(r"\s*(?:\\?%|\\percent|\s+percent)$")
_DOLLAR = re.compile(r"^US\\?\$\s*|^\\\$\s*|^\\textdollar\s*|\s*\\\$$")
_FRAC_ARG = r"(?:\{[^{}]+\}|\s*\d)"
_NUM_TERM = (
    rf"[-+]?(?:\d[\d,]*(?:\.\d+)?(?:\\pi|\\sqrt\{{\d+\}})?|\d+/\d+|\d*\\frac{_FRAC_ARG}{_FRAC_ARG}"
    r"|\d*\\sqrt\{[^{}]+\}|\d*\\pi)"
)
_UNIT_AFTER_NUMBER = re.compile(
    rf"^({_NUM_TERM})\s*(?:{_TEXT_COMMANDS}\s*\{{\s*([A-Za-z][A-Za-z ]*?)\s*\}}"
    r"|([A-Za-z]{2,}(?:\s+[A-Za-z]+){0,2}))"
    r"\s*(\^\s*\{?[23]\}?)?\.?$"
)
"""R4: one numeric term and a unit: words in a text wrapper (a single letter too), or plain words of 2+ letters."""
_HUGE_POWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\{?\s*\d{5,}|\*\*\s*\(?[^)]*\*\*")
"""A power tower or a huge exponent makes sympy compute in C for minutes, where no timer can stop it."""
_CHOICE = re.compile(r"^\(?([A-Ea-e])\)?$")
_CHOICE_LEAD = re.compile(r"^\s*\(([A-Ea-e])\)\s")
"""R8: an option letter in parentheses, then the option's content: "(C) 12"."""
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
_SIMPLE_FRACTION = re.compile(r"^([-+]?)\\frac\{?([-+]?\d+)\}?\{?(\d+)\}?$|^([-+]?)(\d+)/(\d+)$")
_WORDS = re.compile(r"^[A-Za-z]+(?: [A-Za-z]+)*$")
_FREE_LETTER = re.compile(r"[a-df-hj-zA-Z]")
"""R12: a letter that is a variable, not e or i (constants), once LaTeX commands are removed."""
_NAMED_EQUATION = re.compile(r"^\s*(?:\\[a-zA-Z]+|[a-zA-Z]+)(?:_\{?\w+\}?)?'*(?:\([^()=]*\))?\s*=([^=]+)$")
"""R7: `name = value`: a variable, a Greek letter, a segment (AB), subscripted or primed, or f(x)."""
_NOT_A_UNIT = frozenset(
    re.findall(
        r"\w+",
        "and or to through minus plus over divided by times squared cubed pi sqrt dozen hundred thousand million "
        "billion half percent is are was were a an the not in of factorial halves thirds quarters fourths fifths "
        "tenths hundredths thousandths",
    )
)
"""R5: words of arithmetic or prose: after a number they change or hedge it, they do not name what it counts."""
_UNIT_ALIASES = {
    "centimeter": "cm", "centimetre": "cm", "millimeter": "mm", "millimetre": "mm", "kilometer": "km",
    "kilometre": "km", "meter": "m", "metre": "m", "inch": "in", "foot": "ft", "feet": "ft", "yard": "yd",
    "mile": "mi", "gram": "g", "kilogram": "kg", "milligram": "mg", "pound": "lb", "ounce": "oz", "liter": "l",
    "litre": "l", "milliliter": "ml", "millilitre": "ml", "second": "s", "sec": "s", "minute": "min",
    "hour": "h", "hr": "h", "deg": "degree",
}  # fmt: skip
"""R4: a unit's name and its usual abbreviation are the same unit."""

_UNICODE_FRACTIONS = {
    "\u00bd": (1, 2), "\u2153": (1, 3), "\u2154": (2, 3), "\u00bc": (1, 4), "\u00be": (3, 4), "\u2155": (1, 5),
    "\u2156": (2, 5), "\u2157": (3, 5), "\u2158": (4, 5), "\u2159": (1, 6), "\u215a": (5, 6), "\u215b": (1, 8),
    "\u215c": (3, 8), "\u215d": (5, 8), "\u215e": (7, 8),
}  # fmt: skip
_UNICODE_SYMBOLS = {
    "\u2212": "-", "\u2013": "-", "\u00b0": "^\\circ", "\u03c0": "\\pi", "\u221e": "\\infty", "\u00d7": "\\times ",
    "\u22c5": "\\cdot ", "\u00b7": "\\cdot ", "\u00f7": "\\div ", "\u2264": "\\le ", "\u2265": "\\ge ",
    "\u2260": "\\ne ", "\u222a": "\\cup ", "\u2229": "\\cap ",
}  # fmt: skip
_SUPERSCRIPTS = str.maketrans("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207b", "0123456789-")
_UNICODE_ROOT = re.compile("([\u221a\u221b])\\s*(\\d+(?:\\.\\d+)?|[a-zA-Z]|\\([^()]*\\)|\\{[^{}]*\\})")
_UNICODE_POWER = re.compile("([\u2070\u00b9\u00b2\u00b3\u2074-\u2079\u207b]+)")
_REPEATING = re.compile(r"^([-+]?)(\d*)\.(\d*)\\overline\{(\d+)\}$")
_VARIABLE = r"[a-zA-Z]"
_BOUND = r"(-?\s*(?:\\infty|\d+(?:\.\d+)?|\\frac\{[^{}]+\}\{[^{}]+\}|\\sqrt\{[^{}]+\}|\\pi|[\d.]+/[\d.]+))"
_LESS = r"(<|\\lt|\\le|\\leq|\\leqslant)"
_MORE = r"(>|\\gt|\\ge|\\geq|\\geqslant)"
_ONE_SIDED = re.compile(rf"^{_VARIABLE}\s*(?:{_LESS}|{_MORE})\s*{_BOUND}$")
_TWO_SIDED = re.compile(rf"^{_BOUND}\s*{_LESS}\s*{_VARIABLE}\s*{_LESS}\s*{_BOUND}$")
_CLOSED = ("\\le", "\\leq", "\\leqslant", "\\ge", "\\geq", "\\geqslant")


def _rewrite_unicode(s: str) -> str:
    """Unicode math as LaTeX: \u00bd -> \\frac{1}{2}, \u221a2 -> \\sqrt{2}, x\u00b2 -> x^{2}, \u2264 -> \\le ..."""
    for ch, (num, den) in _UNICODE_FRACTIONS.items():
        s = re.sub(rf"(\d)\s*{ch}", rf"\1+\\frac{{{num}}}{{{den}}}", s)  # 1\u00bd is one and a half
        s = s.replace(ch, f"\\frac{{{num}}}{{{den}}}")
    s = _UNICODE_ROOT.sub(
        lambda m: ("\\sqrt{" if m.group(1) == "\u221a" else "\\sqrt[3]{") + m.group(2).strip("(){}") + "}", s
    )
    s = _UNICODE_POWER.sub(lambda m: "^{" + m.group(1).translate(_SUPERSCRIPTS) + "}", s)
    for ch, latex in _UNICODE_SYMBOLS.items():
        s = s.replace(ch, latex)
    return s


def _repeating_decimal(s: str) -> str:
    """0.1\\overline{6} -> \\frac{1}{6}: the exact value of a repeating decimal, as a fraction."""
    m = _REPEATING.match(s.replace(" ", ""))
    if not m:
        return s
    sign, whole, fixed, period = m.groups()
    value = (
        Fraction(int(whole or 0))
        + Fraction(int(fixed or 0), 10 ** len(fixed))
        + Fraction(int(period), 10 ** len(fixed) * (10 ** len(period) - 1))
    )
    value = -value if sign == "-" else value
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}" if value.denominator != 1 else str(value.numerator)


def _inequality_as_interval(s: str) -> str:
    """x > 3 -> (3,\\infty), x \\le -1 -> (-\\infty,-1], 2 < x \\le 5 -> (2,5]: one variable, one or two bounds."""
    m = _ONE_SIDED.match(s)
    if m:
        less, more, bound = m.groups()
        bound = bound.replace(" ", "")
        if less:
            return "(-\\infty," + bound + ("]" if less in _CLOSED else ")")
        return ("[" if more in _CLOSED else "(") + bound + ",\\infty)"
    m = _TWO_SIDED.match(s)
    if m:
        low, first, second, high = m.groups()
        opening, closing = "[" if first in _CLOSED else "(", "]" if second in _CLOSED else ")"
        return opening + low.replace(" ", "") + "," + high.replace(" ", "") + closing
    return s


def _unit_name(words: str, power: str | None) -> str | None:
    """R4/R5: the canonical name of a unit ("hours" -> "h", "square cm" -> "cm2"), None for words that are not one."""
    names = words.lower().split()
    if not names or any(w in _NOT_A_UNIT for w in names):
        return None
    exponent = (power or "").strip("^{} ")
    if names[0] in ("square", "cubic") and len(names) > 1:
        exponent, names = ("2" if names[0] == "square" else "3"), names[1:]
    singular = []
    for name in names:
        if name.endswith(("ches", "shes", "sses", "xes")):
            name = name[:-2]  # noqa: PLW2901 - the word, made singular
        elif name.endswith("s") and not name.endswith("ss") and len(name) > 2:
            name = name[:-1]  # noqa: PLW2901
        singular.append(_UNIT_ALIASES.get(name, name))
    return " ".join(singular) + exponent


class Normalised:
    """An answer after R1-R6: its text, the unit it carried (R4), whether it carried a percent sign (R6) and
    whether it wrapped words in \\text (R9)."""

    __slots__ = ("percent", "text", "unit", "wordy")

    def __init__(self, text: str, unit: str | None, percent: bool, wordy: bool):
        self.text, self.unit, self.percent, self.wordy = text, unit, percent, wordy


def _strip_presentation(answer: str) -> str:
    """R1 and R3's MATH-specific separators: what changes how an answer looks, not its value."""
    s = _THOUSANDS_BANG.sub(r"\1", _rewrite_unicode(answer.strip()))
    if "\\left" in s or "\\right" in s or "\\big" in s.lower():
        s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?=[\s(\[\]{}|.)\\])\s*\\?\.?", "", s)
    s = re.sub(r"\\,|\\ |~|\s", "", s) if _SPACED_THOUSANDS.match(s) else re.sub(r"(?<!\\)\\[,!;:> ]|\\q?quad", " ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = s.strip().strip("$").strip()
    s = re.sub(r"^\\\[|\\\]$|^\\\(|\\\)$", "", s).strip()
    return re.sub(r"\s+", " ", s).rstrip(".").strip()


def normalise(answer: str) -> Normalised:
    s = _strip_presentation(answer)
    wordy = bool(_WORD_WRAPPER.search(s))
    percent, unit = bool(_PERCENT.search(s)), None
    s = _PERCENT.sub("", s)
    if _DEGREES.search(s):
        s, unit = _DEGREES.sub("", s), "degree"
    if _DOLLAR.search(s):
        s, unit = _DOLLAR.sub("", s).strip(), "dollar"
    m = _UNIT_AFTER_NUMBER.match(s)
    if m and unit is None:
        name = _unit_name(m.group(2) or m.group(3), m.group(4))
        if name is not None:
            s, unit = m.group(1), _UNIT_ALIASES.get(name, name)
            if unit == "percent":
                percent, unit = True, None
    unwrapped = _TEXT_WRAPPER.sub(lambda w: w.group(1), s).strip()
    if _CHOICE.match(unwrapped) or _WORDS.match(unwrapped):
        s = unwrapped  # "\text{(B)}", "\text{Monday}": the words are the answer
    s = _inequality_as_interval(_repeating_decimal(s.strip().rstrip(".").strip()))
    if _THOUSANDS.match(s) or _THOUSANDS_LATEX.match(s):
        s = s.replace("{,}", "").replace(",", "")
    choice = _CHOICE.match(s)
    if choice:
        s = choice.group(1).upper()
    return Normalised(s, unit, percent, wordy)


def normalize(answer: str) -> str:
    """The normalised text of an answer (what maj@k votes on)."""
    return normalise(answer).text


def _as_fraction(s: str) -> Fraction | None:
    """R10: the exact value of a plain number (integer, decimal, scientific, a/b, \\frac{a}{b}), else None."""
    s = s.replace(" ", "")
    if _NUMBER.match(s):
        return Fraction(s)
    m = _SIMPLE_FRACTION.match(s)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(3) else (m.group(4), m.group(5), m.group(6))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def vote_key(answer: str) -> str | None:
    """What maj@k counts votes by: the answer after the grader's normalisation, a number by its exact value
    ("0.5", "\\frac{1}{2}" and "1/2" vote together); None for an empty answer (no vote)."""
    n = normalise(answer)
    if not n.text:
        return None
    number = _as_fraction(n.text)
    key = str(number) if number is not None else n.text
    return key + ("%" if n.percent else "")


# --------------------------------------------------------------------------------------------------
# Judging: R4-R15


@lru_cache(maxsize=1)
def _math_verify():
    """math-verify, imported at the first grade (seconds, for sympy), its own log lines off."""
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    return math_verify


@lru_cache(maxsize=1)
def _backbone_config():
    """math-verify's LaTeX parse with its units stripping off: R4 decides units (its own would read 2m as 2)."""
    mv = _math_verify()
    from math_verify.parser import NormalizationConfig

    normalization = NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
    )
    return [mv.LatexExtractionConfig(normalization_config=normalization)]


@lru_cache(maxsize=4096)
def _parse_backbone(text: str) -> tuple:
    """Cached: a gold answer is parsed once per worker, not once per sample."""
    return tuple(
        _math_verify().parse(text if text.startswith("$") else f"${text}$", _backbone_config(), parsing_timeout=None)
    )


def _parsed(parsed: tuple) -> bool:
    """Did math-verify read a mathematical object? (Its fallback returns the unparsed text alone.)"""
    return len(parsed) > 1 or (len(parsed) == 1 and not isinstance(parsed[0], str))


def _symbolic(pred: str, gold: str) -> tuple[str, str]:
    """R14/R15: math-verify on the normalised texts, floats rounded at EXACT_FLOAT_DIGITS (R11)."""
    gold_parsed, pred_parsed = _parse_backbone(gold), _parse_backbone(pred)
    if not _parsed(gold_parsed) or not _parsed(pred_parsed):
        return UNDECIDED, "R15 math-verify cannot parse " + ("the gold" if not _parsed(gold_parsed) else "the answer")
    equal = _verify(gold_parsed, pred_parsed, EXACT_FLOAT_DIGITS)
    return (RIGHT if equal else WRONG), "R14 math-verify"


MAX_VERIFY_MEMO = 65536
"""Compared pairs a worker remembers (then it forgets them all): n samples of a problem often give one answer."""

_VERIFIED: dict[tuple, bool] = {}


def _verify(gold: tuple, pred: tuple, float_rounding: int) -> bool:
    """math-verify's verify, memoised per worker: a pure function of the parsed pair. Its float_rounding only acts
    where a Float atom is present (math_verify.grader.sympy_numeric_eq), so a pair without one has one entry for
    the rules' rounding and the audit's: the audit does not compare again what the rules just compared."""
    floats = any(not isinstance(x, str) and x.has(_sympy_float()) for x in gold + pred)
    key = (gold, pred, float_rounding if floats else None)
    try:
        return _VERIFIED[key]
    except KeyError:
        pass
    except TypeError:  # unhashable (a mutable matrix): compared every time
        key = None
    equal = bool(_math_verify().verify(list(gold), list(pred), float_rounding=float_rounding, timeout_seconds=None))
    if key is not None:
        if len(_VERIFIED) >= MAX_VERIFY_MEMO:
            _VERIFIED.clear()
        _VERIFIED[key] = equal
    return equal


def _sympy_float():
    import sympy

    return sympy.Float


def _compare_numbers(p: Fraction, g: Fraction, p_percent: bool, g_percent: bool) -> tuple[str, str]:
    """R10 exactly, with R6's percent readings."""
    if p_percent == g_percent:
        return (RIGHT if p == g else WRONG), "R10 exact numbers"
    if p_percent:
        if p / 100 == g:
            return RIGHT, "R6 percent as a proportion"
        if p == g:
            return (RIGHT, "R6 percentage written bare") if abs(g) > 1 else (UNDECIDED, "R6 percent or proportion")
        return WRONG, "R6 percent"
    return (RIGHT if p in (g, g / 100) else WRONG), "R6 percent in the gold"


def _equation_value(answer: Normalised) -> Normalised | None:
    """R7: the right side of `name = value`, normalised (a percent sign the whole carried stays); None for any other
    equation."""
    m = _NAMED_EQUATION.match(answer.text)
    if not m:
        return None
    value = normalise(m.group(1))
    value.percent = value.percent or answer.percent
    value.unit = value.unit or answer.unit
    value.wordy = value.wordy or answer.wordy
    return value


def _has_free_letter(text: str) -> bool:
    return bool(_FREE_LETTER.search(re.sub(r"\\[a-zA-Z]+", "", text)))


def judge(pred: str, gold: str) -> tuple[str, str]:
    """(verdict, the rule that decided): is the extracted answer `pred` the same answer as the ground truth?"""
    p, g = normalise(pred), normalise(gold)
    if not g.text:
        return UNDECIDED, "R15 empty gold"
    if not p.text:
        return WRONG, "empty answer"
    if p.text.count("=") == 1 and "=" not in g.text:
        p = _equation_value(p)
        if p is None:
            return WRONG, "R7 an equation is not a value"
    elif g.text.count("=") == 1 and "=" not in p.text:
        g = _equation_value(g) or g
    if p.unit and g.unit and p.unit != g.unit:
        return WRONG, "R4 units differ"
    if (p.percent and g.unit) or (g.percent and p.unit):
        return WRONG, "R6 percent against a unit"
    pt, gt = p.text, g.text
    if len(gt) == 1 and _CHOICE.match(gt):
        lead = _CHOICE_LEAD.match(_TEXT_WRAPPER.sub(lambda m: m.group(1), pt))
        return (RIGHT if (lead.group(1) if lead else pt).upper() == gt else WRONG), "R8 choice letter"
    if _WORDS.match(pt) and _WORDS.match(gt) and (p.wordy or g.wordy or min(len(pt), len(gt)) > 3):
        return (RIGHT if pt.lower().split() == gt.lower().split() else WRONG), "R9 words"
    pn, gn = _as_fraction(pt), _as_fraction(gt)
    if pn is not None and gn is not None:
        return _compare_numbers(pn, gn, p.percent, g.percent)
    if p.percent != g.percent:
        return UNDECIDED, "R6 percent on one side of a non-number"
    if pt == gt:
        return RIGHT, "R1 same text"
    if (gn is not None and _has_free_letter(pt)) or (pn is not None and _has_free_letter(gt)):
        return WRONG, "R12 a variable is not a number"
    if max(len(pt), len(gt)) > MAX_ANSWER_CHARS or _HUGE_POWER.search(pt) or _HUGE_POWER.search(gt):
        return UNDECIDED, "R15 too large to compare"
    if (pt.startswith("\\{") != gt.startswith("\\{")) and (pt[:1] in "([" or gt[:1] in "(["):
        return WRONG, "R13 a set is not a tuple or interval"
    return _symbolic(pt, gt)


# --------------------------------------------------------------------------------------------------
# Audit graders: independent of the rules above


_PLAIN_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\displaystyle|\$|\s")


def plain_string(answer: str) -> str:
    """The plain normalised string the audit compares: wrappers, spacing, $ and case go, nothing else."""
    s = _TEXT_WRAPPER.sub(lambda m: m.group(1), answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    return _PLAIN_DROP.sub("", s).rstrip(".").lower()


def audit_string(answer: str | None, truths: list[str]) -> float | None:
    if answer is None or not answer.strip():
        return None
    mine = plain_string(answer)
    return float(any(mine == plain_string(str(t)) for t in truths))


@lru_cache(maxsize=4096)
def _parse_default(text: str) -> tuple:
    return tuple(_math_verify().parse(text, parsing_timeout=None))


def audit_math_verify(answer_block: str | None, truths: list[str]) -> float | None:
    """math-verify alone, with its defaults: its own extraction from the <answer> text, parse and verify."""
    if answer_block is None or not answer_block.strip():
        return None
    # The answer block in math mode unless it marks its own (math-verify extracts LaTeX only from $, \[ or \boxed).
    delimited = any(mark in answer_block for mark in ("$", "\\[", "\\(", "\\boxed"))
    pred = _parse_default(answer_block if delimited else f"${answer_block.strip()}$")
    golds = [_parse_default(f"${t}$") for t in truths]
    if not _parsed(pred) or not any(_parsed(g) for g in golds):
        return None
    return float(any(_parsed(g) and _verify(g, pred, MATH_VERIFY_FLOAT_ROUNDING) for g in golds))


# --------------------------------------------------------------------------------------------------
# One grade


def _verdict_of(answer: str, truths: list[str]) -> tuple[str, str]:
    """Right if any truth is right; else undecided if any is; else wrong."""
    verdicts = [judge(answer, str(t)) for t in truths]
    for wanted in (RIGHT, UNDECIDED):
        for verdict, rule in verdicts:
            if verdict == wanted:
                return verdict, rule
    return verdicts[0]


def grade(response: str, ground_truth: str | list[str]) -> dict[str, Any]:
    """Unbounded grade with its audit; callers bound it (see r1_zero_reward, GraderPool)."""
    rewards = grade_rules(response, ground_truth)
    if rewards["format_reward"]:
        rewards.update(grade_audit(response, ground_truth))
    return rewards


def grade_rules(response: str, ground_truth: str | list[str]) -> dict[str, Any]:
    """{format_reward, answer_reward, reward, verdict, grader_rule}, the audit verdicts None."""
    answer = extract_answer(response)
    if answer is None:
        return dict(_ZERO)
    truths = ground_truth if isinstance(ground_truth, list) else [ground_truth]
    verdict, rule = _verdict_of(answer, [str(t) for t in truths])
    right = float(verdict == RIGHT)
    return {"format_reward": 1.0, "answer_reward": right, "reward": right, **_NO_ANSWER, "verdict": verdict,
            "grader_rule": rule}  # fmt: skip


def grade_audit(response: str, ground_truth: str | list[str]) -> dict[str, float | None]:
    truths = [str(t) for t in (ground_truth if isinstance(ground_truth, list) else [ground_truth])]
    return {
        "audit_math_verify": audit_math_verify(_answer_block(response), truths),
        "audit_string": audit_string(extract_answer(response), truths),
    }


# --------------------------------------------------------------------------------------------------
# Bounded grading


@contextmanager
def _alarm(timeout_s: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise GradeTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _grade_in_main_thread(
    response: str, ground_truth, timeout_s: float, audit: bool = True
) -> tuple[dict[str, Any], str | None]:
    """(grade, None | 'timeout' | 'error'): the rules within `timeout_s`, then the audit within its own `timeout_s`
    (an audit that overruns or fails has no verdict: None, and the grade stands)."""
    if extract_answer(response) is None:
        return dict(_ZERO), None
    try:
        with _alarm(timeout_s):
            rewards = grade_rules(response, ground_truth)
    except GradeTimeout:
        return _formatted_wrong(rule="grader timeout"), "timeout"
    except Exception:  # noqa: BLE001 - a parser bug must not stop an evaluation
        return _formatted_wrong(rule="grader error"), "error"
    if not audit:
        return rewards, None
    try:
        with _alarm(timeout_s):
            rewards.update(grade_audit(response, ground_truth))
    except (GradeTimeout, Exception) as exc:  # noqa: BLE001 - the audit never changes a grade
        logging.getLogger(__name__).debug("audit without a verdict: %r", exc)
    return rewards, None


class GraderError(RuntimeError):
    """Grading itself failed (its worker processes cannot start): no reward can be trusted, none is given."""


def r1_zero_reward(response: str, ground_truth: str | list[str], timeout_s: float = 5.0) -> dict[str, Any]:
    """{format_reward, answer_reward, reward} for a response generated after the r1_zero prompt, and the
    verdict ("right" | "wrong" | "undecided"), the rule that decided (grader_rule) and the audit verdicts
    (audit_math_verify, audit_string: 1.0 / 0.0, None where that grader had no answer).

    Bounded by `timeout_s` from any caller (a plain script without a main guard, a notebook, a thread, a
    daemonic process): the symbolic part runs in a worker process started with `python -m`, which imports
    nothing of the caller, and is killed if it overruns. Raises GraderError when no worker can run."""
    if extract_answer(response) is None:
        return dict(_ZERO)
    return _shared_pool(timeout_s).grade([response], [ground_truth])[0][0]


_SHARED: dict[float, GraderPool] = {}
_SHARED_LOCK = threading.Lock()


def _shared_pool(timeout_s: float) -> GraderPool:
    with _SHARED_LOCK:
        if timeout_s not in _SHARED:
            _SHARED[timeout_s] = GraderPool(1, timeout_s)
            atexit.register(_SHARED[timeout_s].close)
        return _SHARED[timeout_s]


def _worker_main(timeout_s: float, audit: bool) -> None:
    """`python -m evaluator.grader --worker T [--no-audit]`: grade (index, response, truth) tasks from stdin, answer on
    the original stdout; everything else the libraries print goes to stderr."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it stops us
    conn_out = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    conn_in = Connection(0, writable=False)
    _math_verify()
    conn_out.send(("ready",))
    while True:
        try:
            task = conn_in.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, ground_truth = task
        rewards, problem = _grade_in_main_thread(response, ground_truth, timeout_s, audit)
        conn_out.send((index, rewards, problem))


class _Worker:
    """One grading process and its pipes. Not ready until it has imported the grader (seconds, for sympy):
    a task's deadline starts only when a ready worker takes it."""

    def __init__(self, timeout_s: float, audit: bool):
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the worker's stderr for its life; closed by kill()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evaluator.grader", "--worker", repr(timeout_s), *([] if audit else ["--no-audit"])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            start_new_session=True,
        )
        self.send_conn = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.recv_conn = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.ready = False
        self.start_deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        self.task: tuple[int, float] | None = None  # (task index, deadline)

    def failure(self) -> str:
        self.stderr.seek(0)
        lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {self.proc.poll()}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for conn in (self.send_conn, self.recv_conn):
            conn.close()
        self.stderr.close()


class _Batch:
    """One `GraderPool.grade` call: the cases left to send, the grades back, how often each case was lost."""

    def __init__(self, responses: list[str], ground_truths: list, progress: Callable[[int], None] | None) -> None:
        self.responses, self.ground_truths, self.progress = responses, ground_truths, progress
        self.results: list[dict[str, Any] | None] = [None] * len(responses)
        self.problems: list[str | None] = [None] * len(responses)
        self.lost: defaultdict[int, int] = defaultdict(int)  # how often a case timed out or its worker died under it
        self.todo: list[int] = []
        for i, r in enumerate(responses):
            if extract_answer(r) is None:  # badly formatted: no need to leave this process
                self.results[i] = dict(_ZERO)
            else:
                self.todo.append(i)
        if progress and len(self.todo) < len(responses):
            progress(len(responses) - len(self.todo))
        self.todo.reverse()  # sent from the end: in input order

    def finish(self, worker: _Worker, index: int, rewards: dict[str, Any] | None, problem: str | None) -> None:
        self.results[index] = rewards or _formatted_wrong(rule=f"grader {problem}")
        self.problems[index] = problem
        worker.task = None
        if self.progress:
            self.progress(1)

    def lose(self, worker: _Worker, index: int, problem: str) -> None:
        """The case timed out or its worker is gone (replaced): retry it once, then count it as `problem`."""
        worker.task = None
        self.lost[index] += 1
        if self.lost[index] >= 2:
            self.finish(worker, index, None, problem)
        else:
            self.todo.append(index)


class GraderPool:
    """Worker processes that grade in parallel; results in input order.

    A case that runs out of time (the worker's own timer, or the pool's bound for a worker stuck in C code) or
    whose worker dies (out of memory, killed) is graded once more, on a fresh worker where the old one is gone:
    a machine starved for a moment does not cost a reward. A second timeout or death grades it wrong, marked
    'timeout' or 'error', as is a case the grader itself fails on (an exception: no retry, it would fail again).
    The evaluator counts these per set (grader_timeouts, grader_errors) and prints a warning. Workers that cannot
    start raise GraderError."""

    KILL_GRACE_S = 1.0

    def __init__(self, num_workers: int | None, timeout_s: float, audit: bool = True):
        self.num_workers = num_workers or min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
        self.timeout_s, self.audit = timeout_s, audit  # audit off: the audit verdicts are None (benchmarks only)
        self._workers: list[_Worker] = [_Worker(timeout_s, audit) for _ in range(self.num_workers)]
        self._lock = threading.Lock()

    def grade(
        self, responses: list[str], ground_truths: list, progress: Callable[[int], None] | None = None
    ) -> tuple[list[dict[str, Any]], list[str | None]]:
        """(grades, problems): per response its grade dict (see r1_zero_reward), and None, 'timeout' or 'error'
        (graded undecided, counted wrong)."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        with self._lock:
            if not self._workers:
                raise GraderError("this grader pool is closed")
            return self._grade(responses, ground_truths, progress)

    def _grade(self, responses, ground_truths, progress):
        batch = _Batch(responses, ground_truths, progress)
        while batch.todo or any(w.task for w in self._workers):
            self._send(batch)
            self._receive(batch)
            self._enforce_deadlines(batch)
        return batch.results, batch.problems

    def _send(self, batch: _Batch) -> None:
        """A case to every ready idle worker."""
        for w in self._workers:
            if w.ready and w.task is None and batch.todo:
                i = batch.todo.pop()
                w.task = (i, time.monotonic() + 2 * self.timeout_s + self.KILL_GRACE_S)  # rules, then audit
                with suppress(OSError):  # died while idle: seen later as a dead busy worker, and the case retried
                    w.send_conn.send((i, batch.responses[i], batch.ground_truths[i]))

    def _receive(self, batch: _Batch) -> None:
        """What the workers sent until the nearest deadline: a grade, a timeout, a ready worker, or a death."""
        conns = {w.recv_conn: slot for slot, w in enumerate(self._workers)}
        deadlines = [w.task[1] if w.task else w.start_deadline for w in self._workers if w.task or not w.ready]
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for conn in wait_connections(list(conns), timeout=wait_s):
            slot = conns[conn]
            w = self._workers[slot]
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the worker died: out of memory, killed, or it could not start
                if not w.ready:
                    raise GraderError(f"a grading worker could not start: {w.failure()}") from None
                index = w.task[0] if w.task else None
                self._replace(slot)
                if index is not None:
                    batch.lose(self._workers[slot], index, "error")
                continue
            if message == ("ready",):
                w.ready = True
            elif message[2] == "timeout":  # the worker's own timer: a slow case, or a starved machine
                batch.lose(w, message[0], "timeout")
            else:
                batch.finish(w, *message)

    def _enforce_deadlines(self, batch: _Batch) -> None:
        """Replace a worker stuck past its case's deadline (C code no signal interrupts); fail a worker's start."""
        now = time.monotonic()
        for slot, w in enumerate(self._workers):
            if w.task and now > w.task[1]:
                index = w.task[0]
                self._replace(slot)
                batch.lose(self._workers[slot], index, "timeout")
            elif not w.ready and now > w.start_deadline:
                raise GraderError(f"a grading worker did not start within {WORKER_START_TIMEOUT_S:.0f}s")

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self.timeout_s, self.audit)

    def close(self) -> None:
        for w in self._workers:
            with suppress(OSError):
                w.send_conn.send(None)
        for w in self._workers:
            with suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=2)
            w.kill()
        self._workers = []


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(float(sys.argv[2]), audit="--no-audit" not in sys.argv[3:])
