import json

import pytest

from conftest import GSM8K_DIR, REPO
from shared.config import DatasetConfig
from shared.data import (
    DataError,
    generate_arithmetic,
    gsm8k_final_answer,
    last_boxed,
    load_dataset,
    load_prompt_template,
    read_jsonl,
    render_prompt,
    seeded_subset,
)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_sft_layout(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "P: 1+1?", "response": "1+1=2 </think> <answer> 2 </answer>"}])
    (ex,) = read_jsonl(p)
    assert ex.prompt == "P: 1+1?" and ex.answer == "2"
    assert render_prompt("ignored {question}", ex) == "P: 1+1?"


def test_math_layout_takes_last_boxed(tmp_path):
    p = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {
                "problem": "Compute.",
                "solution": "First \\boxed{1}, finally \\boxed{\\frac{1}{2}}.",
                "type": "Algebra",
                "level": "Level 2",
            },
            {"problem": "Q", "solution": "S", "answer": "7"},
        ],
    )
    a, b = read_jsonl(p)
    assert a.answer == "\\frac{1}{2}" and a.fields == {"subject": "Algebra", "level": "Level 2"} and a.index == 0
    assert a.response.endswith("</think> <answer> \\frac{1}{2} </answer>")
    assert b.answer == "7" and b.fields == {} and b.index == 1


def test_gsm8k_layout(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "3 * 4 = <<3*4=12>>12\n#### 1,012"}])
    (ex,) = read_jsonl(p)
    assert ex.answer == "1012"
    assert "<<" not in ex.response and ex.response.startswith("3 * 4 = 12")


@pytest.mark.skipif(not GSM8K_DIR.exists(), reason="team data kit not beside the checkout")
def test_real_gsm8k_file_reads():
    examples = read_jsonl(GSM8K_DIR / "test.jsonl")
    assert len(examples) == 1319
    assert examples[0].answer == "18"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x"}', r":2: missing field 'response'"),
        ('{"prompt": "x", "response": 5}', r":2: field 'response' must be a non-empty string"),
        ("{not json", r":2: not valid JSON \(Expecting property name enclosed in double quotes at column 2\)"),
        ('{"prompt": oops}', r":2: not valid JSON \(Expecting value at column 12\)"),
        ("{", r":2: not valid JSON \(Expecting property name enclosed in double quotes at the end of the line\)"),
        ("[1, 2]", r":2: expected a JSON object, got list"),
        ('{"prompt": "x", "response": "no tags"}', r":2: field 'response' has no <answer>"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, line, message):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "r </think> <answer> 1 </answer>"}, line])
    with pytest.raises(DataError, match=message) as e:
        read_jsonl(p)
    assert str(p) in str(e.value)


def test_unknown_layout_and_empty_and_missing(tmp_path):
    with pytest.raises(DataError, match=r"cannot tell the data format from fields \['foo'\]"):
        read_jsonl(write_jsonl(tmp_path / "a.jsonl", [{"foo": 1}]))
    with pytest.raises(DataError, match="empty data set"):
        read_jsonl(write_jsonl(tmp_path / "b.jsonl", []))
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(DatasetConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"math\.jsonl:1: no 'answer' field and no \\boxed"):
        read_jsonl(write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "solution": "s"}]))


def test_answer_helpers():
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None
    assert gsm8k_final_answer("... #### 42") == "42"
    assert gsm8k_final_answer("no marker") is None


def test_arithmetic_generator_is_deterministic_with_disjoint_splits():
    train = generate_arithmetic("train", 3000)
    test = generate_arithmetic("test", 300)
    assert train == generate_arithmetic("train", 3000)
    assert not {e.question for e in train} & {e.question for e in test}
    for ex in train[:200] + test[:50]:
        assert ex.response.endswith(f"</think> <answer> {ex.answer} </answer>")
        # The reasoning's last computation is the answer.
        assert ex.response.split(" </think>")[0].rstrip(".").split("= ")[-1] == ex.answer
    assert {e.fields["kind"] for e in test} == {"type0", "type1", "type2", "type3"}
    assert [e.index for e in test] == list(range(len(test)))


def test_seeded_subset_is_stable():
    data = generate_arithmetic("test", 100)
    assert seeded_subset(data, 10, 0) == seeded_subset(data, 10, 0)
    assert seeded_subset(data, 10, 0) != seeded_subset(data, 10, 1)
    assert seeded_subset(data, None, 0) == data


def test_prompt_template(tmp_path):
    t = load_prompt_template(__import__("conftest").REPO / "prompts" / "r1_zero.prompt")
    assert t.endswith("User: {question}\nAssistant: <think>")
    (tmp_path / "bad.prompt").write_text("no placeholder")
    with pytest.raises(DataError, match=r"no \{question\} placeholder"):
        load_prompt_template(tmp_path / "bad.prompt")


SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "math500").exists(), reason="team data kit not beside the checkout")
def test_real_math500_and_aime24_read_as_they_are():
    from evaluator.grader import r1_zero_reward

    math500 = read_jsonl(SHARED_DATA / "math500" / "test.jsonl")
    assert len(math500) == 500 and all(ex.answer for ex in math500)
    assert sum(1 for ex in math500 if ex.fields["subject"] == "Algebra") == 124
    assert {ex.fields["level"] for ex in math500} == {1, 2, 3, 4, 5}
    aime = read_jsonl(SHARED_DATA / "aime24" / "test.jsonl")
    assert len(aime) == 30 and all(len(ex.answer) == 3 and ex.answer.isdigit() for ex in aime)  # written "025"
    padded = next(ex.answer for ex in aime if ex.answer.startswith("0"))
    assert (
        r1_zero_reward(f"x </think> <answer> {int(padded)} </answer>", padded)["reward"] == 1.0
    )  # integers, not strings
    assert r1_zero_reward(f"x </think> <answer> {int(padded) + 1} </answer>", padded)["reward"] == 0.0
