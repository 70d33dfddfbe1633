"""Math answer grading for r1_zero responses: exact, fast, and never hangs.

Pipeline for one (response, ground truth):
1. Format: `</think> <answer>` followed later by `</answer>`; the answer is the text between the tags
   (the last \\boxed{} inside them when there is one).
2. Cheap normalisation of both sides (LaTeX spacing and sizing, units, dollars, percent, degrees,
   thousands separators, unicode minus, choice letters), then string and numeric comparison. Units on both
   sides must agree (5 hours is not 5 minutes); integers compare exactly; words compare as words; an
   equation answers a number only as `x = 5`; a variable is never taken for a unit.
3. Symbolic comparison with math-verify (sympy) for everything else: fractions, roots, pi,
   intervals, sets, tuples, matrices, equations, algebraic identities.

Bounding: math-verify's own timeout uses signal.alarm, which only works in a main thread. We switch
it off and bound every grade ourselves: in a process's main thread with an interval timer, and
always, in `GraderPool`, by killing a worker that overruns (sympy can sit in C code that no signal
interrupts). A grade that times out or raises counts as wrong and is counted.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from fractions import Fraction
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Callable, Iterator

from shared.data import last_boxed

MAX_ANSWER_CHARS = 1000
"""Answers longer than this are not parsed symbolically (they are garbage or a proof, not an answer)."""

MAX_DEFAULT_WORKERS = 16
"""Grading workers when none is configured: each holds sympy (~100 MB); 16 grade 5,000 answers in seconds."""

WORKER_START_TIMEOUT_S = 120.0
"""A grading worker that has not imported sympy and math-verify by then is broken, not slow."""

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
_FORMAT_OPEN = "</think> <answer>"
_ZERO = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
_FORMATTED_WRONG = {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}


class GradeTimeout(BaseException):
    """BaseException: math-verify and sympy catch Exception broadly and would swallow it."""


# --------------------------------------------------------------------------------------------------
# Extraction


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> str | None:
    """Answer text of a well-formatted response, else None. With several <answer> blocks the last complete
    one is the final answer (models restate and correct themselves)."""
    start = response.find(_FORMAT_OPEN)
    if start < 0:
        return None
    blocks = _ANSWER_BLOCK.findall(response, start + len(_FORMAT_OPEN) - len("<answer>"))
    if not blocks:
        return None
    answer = blocks[-1]
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer


# --------------------------------------------------------------------------------------------------
# Normalisation (string level, cheap)

_UNIT_WORDS = (
    "cm|centimeters?|centimetres?|mm|millimeters?|km|kilometers?|m|meters?|metres?|inch|inches|in|ft|feet|foot|yards?|yd|miles?|mi|"
    "g|grams?|kg|kilograms?|mg|lbs?|pounds?|oz|ounces?|tons?|ml|mL|l|L|liters?|litres?|gallons?|gal|cups?|"
    "s|sec|seconds?|min|minutes?|h|hr|hrs|hours?|days?|weeks?|months?|years?|"
    "dollars?|cents?|units?|sq|square|cubic|degrees?|deg|mph|kph|percent|points?|people|persons?|students?|"
    "apples?|books?|coins?|cards?|pens?|shells?|stamps?|marbles?|items?|pieces?|times|ways"
)
_TRAILING_UNIT = re.compile(
    rf"^([-+]?(?:\d*\\(?:frac|sqrt|pi)[\d{{}}]*|\d[\d.,/]*))\s*(?:\\(?:text|mbox|mathrm)\{{\s*)?"
    rf"({_UNIT_WORDS})(\^?\{{?[23]\}}?)?\s*\}}?\.?$"
)
"""One numeric term (6, 1.5, 3/4, \\frac{1}{2}, 2\\sqrt{3}, 4\\pi) and a unit word: "3 + 2m" is not "3 + 2" metres."""
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|textit|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_THOUSANDS_BANG = re.compile(r"(\d),\\!\s*(?=\d{3}(?!\d))")
"""MATH writes thousands as 11,\\!111 (a list is "11, 111"): the comma before \\! is a separator."""
_INTEGER = re.compile(r"^[-+]?\d+$")
_LONE_VARIABLE_EQUALS = re.compile(r"^\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=[^=]+$")
"""x = 5 answers 5; 5x - 7y + 4 = 0, x^2 = 4 or 12 = 5 do not (math-verify compares the right side alone)."""
_FREE_LETTER = re.compile(r"[a-df-hj-zA-Z]")
"""A letter that is a variable, not e or i (constants), once LaTeX commands are removed."""
_WORD_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|textit)\s*\{\s*[A-Za-z][A-Za-z ]*\}")
_THOUSANDS_LATEX = re.compile(r"^[-+]?\d{1,3}(?:\{,\}\d{3})+(?:\.\d+)?$")
_SPACED_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:(?:\\,|\\ |~|\s)\d{3})+(?:\.\d+)?$")
_NUMBER_DEGREES = re.compile(r"^([-+]?[\d.]+)\s*(?:\^\s*\{?\\circ\}?|\\circ|\\degree|\^\{\\text\{o\}\})$")
# A power tower or a huge exponent makes sympy compute in C for minutes, where no timer can stop it.
_HUGE_POWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\{?\s*\d{5,}|\*\*\s*\(?[^)]*\*\*")
_CHOICE = re.compile(r"^\(?([A-Ea-e])\)?$")
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
_SIMPLE_FRACTION = re.compile(r"^([-+]?)\\[dt]?frac\{?(\d+)\}?\{?(\d+)\}?$|^([-+]?)(\d+)/(\d+)$")


_UNICODE_FRACTIONS = {
    "\u00bd": (1, 2),
    "\u2153": (1, 3),
    "\u2154": (2, 3),
    "\u00bc": (1, 4),
    "\u00be": (3, 4),
    "\u2155": (1, 5),
    "\u2156": (2, 5),
    "\u2157": (3, 5),
    "\u2158": (4, 5),
    "\u2159": (1, 6),
    "\u215a": (5, 6),
    "\u215b": (1, 8),
    "\u215c": (3, 8),
    "\u215d": (5, 8),
    "\u215e": (7, 8),
}
_UNICODE_SYMBOLS = {
    "\u2212": "-",
    "\u2013": "-",
    "\u00b0": "^\\circ",
    "\u03c0": "\\pi",
    "\u221e": "\\infty",
    "\u00d7": "\\times ",
    "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ",
    "\u00f7": "\\div ",
    "\u2264": "\\le ",
    "\u2265": "\\ge ",
    "\u2260": "\\ne ",
    "\u222a": "\\cup ",
    "\u2229": "\\cap ",
}
_SUPERSCRIPTS = str.maketrans("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207b", "0123456789-")
_UNICODE_ROOT = re.compile("([\u221a\u221b])\\s*(\\d+(?:\\.\\d+)?|[a-zA-Z]|\\([^()]*\\)|\\{[^{}]*\\})")
_UNICODE_POWER = re.compile("([\u2070\u00b9\u00b2\u00b3\u2074-\u2079\u207b]+)")
_REPEATING = re.compile(r"^([-+]?)(\d*)\.(\d*)\\overline\{(\d+)\}$")
_NUMBER_THEN_WORDS = re.compile(r"^([-+]?\d[\d,]*(?:\.\d+)?)\s+([A-Za-z]+(?:\s+[A-Za-z]+){0,2})\.?$")
_NOT_A_UNIT = {
    "and",
    "or",
    "to",
    "through",
    "minus",
    "plus",
    "over",
    "divided",
    "by",
    "times",
    "squared",
    "cubed",
    "i",
    "pi",
    "e",
    "x",
    "y",
    "z",
    "n",
    "k",
    "sqrt",
    "dozen",
    "hundred",
    "thousand",
    "million",
    "billion",
    "half",
    "percent",
    "is",
    "are",
    "was",
    "were",
    "a",
    "an",
    "the",
    "not",
    "in",
    "of",
    "factorial",
    "halves",
    "thirds",
    "quarters",
    "fourths",
    "fifths",
    "tenths",
    "hundredths",
    "thousandths",
}
_VARIABLE = r"[a-zA-Z]"
_BOUND = r"(-?\s*(?:\\infty|\d+(?:\.\d+)?|\\frac\{[^{}]+\}\{[^{}]+\}|\\sqrt\{[^{}]+\}|\\pi|[\d.]+/[\d.]+))"
_LESS = r"(<|\\lt|\\le|\\leq|\\leqslant)"
_MORE = r"(>|\\gt|\\ge|\\geq|\\geqslant)"
_ONE_SIDED = re.compile(rf"^{_VARIABLE}\s*(?:{_LESS}|{_MORE})\s*{_BOUND}$")
_TWO_SIDED = re.compile(rf"^{_BOUND}\s*{_LESS}\s*{_VARIABLE}\s*{_LESS}\s*{_BOUND}$")


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


_CLOSED = ("\\le", "\\leq", "\\leqslant", "\\ge", "\\geq", "\\geqslant")


def _inequality_as_interval(s: str) -> str:
    """x > 3 -> (3,\\infty), x \\le -1 -> (-\\infty,-1], 2 < x \\le 5 -> (2,5]: one variable, one or two bounds."""
    compact = s.strip()
    m = _ONE_SIDED.match(compact)
    if m:
        less, more, bound = m.groups()
        bound = bound.replace(" ", "")
        if less:
            return "(-\\infty," + bound + ("]" if less in _CLOSED else ")")
        return ("[" if more in _CLOSED else "(") + bound + ",\\infty)"
    m = _TWO_SIDED.match(compact)
    if m:
        low, first, second, high = m.groups()
        return (
            ("[" if first in _CLOSED else "(")
            + low.replace(" ", "")
            + ","
            + high.replace(" ", "")
            + ("]" if second in _CLOSED else ")")
        )
    return s


def _strip_counted_noun(s: str) -> str:
    """ "6 cookies" -> 6: a number followed by one to three plain words that are not maths ("5 or 6" stays)."""
    m = _NUMBER_THEN_WORDS.match(s)
    if m and not any(word.lower() in _NOT_A_UNIT for word in m.group(2).split()):
        return m.group(1)
    return s


def normalize(answer: str) -> str:
    return _normalize_with_unit(answer)[0]


def _normalize_with_unit(answer: str) -> tuple[str, str | None]:
    """The normalised answer, and the unit word it carried ("cm^2", "hours"; None without one)."""
    s = _THOUSANDS_BANG.sub(r"\1", _rewrite_unicode(answer.strip()))
    s = (
        re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?=[\s(\[\]{}|.)\\])\s*\\?\.?", "", s)
        if "\\left" in s or "\\right" in s or "\\big" in s.lower()
        else s
    )
    s = re.sub(r"\\,|\\ |~|\s", "", s) if _SPACED_THOUSANDS.match(s) else re.sub(r"(?<!\\)\\[,!;:> ]|\\q?quad", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = s.strip().strip("$").strip()
    s = re.sub(r"^\\\[|\\\]$|^\\\(|\\\)$", "", s).strip()
    # Degrees, percent, dollars: the reference graders treat 50\% as 50 and $18 as 18.
    s = _NUMBER_DEGREES.sub(r"\1", s)
    s = re.sub(r"\\?%|\\percent", "", s)
    s = re.sub(r"US\\?\$|\\\$|\$|\\textdollar", "", s)
    unwrapped = _TEXT_WRAPPER.sub(lambda m: m.group(1), s).strip()
    if _TRAILING_UNIT.match(unwrapped) or _CHOICE.match(unwrapped) or unwrapped.replace(" ", "").isalpha():
        s = unwrapped  # "5 \text{ cm}", "\text{(B)}", "\text{Monday}": the words are the answer's decoration or the answer
    unit = _TRAILING_UNIT.match(s)
    if unit:
        s = unit.group(1)
        unit = unit.group(2).lower().rstrip("s") + (unit.group(3) or "").strip("^{}")
    s = _inequality_as_interval(_repeating_decimal(s.strip().rstrip(".").strip()))
    if _THOUSANDS.match(s) or _THOUSANDS_LATEX.match(s):
        s = s.replace("{,}", "").replace(",", "")
    choice = _CHOICE.match(s)
    if choice:
        s = choice.group(1).upper()
    return s, unit or None


def _as_number(s: str) -> float | None:
    if _NUMBER.match(s):
        return float(s)
    m = _SIMPLE_FRACTION.match(s)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5), m.group(6))
        if int(den) == 0:
            return None
        value = int(num) / int(den)
        return -value if sign == "-" else value
    return None


def vote_key(answer: str) -> str | None:
    """What maj@k counts votes by: the answer after the grader's normalisation, a number by its value
    ("0.5", "\\frac{1}{2}" and "1/2" vote together); None for an empty answer (no vote)."""
    s = normalize(answer)
    if not s:
        return None
    number = _as_number(s)
    return f"{number:.12g}" if number is not None else s


def _numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _counted_number(s: str) -> tuple[float | None, str]:
    """The value of a normalised answer that is a number once a counted noun goes ("6 cookies"), and the digits
    it was read from; thousands separators go, list commas stay ("-2,1" is no number)."""
    s = _strip_counted_noun(s)
    s = s.replace(",", "") if _THOUSANDS.match(s) else s
    return _as_number(s), s


# --------------------------------------------------------------------------------------------------
# Symbolic comparison (math-verify + sympy)

_mv = None


def _math_verify():
    global _mv
    if _mv is None:
        import math_verify

        logging.getLogger("math_verify").setLevel(logging.CRITICAL)
        _mv = math_verify
    return _mv


def _wrap(s: str) -> str:
    return s if s.startswith("$") else f"${s}$"


def _symbolic_equal(pred: str, gold: str) -> bool:
    mv = _math_verify()
    gold_parsed = mv.parse(_wrap(gold), parsing_timeout=None)
    pred_parsed = mv.parse(_wrap(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))


def answers_equivalent(pred: str, gold: str) -> bool:
    """Is the extracted answer `pred` mathematically equal to the ground truth `gold`?"""
    (p, p_unit), (g, g_unit) = _normalize_with_unit(pred), _normalize_with_unit(gold)
    if not p or not g:
        return False
    if p_unit and g_unit and p_unit != g_unit:
        return False  # 5 hours is not 5 minutes (a unit on one side only is decoration)
    if p == g:
        return True
    if _WORD_WRAPPER.search(pred) or _WORD_WRAPPER.search(gold) or (len(p) > 3 and len(g) > 3):
        if p.replace(" ", "").isalpha() and g.replace(" ", "").isalpha():
            return p.lower().split() == g.lower().split()  # words, not products of letters (Navin is not Nivan)
    (pn, p_digits), (gn, g_digits) = (_as_number(p), p), (_as_number(g), g)
    # "6 cookies" against 6: the words count the number. Only against a bare number ("5 heads" vs "5 tails"
    # stays wrong).
    if pn is None and gn is not None:
        pn, p_digits = _counted_number(p)
    elif gn is None and pn is not None:
        gn, g_digits = _counted_number(g)
    if pn is not None and gn is not None:
        if _INTEGER.match(p_digits) and _INTEGER.match(g_digits):
            return int(p_digits) == int(g_digits)  # exact: 1000000001 is not 1000000000
        return _numbers_equal(pn, gn)
    if "=" in p and "=" not in g and not _LONE_VARIABLE_EQUALS.match(p):
        return False
    if gn is not None and "=" not in p and _FREE_LETTER.search(re.sub(r"\\[a-zA-Z]+", "", p)):
        return False  # 3 + 2m is not 5 (math-verify would drop the m as a unit)
    if len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS or _HUGE_POWER.search(p) or _HUGE_POWER.search(g):
        return False
    if _CHOICE.match(g) and len(g) == 1 and g.isalpha():
        return p == g  # a choice letter: only the same letter is right
    if (p.startswith("\\{") != g.startswith("\\{")) and (p[:1] in "([" or g[:1] in "(["):
        return False  # a set is not a tuple or an interval (sympy compares their elements only)
    return _symbolic_equal(p, g)


def grade(response: str, ground_truth: str | list[str]) -> dict[str, float]:
    """Unbounded grade; callers bound it (see r1_zero_reward, GraderPool)."""
    answer = extract_answer(response)
    if answer is None:
        return dict(_ZERO)
    truths = ground_truth if isinstance(ground_truth, list) else [ground_truth]
    correct = any(answers_equivalent(answer, str(t)) for t in truths)
    return {"format_reward": 1.0, "answer_reward": float(correct), "reward": float(correct)}


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


def _grade_in_main_thread(response: str, ground_truth, timeout_s: float) -> tuple[dict[str, float], str | None]:
    """(rewards, None | 'timeout' | 'error')."""
    answer = extract_answer(response)
    if answer is None:
        return dict(_ZERO), None
    try:
        with _alarm(timeout_s):
            return grade(response, ground_truth), None
    except GradeTimeout:
        return dict(_FORMATTED_WRONG), "timeout"
    except Exception:  # noqa: BLE001 - a parser bug must not stop an evaluation
        return dict(_FORMATTED_WRONG), "error"


class GraderError(RuntimeError):
    """Grading itself failed (its worker processes cannot start): no reward can be trusted, none is given."""


def r1_zero_reward(response: str, ground_truth: str | list[str], timeout_s: float = 5.0) -> dict[str, float]:
    """{format_reward, answer_reward, reward} for a response generated after the r1_zero prompt.

    Bounded by `timeout_s` from any caller (a plain script without a main guard, a notebook, a thread, a
    daemonic process): the symbolic part runs in a worker process started with `python -m`, which imports
    nothing of the caller, and is killed if it overruns. Raises GraderError when no worker can run."""
    if extract_answer(response) is None:
        return dict(_ZERO)
    return _shared_pool(timeout_s).grade([response], [ground_truth])[0][0]


_SHARED: dict[float, "GraderPool"] = {}
_SHARED_LOCK = threading.Lock()


def _shared_pool(timeout_s: float) -> "GraderPool":
    with _SHARED_LOCK:
        if timeout_s not in _SHARED:
            _SHARED[timeout_s] = GraderPool(1, timeout_s)
            atexit.register(_SHARED[timeout_s].close)
        return _SHARED[timeout_s]


def _worker_main(timeout_s: float) -> None:
    """`python -m evaluator.grader --worker T`: grade (index, response, truth) tasks from stdin, answer on
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
        rewards, problem = _grade_in_main_thread(response, ground_truth, timeout_s)
        conn_out.send((index, rewards, problem))


class _Worker:
    """One grading process and its pipes. Not ready until it has imported the grader (seconds, for sympy):
    a task's deadline starts only when a ready worker takes it."""

    def __init__(self, timeout_s: float):
        self.stderr = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evaluator.grader", "--worker", repr(timeout_s)],
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


class GraderPool:
    """Worker processes that grade in parallel; results in input order.

    A case that runs out of time (the worker's own timer, or the pool's bound for a worker stuck in C code) or
    whose worker dies (out of memory, killed) is graded once more, on a fresh worker where the old one is gone:
    a machine starved for a moment does not cost a reward. A second timeout or death grades it wrong, marked
    'timeout' or 'error', as is a case the grader itself fails on (an exception: no retry, it would fail again).
    The evaluator counts these per set (grader_timeouts, grader_errors) and prints a warning. Workers that cannot
    start raise GraderError."""

    KILL_GRACE_S = 1.0

    def __init__(self, num_workers: int | None, timeout_s: float):
        self.num_workers = num_workers or min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
        self.timeout_s = timeout_s
        self._workers: list[_Worker] = [_Worker(timeout_s) for _ in range(self.num_workers)]
        self._lock = threading.Lock()

    def grade(
        self, responses: list[str], ground_truths: list, progress: Callable[[int], None] | None = None
    ) -> tuple[list[dict[str, float]], list[str | None]]:
        """(rewards, problems): per response its rewards, and None, 'timeout' or 'error' (counted wrong)."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        with self._lock:
            if not self._workers:
                raise GraderError("this grader pool is closed")
            return self._grade(responses, ground_truths, progress)

    def _grade(self, responses, ground_truths, progress):
        results: list[dict[str, float] | None] = [None] * len(responses)
        problems: list[str | None] = [None] * len(responses)
        todo, lost = [], defaultdict(int)  # lost: how often a case timed out or its worker died under it
        for i, r in enumerate(responses):
            if extract_answer(r) is None:  # badly formatted: no need to leave this process
                results[i] = dict(_ZERO)
            else:
                todo.append(i)
        if progress and len(todo) < len(responses):
            progress(len(responses) - len(todo))
        todo.reverse()

        def finish(slot: int, index: int, rewards: dict[str, float] | None, problem: str | None) -> None:
            results[index] = rewards or dict(_FORMATTED_WRONG)
            problems[index] = problem
            self._workers[slot].task = None
            if progress:
                progress(1)

        def lose(slot: int, index: int, problem: str) -> None:
            """The case timed out or its worker is gone (replaced): retry it once, then count it as `problem`."""
            self._workers[slot].task = None
            lost[index] += 1
            if lost[index] >= 2:
                finish(slot, index, None, problem)
            else:
                todo.append(index)

        while todo or any(w.task for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and todo:
                    i = todo.pop()
                    w.task = (i, time.monotonic() + self.timeout_s + self.KILL_GRACE_S)
                    try:
                        w.send_conn.send((i, responses[i], ground_truths[i]))
                    except OSError:
                        pass  # died while idle: seen below as a dead busy worker, and the case retried
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
                        lose(slot, index, "error")
                    continue
                if message == ("ready",):
                    w.ready = True
                elif message[2] == "timeout":  # the worker's own timer: a slow case, or a starved machine
                    lose(slot, message[0], "timeout")
                else:
                    finish(slot, *message)
            now = time.monotonic()
            for slot, w in enumerate(self._workers):
                if w.task and now > w.task[1]:
                    index = w.task[0]
                    self._replace(slot)
                    lose(slot, index, "timeout")
                elif not w.ready and now > w.start_deadline:
                    raise GraderError(f"a grading worker did not start within {WORKER_START_TIMEOUT_S:.0f}s")
        return results, problems

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self.timeout_s)

    def close(self) -> None:
        for w in self._workers:
            try:
                w.send_conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            try:
                w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(float(sys.argv[2]))
