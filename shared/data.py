"""Data sets of math problems: readers for the usual layouts and the embedded arithmetic generator.

Every reader returns `Example`s; bad input raises `DataError` naming file:line and the field.
No torch here: the evaluator's data loading and the tests use this without a model.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.config import EMBEDDED_DATA, DatasetConfig
from shared.errors import UserError

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
"""One `<answer>...</answer>` block, its text in group 1: the SFT reader takes a response's first block as its ground
truth, the grader the last complete block after `</think> ` as the model's answer."""


class DataError(UserError, ValueError):
    """A data file or record is unusable; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    question: str
    """The problem statement, inserted into the prompt template."""
    response: str | None
    """Target response in r1_zero format (`reasoning </think> <answer> x </answer>`), for training."""
    answer: str
    """Ground-truth final answer, for grading."""
    prompt: str | None = None
    """A ready-made prompt (SFT files carry one); when None the template is applied to `question`."""
    fields: dict[str, str | int | float | bool] = field(default_factory=dict, hash=False, compare=False)
    """The record's other scalar fields (MATH: subject, level, unique_id), for breakdowns of accuracy."""
    index: int = 0
    """Position in its data set: names the problem in results, whatever subset is evaluated."""


def r1_zero_response(reasoning: str, answer: str) -> str:
    return f"{reasoning.strip()} </think> <answer> {answer.strip()} </answer>"


def load_prompt_template(path: Path) -> str:
    try:
        template = Path(path).read_text()
    except OSError as exc:
        raise DataError(f"prompt template {path}: {exc.strerror}") from None
    if "{question}" not in template:
        raise DataError(f"prompt template {path}: has no {{question}} placeholder")
    return template


def render_prompt(template: str, example: Example) -> str:
    return example.prompt if example.prompt is not None else template.replace("{question}", example.question)


# --------------------------------------------------------------------------------------
# Answer extraction


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if not text[i:].lstrip().startswith("{"):  # "\\boxed 3": the next token is the answer
        rest = text[i:].split("$", maxsplit=1)[0].split()
        return rest[0] if rest else None
    i = text.index("{", i)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def gsm8k_final_answer(answer: str) -> str | None:
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


_CALC_ANNOTATION = re.compile(r"<<[^>]*>>")


# --------------------------------------------------------------------------------------
# Record readers. Each takes (record, where) and returns an Example or raises DataError.


def _field(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise DataError(f"{where}: missing field '{name}'")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{name}' must be a non-empty string, got {value!r:.60}")
    return value


def _from_sft(record: dict[str, Any], where: str) -> Example:
    prompt = _field(record, "prompt", where)
    response = _field(record, "response", where)
    gt = record.get("ground_truth", record.get("answer"))
    if gt is None:
        match = ANSWER_RE.search(response)
        if not match:
            raise DataError(f"{where}: field 'response' has no <answer>...</answer> and no 'ground_truth' field")
        gt = match.group(1)
    return Example(
        question=prompt,
        response=response,
        answer=str(gt).strip(),
        prompt=prompt,
        fields=_scalar_fields(record, ("prompt", "response", "ground_truth", "answer")),
    )


def _from_math(record: dict[str, Any], where: str) -> Example:
    problem = _field(record, "problem", where)
    solution = _field(record, "solution", where)
    answer = record.get("answer")
    if answer is None:
        answer = last_boxed(solution)
        if answer is None:
            raise DataError(f"{where}: no 'answer' field and no \\boxed{{}} in 'solution'")
    return Example(
        question=problem,
        response=r1_zero_response(solution, str(answer)),
        answer=str(answer),
        fields=_scalar_fields(record, ("problem", "solution", "answer")),
    )


def _scalar_fields(record: dict[str, Any], used: tuple[str, ...]) -> dict[str, str | int | float | bool]:
    """Fields a reader did not consume that hold one value (MATH's `type` is its `subject`)."""
    fields = {k: v for k, v in record.items() if k not in used and isinstance(v, (str, int, float, bool))}
    if "type" in fields and "subject" not in fields:
        fields["subject"] = fields.pop("type")
    return fields


def _from_gsm8k(record: dict[str, Any], where: str) -> Example:
    question = _field(record, "question", where)
    full = _field(record, "answer", where)
    final = gsm8k_final_answer(full)
    if final is None:
        raise DataError(f"{where}: field 'answer' has no '#### <final answer>' line")
    reasoning = _CALC_ANNOTATION.sub("", full.rsplit("####", 1)[0])
    return Example(
        question=question,
        response=r1_zero_response(reasoning, final),
        answer=final,
        fields=_scalar_fields(record, ("question", "answer")),
    )


_READERS = {"sft": _from_sft, "math": _from_math, "gsm8k": _from_gsm8k}


def detect_format(record: dict[str, Any], where: str) -> str:
    keys = set(record)
    if {"prompt", "response"} <= keys:
        return "sft"
    if {"problem", "solution"} <= keys:
        return "math"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    raise DataError(
        f"{where}: cannot tell the data format from fields {sorted(keys)}; expected "
        "{prompt, response} (sft), {problem, solution} (math) or {question, answer} (gsm8k)"
    )


def _to_examples(records: Iterable[tuple[str, Any]], fmt: str, limit: int | None, source: str) -> list[Example]:
    """Records (with where each came from) -> Examples; the layout is detected from the first one."""
    examples = []
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if fmt == "auto":
            fmt = detect_format(record, where)
        examples.append(replace(_READERS[fmt](record, where), index=len(examples)))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{source}: empty data set (no records)")
    return examples


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of each non-blank line; DataError naming file:line and column for one that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\r\n")  # the line ending is not part of the record: columns count within the line
            if text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    where = "at the end of the line" if exc.pos >= len(text) else f"at column {exc.pos + 1}"
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} {where})") from None
                yield f"{path}:{lineno}", record


def read_jsonl(path: Path, fmt: str = "auto", limit: int | None = None) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return _to_examples(jsonl_records(path), fmt, limit, str(path))


def _read_hf(name: str, split: str, fmt: str, limit: int | None) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"hf:{name}: reading a hub data set needs the 'datasets' package (pip install datasets)"
        ) from None
    rows = datasets.load_dataset(name, split=split)
    return _to_examples(
        ((f"hf:{name}[{split}] row {i}", r) for i, r in enumerate(rows)), fmt, limit, f"hf:{name}[{split}]"
    )


def load_dataset(cfg: DatasetConfig) -> list[Example]:
    if cfg.path == EMBEDDED_DATA:
        default = {"train": 20000, "test": 500}
        if cfg.split not in default:
            raise DataError(f"{EMBEDDED_DATA}: split must be 'train' or 'test', got {cfg.split!r}")
        return generate_arithmetic(cfg.split, cfg.num_examples or default[cfg.split])
    if cfg.path.startswith("hf:"):
        return _read_hf(cfg.path[3:], cfg.split, cfg.format, cfg.num_examples)
    return read_jsonl(Path(cfg.path), cfg.format, cfg.num_examples)


def seeded_subset(examples: list[Example], num: int | None, seed: int) -> list[Example]:
    """The same `num` examples for every checkpoint, so accuracy curves compare like with like."""
    if num is None or num >= len(examples):
        return list(examples)
    idx = sorted(random.Random(seed).sample(range(len(examples)), num))
    return [examples[i] for i in idx]


# --------------------------------------------------------------------------------------
# Embedded arithmetic word problems
#
# Two-step problems over small numbers, with the working written out one operation per sentence,
# so a tiny model can learn them from the reasoning traces. A problem belongs to the test split iff
# a hash of its (template, numbers) says so: the splits never share a problem, whatever is generated.

_NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo"]
_THINGS = ["apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles"]
_GROUPS = ["boxes", "bags", "jars", "rows"]


def _problem(kind: int, a: int, b: int, c: int, name: str, thing: str, group: str) -> tuple[str, str, int] | None:
    """(question, reasoning, answer) or None when the numbers do not fit the story."""
    if kind == 0:  # a + b - c
        s = a + b
        if c > s:
            return None
        q = f"{name} has {a} {thing}. {name} gets {b} more and then gives away {c}. "
        q += f"How many {thing} does {name} have now?"
        return q, f"{a} + {b} = {s}. {s} - {c} = {s - c}.", s - c
    if kind == 1:  # a * b + c
        p = a * b
        q = f"{name} has {a} {group} with {b} {thing} in each, and {c} more {thing}. How many {thing} does {name} have?"
        return q, f"{a} * {b} = {p}. {p} + {c} = {p + c}.", p + c
    if kind == 2:  # a - b + c
        if b > a:
            return None
        d = a - b
        q = f"{name} had {a} {thing}, lost {b}, then found {c}. How many {thing} does {name} have now?"
        return q, f"{a} - {b} = {d}. {d} + {c} = {d + c}.", d + c
    # kind 3: a * b - c
    p = a * b
    if c > p:
        return None
    q = f"{name} fills {a} {group} with {b} {thing} each and gives away {c} {thing}. How many {thing} are left?"
    return q, f"{a} * {b} = {p}. {p} - {c} = {p - c}.", p - c


def _is_test(kind: int, a: int, b: int, c: int) -> bool:
    return hashlib.sha256(f"{kind}:{a}:{b}:{c}".encode()).digest()[0] < 26  # ~10% of problems


def generate_arithmetic(split: str, num: int, seed: int = 1234) -> list[Example]:
    rng = random.Random(f"{seed}:{split}")
    want_test = split == "test"
    examples = []
    while len(examples) < num:
        kind = rng.randrange(4)
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        if _is_test(kind, a, b, c) != want_test:
            continue
        made = _problem(kind, a, b, c, rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_GROUPS))
        if made is None:
            continue
        question, reasoning, answer = made
        examples.append(
            Example(
                question=question,
                response=r1_zero_response(reasoning, str(answer)),
                answer=str(answer),
                fields={"kind": f"type{kind}"},
                index=len(examples),
            )
        )
    return examples
