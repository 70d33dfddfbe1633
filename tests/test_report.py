"""The report: table, --diff of flipped problems, PNG and a self-contained HTML page seen in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, service_env
from evaluator.metrics import changes, set_metrics
from evaluator.recording import write_result
from shared.protocol import RunLayout

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# problem -> right at steps 0, 100, 200 (one sample each; problem 3 carries no level). Step 0 -> 100: 10 learned,
# none forgotten (exact McNemar p = 2/1024: distinguishable); 100 -> 200: one learned, one forgotten (noise).
RIGHT = {0: (0, 1, 1), 1: (1, 1, 0), 2: (0, 0, 1), 3: (0, 1, 1), **dict.fromkeys(range(4, 12), (0, 1, 1))}
FIELDS = {0: {"level": 1}, 1: {"level": 1}, 2: {"level": 2}, 3: {}, **{p: {"level": 1 + p % 2} for p in range(4, 12)}}
BUDGETS = [8, 11, 16]  # a response of step i has 10 + i tokens: none fits in 8, steps 0 and 100 fit in 11


def sample(problem: int, step_index: int, right: int | None = None) -> dict:
    right = RIGHT[problem][step_index] if right is None else right
    return {
        "problem": problem,
        "sample": 0,
        "prompt": f"Question {problem}?",
        "response": f"reasoning of step {step_index} </think> <answer> {42 if right else 7} </answer>",
        "ground_truth": "42",
        "answer": "42" if right else "7",
        "vote": "42" if right else "7",
        "num_tokens": 10 + step_index,
        "truncated": False,
        "format_reward": 1.0,
        "answer_reward": float(right),
        "reward": float(right),
        "failure": None if right else "wrong",
    }


def audit(samples: list[dict], disputed: set[int] = frozenset()) -> list[dict]:
    """The samples with the audit's verdicts, as the grader writes them: math-verify alone and the string match
    agree with ours, except math-verify on the problems in `disputed`."""
    for s in samples:
        ours = s["reward"]
        s.update(verdict="right" if ours else "wrong", grader_rule="R10", audit_string=ours)
        s["audit_math_verify"] = 1.0 - ours if s["problem"] in disputed else ours
    return samples


# With the audit on: math-verify alone takes problem 2's answer at step 200 for wrong (ours: right), so the flip of
# problem 2 (learned 100 -> 200) is disputed; problem 1's (forgotten) is not.
DISPUTED = {2: {2}}  # step index -> problems


def write_evaluated_run(run, select_fraction=None, audited=False, versions=(None, None, None)):
    """A run folder with three evaluated steps, written by the evaluator's own writer, and a train log; `audited`:
    with the grader audit's verdicts (DISPUTED); `versions`: each step's grader_version (None: unversioned)."""
    eval_dir = RunLayout(run).eval_dir("default")
    eval_dir.mkdir(parents=True)
    previous = None
    for i, step in enumerate((0, 100, 200)):
        samples = [sample(p, i) for p in RIGHT]
        if audited:
            audit(samples, DISPUTED.get(i, set()))
        metrics = set_metrics(samples, 1, FIELDS, ["level"], token_budgets=BUDGETS, select_fraction=select_fraction)
        flips = changes(previous[1], samples) if previous else {"learned": [], "forgotten": []}
        if previous:
            metrics["learned"], metrics["forgotten"] = len(flips["learned"]), len(flips["forgotten"])
        set_result = {
            "step": step,
            "set": "math",
            "sampling": {"n": 1},
            "metrics": metrics,
            "changes": {"vs_step": previous[0] if previous else None, **flips},
        }
        result = {
            "step": step,
            "checkpoint": "x",
            "weights_id": f"w{step}",
            "eval_name": "default",
            "time": 0.0,
            "sets": {"math": set_result},
            "timings_s": {"total": 1.0, "reload": 0.1},
        }
        if versions[i] is not None:
            result["grader_version"] = set_result["grader_version"] = versions[i]
        write_result(eval_dir, result, {"math": samples})
        previous = (step, samples)
    rows = [{"train_step": s, "train/loss": 2.0 / s, "train/lr": 1e-3 * (1 - s / 300)} for s in range(1, 201)]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def write_average(run, last=2, steps=(100, 200)):
    """A hand-made averaged checkpoint's result where evaluator/averaging.py puts it (eval/default/average_last_2/,
    an evaluation folder's layout, the result carrying `average`): every problem right, at the newest step."""
    samples = audit([sample(p, 2, right=1) for p in RIGHT])
    metrics = set_metrics(samples, 1, FIELDS, ["level"], token_budgets=BUDGETS)
    set_result = {"step": steps[-1], "set": "math", "sampling": {"n": 1}, "metrics": metrics}
    result = {
        "step": steps[-1],
        "checkpoint": "average",
        "weights_id": "w-average",
        "eval_name": "default",
        "time": 0.0,
        "sets": {"math": set_result},
        "average": {"last": last, "steps": list(steps)},
    }
    write_result(RunLayout(run).eval_dir("default") / f"average_last_{last}", result, {"math": samples})


@pytest.fixture
def evaluated_run(tmp_path):
    return write_evaluated_run(tmp_path / "runs" / "r")


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evaluator.report", *args],
        check=False,
        cwd=REPO,
        env=service_env(COLUMNS="100"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_diff_lists_learned_and_forgotten_problems_side_by_side(evaluated_run):
    proc = report(str(evaluated_run), "--diff", "100", "200")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[math] step 100 -> step 200: 1 learned, 1 forgotten" in out
    assert "[math] step 100 -> step 200: accuracy +0.0 points" in out
    assert "p = 1 (exact McNemar, 12 problems): not distinguishable from noise" in out
    signal = report(str(evaluated_run), "--diff", "0", "100").stdout
    assert "accuracy +83.3 points" in signal and "p = 0.00195 (exact McNemar, 12 problems): distinguishable" in signal
    assert "== LEARNED: problem 2   reference answer: 42" in out
    assert "== FORGOTTEN: problem 1   reference answer: 42" in out
    learned = out.split("== LEARNED")[1].split("== FORGOTTEN")[0]
    # both responses, side by side: the old one on the left, the new one on the right of the same line
    line = next(ln for ln in learned.splitlines() if "reasoning of step 1" in ln)
    assert "|" in line and "reasoning of step 2" in line.split("|", 1)[1]
    assert "step 100 (0/1 right; sample 0, wrong):" in learned
    bad = report(str(evaluated_run), "--diff", "100", "300")
    assert bad.returncode != 0 and "no samples of set 'math' at step 300" in bad.stderr
    unknown = report(str(evaluated_run), "--diff", "0", "100", "--set", "aime")
    assert unknown.returncode != 0 and "--set aime: no such set" in unknown.stderr


def test_results_record_flips_and_the_table_shows_them(evaluated_run):
    result = json.loads((RunLayout(evaluated_run).eval_dir("default") / "step_00000200.json").read_text())
    assert result["sets"]["math"]["changes"] == {"vs_step": 100, "learned": [2], "forgotten": [1]}
    proc = report(str(evaluated_run))
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines() if ln.strip()[:1].isdigit()}
    assert rows["100"][1] == "0.917" and rows["100"][6:8] == ["10", "0"]  # accuracy; learned problems 0, 3, 4-11
    assert rows["200"][1] == "0.917" and rows["200"][6:8] == ["1", "1"]
    low, high = map(float, rows["100"][2].split("-"))  # its 95 % interval
    assert low < 11 / 12 <= high
    assert rows["100"][8] == "+0.833" and rows["200"][8] == "+0.000~"  # 10 flips up: signal; 1 up, 1 down: noise
    assert "~ = not distinguishable from noise" in proc.stdout
    assert "best: step 200 by accuracy 0.917" in proc.stdout
    assert "chosen on the same 12 problems it is reported on" in proc.stdout


def test_png_and_html_report_render_in_a_browser(tmp_path):
    evaluated_run = write_evaluated_run(tmp_path / "runs" / "r", audited=True)
    write_average(evaluated_run)
    proc = report(str(evaluated_run))
    assert proc.returncode == 0, proc.stderr
    eval_dir = RunLayout(evaluated_run).eval_dir("default")
    page, png = eval_dir / "report.html", eval_dir / "report.png"
    assert f"report: {page}" in proc.stdout and f"figure: {png}" in proc.stdout
    text = page.read_text()
    for title in (
        "Training: loss and learning rate",
        "math: accuracy, pass@k, maj@k (bands: 95 % intervals)",
        "math: accuracy by token budget",
        "math: accuracy by level over steps",
        "math: response length and truncation",
        "math: why samples are wrong",
        "math: problems learned / forgotten",
        "math: grader audit (agreement of our verdicts with two independent graders)",
    ):
        assert title in text, title
    # the grader audit: its line, its columns, the disputed flip marked, the averaged checkpoint as a row and a star
    assert "grader audit at step avg_last_2@200 (grader unversioned): our verdicts agree with math-verify" in text
    assert "<th>grader/agreement_math_verify</th>" in text and "<th>grader/undecided_rate</th>" in text
    assert "learned [<span class='disputed'>2*</span>], forgotten [1]" in text
    assert "* graders disagree (on a sample of the problem, at either step" in text
    assert "<td>avg_last_2@200</td>" in text and "averaged checkpoints (accuracy)" in text
    assert "best: avg_last_2@200 (an averaged checkpoint: the mean of the weights of steps 100, 200)" in text
    assert "--diff 100 200 --set math" in text
    assert "fill-opacity: 0.18" in text  # the band of the accuracy interval (n = 1: no pass@k, maj@k curves)
    assert "change from the step before: noise" in text  # the noise ring on step 200's accuracy
    verdicts = text.split("Changes between consecutive steps")[1].split("<h2>")[0]
    assert "<li class='signal'>math step 0 &rarr; 100: accuracy +83.3 points" in verdicts
    assert "<li class='noise'>math step 100 &rarr; 200: accuracy +0.0 points" in verdicts
    assert "not distinguishable from noise" in verdicts
    assert "<td class='noise'" in text and "+0.000~ noise</td>" in text  # the table marks the step
    assert "chosen on the same 12 problems it is reported on" in text
    # self-contained: nothing loaded from elsewhere (the heatmaps' images are inline data)
    assert not re.search(r'(?:src|href)="(?!data:|#)', text) and "<link" not in text and "<script" not in text
    from PIL import Image

    assert Image.open(png).size[0] >= 1000
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs it where apt-get can)")
    shot = tmp_path / "shot.png"
    chromium(page, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}")
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram)  # not a blank page: the charts drew
    shutil.copy(shot, eval_dir / "report-screenshot.png")
    # the page as the browser parsed it: the new parts are elements, not stray text
    dom = chromium(page, tmp_path, "--dump-dom").stdout
    assert '<span class="disputed">2*</span>' in dom and '<p class="disputed">* graders disagree' in dom
    assert '<p class="audit">grader audit at step avg_last_2@200' in dom
    assert dom.count("<figure>") == 8  # train; accuracy, budget, level, length, failures, audit, flips of math


def chromium(page, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on the page, offline, with a throwaway profile."""
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            *flags,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_a_split_set_reports_the_chosen_steps_held_out_score(tmp_path):
    """With select_fraction, best is chosen on select/accuracy and the report gives heldout/accuracy, labelled."""
    from evaluator.metrics import split_problems
    from evaluator.report import best_choice, load_results

    run = write_evaluated_run(tmp_path / "runs" / "split", select_fraction=0.5)
    results = load_results(RunLayout(run).eval_dir("default"))
    select, heldout = split_problems(RIGHT, 0.5, 0)
    by_step = {i: sum(RIGHT[p][i] for p in heldout) / len(heldout) for i in range(3)}
    chosen_index = max(range(3), key=lambda i: (sum(RIGHT[p][i] for p in select), i))
    note = best_choice(results, "math", "accuracy")
    assert note.startswith(f"best: step {(0, 100, 200)[chosen_index]} by accuracy on the selection part (6 problems)")
    assert f"held out (6 problems, not used to choose): {by_step[chosen_index]:.3f} [" in note
    proc = report(str(run))
    assert proc.returncode == 0, proc.stderr and note in proc.stdout
    assert note in (RunLayout(run).eval_dir("default") / "report.html").read_text()


def test_wandb_gets_per_set_metrics_a_sample_table_and_a_table_of_flipped_problems(
    evaluated_run, make_config, tmp_path
):
    """The evaluator's W&B logging, into real offline W&B files, read back from them."""
    from evaluator.evaluation import Evaluator
    from shared.config import load_config
    from shared.tracking import Tracker, read_wandb_rows

    cfg = load_config(make_config({"wandb": {"mode": "offline"}, "evaluation": {"num_logged_samples": 3}}), [])
    eval_dir = RunLayout(evaluated_run).eval_dir("default")
    result = json.loads((eval_dir / "step_00000200.json").read_text())
    samples = [
        json.loads(line) for line in (eval_dir / "math" / "step_00000200.samples.jsonl").read_text().splitlines()
    ]
    tracker = Tracker(cfg, "eval", "train_step", tmp_path / "wb")
    evaluator = Evaluator(cfg, None, tracker)  # only its logging is used: no engine
    try:
        evaluator.log(result, {"math": samples})
    finally:
        evaluator.grader.close()
        tracker.finish()
    rows = read_wandb_rows(tmp_path / "wb" / "wandb")
    metrics = next(row for row in rows if "eval/math/accuracy" in row)
    assert metrics["train_step"] == 200 and metrics["eval/math/learned"] == 1
    assert metrics["eval/math/changes_vs_step"] == 100  # what the learned/forgotten counts are counted against
    assert "eval/math/failure_rate/wrong" in metrics
    tables = {k.rsplit("/", 1)[0]: row for row in rows for k in row if k.endswith("/_type")}
    assert tables["eval/math/samples"]["eval/math/samples/nrows"] == 3
    assert tables["eval/math/samples"]["eval/math/samples/ncols"] == 9
    assert tables["eval/math/flips"]["eval/math/flips/nrows"] == 2  # problem 2 learned, problem 1 forgotten
    assert all(row["train_step"] == 200 for row in tables.values())


def test_flips_are_counted_only_against_the_same_problems_and_samples(evaluated_run, caplog):
    from evaluator.evaluation import previous_samples

    eval_dir = RunLayout(evaluated_run).eval_dir("default")
    now = {"set": "math", "step": 300, "problems_id": None, "sampling": {"n": 1}}  # the fixture's have no id
    step, samples = previous_samples(eval_dir, now)
    assert step == 200 and [s["problem"] for s in samples] == list(RIGHT)
    assert previous_samples(eval_dir, {**now, "problems_id": "another data set"}) is None
    assert previous_samples(eval_dir, {**now, "sampling": {"n": 4}}) is None
    assert previous_samples(eval_dir, {**now, "sampling": {"n": 1, "temperature": 0.6}}) is None  # another test
    (eval_dir / "math" / "step_00000200.samples.jsonl").write_text('{"problem": 0}\n{not json\n')
    assert previous_samples(eval_dir, now)[0] == 100  # the damaged file is named and passed over
    out = caplog.text  # the evaluator's warnings, through logging
    assert "step_00000200.json: not used to count learned/forgotten problems" in out
    assert "step_00000200.samples.jsonl:2: not valid JSON" in out


def test_the_report_counts_flips_only_against_the_line_above_and_drops_stale_counts(evaluated_run):
    """Step 200's stored counts are against step 100. Without step 100's samples the report cannot count step
    200 against the line above: it shows no count rather than the stored one."""
    from evaluator.report import load_results

    eval_dir = RunLayout(evaluated_run).eval_dir("default")
    (eval_dir / "math" / "step_00000100.samples.jsonl").unlink()
    by_step = {r["step"]: r["sets"]["math"] for r in load_results(eval_dir)}
    assert "learned" not in by_step[200]["metrics"] and by_step[200]["changes"]["vs_step"] is None
    # step 100's own samples are gone: its stored counts (10 learned against step 0) are not shown either
    assert "learned" not in by_step[100]["metrics"] and by_step[100]["changes"]["vs_step"] is None
    stored = json.loads((eval_dir / "step_00000100.json").read_text())["sets"]["math"]["metrics"]
    assert stored["learned"] == 10


def test_the_train_log_of_a_resumed_run_keeps_only_the_resumed_rows(evaluated_run):
    """A run stopped at step 200 and resumed from a checkpoint at 150, now logging every 10 steps: steps 151-200
    were trained over again, so the abandoned run's rows from 151 on go, even those the new one does not log."""
    from evaluator.report import load_train_log

    again = [{"train_step": s, "train/loss": 9.0, "train/lr": 1e-4} for s in range(160, 240, 10)]
    with open(evaluated_run / "train_log.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in again))
    rows = load_train_log(evaluated_run)
    assert [r["train_step"] for r in rows] == [*range(1, 160), *range(160, 240, 10)]
    assert rows[158]["train/loss"] == 2.0 / 159 and all(r["train/loss"] == 9.0 for r in rows[159:])


def table_rows(out: str) -> dict[str, list[str]]:
    """The table's lines by their step label, split on blanks (a row without learned/forgot/vs prev is shorter)."""
    return {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit() or ln.strip()[:3] == "avg"}


AGREE_MV, AGREE_STR, DISAGREE, UNDECIDED = 9, 10, 11, 12  # columns of a full row (n = 1: no pass@k, maj@k)


def test_the_grader_audit_is_in_the_table_and_a_disputed_flip_is_marked(tmp_path):
    run = write_evaluated_run(tmp_path / "runs" / "r", audited=True)
    eval_dir = RunLayout(run).eval_dir("default")
    proc = report(str(run))
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert rows["200"][AGREE_MV : UNDECIDED + 1] == [f"{11 / 12:.3f}", "1.000", "1/0", "0.000"]
    assert rows["100"][AGREE_MV : UNDECIDED + 1] == ["1.000", "1.000", "0/0", "0.000"]
    disagreements = eval_dir / "math" / "step_00000200.disagreements.jsonl"
    assert (
        f"grader audit at step 200 (grader unversioned): our verdicts agree with math-verify alone on 0.917 of the "
        "samples it judged (disagreeing on 1), with the string match on 1.000 (disagreeing on 0); undecided 0.000. "
        f"The disagreeing samples: {disagreements}"
    ) in proc.stdout
    assert [json.loads(line)["problem"] for line in disagreements.read_text().splitlines()] == [2]
    diff = report(str(run), "--diff", "100", "200")
    assert diff.returncode == 0, diff.stderr
    assert "[math] step 100 -> step 200: 1 of the 2 flips marked * graders disagree" in diff.stdout
    assert "== LEARNED*: problem 2   reference answer: 42" in diff.stdout
    assert "   * graders disagree: math_verify at step 200 (see the disagreements files)" in diff.stdout
    assert "== FORGOTTEN: problem 1   reference answer: 42" in diff.stdout  # not disputed: no mark
    assert "learned [<span class='disputed'>2*</span>], forgotten [1]" in (eval_dir / "report.html").read_text()


def test_grader_versions_never_mix_in_one_curve(tmp_path):
    """Steps 0 and 100 graded by g1, step 200 by g2: a loud warning, one accuracy series per version, no flip or
    paired change counted from 100 to 200; --grader picks one version and names the steps it leaves out."""
    from evaluator.report import load_graded

    run = write_evaluated_run(tmp_path / "runs" / "r", audited=True, versions=("g1", "g1", "g2"))
    eval_dir = RunLayout(run).eval_dir("default")
    proc = report(str(run))
    assert proc.returncode == 0, proc.stderr
    warning = "WARNING: [math] results graded by 2 grader versions (grader g1: steps 0, 100; grader g2: steps 200)"
    assert warning in proc.stdout and "no flip or paired change is counted across versions" in proc.stdout
    assert "python -m evaluator.regrade regrades every step" in proc.stdout  # no version has every step
    rows = table_rows(proc.stdout)
    assert rows["100"][6:8] == ["10", "0"] and rows["200"][6] == f"{11 / 12:.3f}"  # 200: no learned/forgot/vs prev
    assert rows["100"][-3] == "g1" and rows["200"][-3] == "g2"  # the grader column, before the top failure
    results, _ = load_graded(eval_dir)
    assert results[2]["sets"]["math"]["changes"]["vs_step"] is None and "paired" not in results[2]["sets"]["math"]
    page = (eval_dir / "report.html").read_text()
    assert f"<p class='warning'>{warning}" in page
    assert "accuracy (mean@1) [grader g1]" in page and "accuracy (mean@1) [grader g2]" in page  # two series
    one = report(str(run), "--grader", "g1")
    assert one.returncode == 0, one.stderr
    assert "grader g1: every step shown has that grader's metrics" in one.stdout
    assert "WARNING: left out: step 200 [math]: graded by g2, not by g1" in one.stdout
    assert set(table_rows(one.stdout)) == {"0", "100"} and (eval_dir / "report.grader-g1.html").is_file()
    unknown = report(str(run), "--grader", "nope")
    assert unknown.returncode != 0 and "--grader nope: no result in" in unknown.stderr
    assert "(versions there: g1, g2;" in unknown.stderr
    diff = report(str(run), "--diff", "100", "200")
    assert "WARNING: step 100 was graded by grader g1, step 200 by g2" in diff.stdout
    assert "no metrics of grader g1" in report(str(run), "--diff", "100", "200", "--grader", "g1").stderr


def test_the_grader_switch_shows_a_regrades_metrics_and_samples(tmp_path):
    """An older grader took problem 5's right answer at step 200 for wrong; the real regrade command grades it
    again; --grader <its version> shows the regrade's accuracy, flips (from its samples file) and audit."""
    from evaluator.grader import grader_version
    from shared.protocol import result_file, samples_file

    run = write_evaluated_run(tmp_path / "runs" / "r")
    eval_dir = RunLayout(run).eval_dir("default")
    path = samples_file(eval_dir, "math", 200)
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    samples[5].update(reward=0.0, answer_reward=0.0, failure="wrong")
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    for result_path, key in ((result_file(eval_dir, 200), ("sets", "math")), (result_file(eval_dir, 200, "math"), ())):
        result = json.loads(result_path.read_text())
        holder = result["sets"]["math"] if key else result
        holder["metrics"]["accuracy"] = 10 / 12
        result_path.write_text(json.dumps(result))
    regraded = subprocess.run(
        [sys.executable, "-m", "evaluator.regrade", str(run), "--workers", "1"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert regraded.returncode == 0, regraded.stderr
    version = grader_version()
    before, after = report(str(run)), report(str(run), "--grader", version)
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr
    old, new = table_rows(before.stdout)["200"], table_rows(after.stdout)["200"]
    assert old[1] == "0.833" and old[6:8] == ["1", "2"] and old[AGREE_MV] == "-"  # problems 1 and 5 forgotten
    assert new[1] == "0.917" and new[6:8] == ["1", "1"] and new[AGREE_MV] == "1.000"  # the regrade's, audited
    assert f"grader audit at step 200 (grader {version})" in after.stdout
    assert f"step_00000200.grader-{version}.disagreements.jsonl" in after.stdout
    assert (eval_dir / f"report.grader-{version}.html").is_file()
    samples_file(eval_dir, "math", 100).unlink()  # --diff --grader reads the regraded samples, not these
    diff = report(str(run), "--diff", "100", "200", "--grader", version)
    assert diff.returncode == 0, diff.stderr
    assert "[math] step 100 -> step 200: 1 learned, 1 forgotten" in diff.stdout
    assert report(str(run), "--diff", "100", "200").returncode != 0


def test_averaged_checkpoints_are_loaded_compared_and_ranked_as_averages(tmp_path):
    from evaluator.report import load_results, step_label

    run = write_evaluated_run(tmp_path / "runs" / "r", audited=True)
    write_average(run)
    eval_dir = RunLayout(run).eval_dir("default")
    results = load_results(eval_dir)
    assert [step_label(r) for r in results] == ["0", "100", "200", "avg_last_2@200"]
    average = results[3]["sets"]["math"]
    # counted from its own samples (every problem right) against the line above, step 200 (problem 1 wrong there)
    assert average["changes"]["vs_step"] == 200 and average["changes"]["learned"] == [1]
    proc = report(str(run))
    assert proc.returncode == 0, proc.stderr
    assert table_rows(proc.stdout)["avg_last_2@200"][1] == "1.000"
    assert (
        "best: avg_last_2@200 (an averaged checkpoint: the mean of the weights of steps 100, 200) by accuracy 1.000"
    ) in proc.stdout
    assert "; the best trained step: 200 (0.917)" in proc.stdout
    assert "--diff 200 200" not in (eval_dir / "report.html").read_text()  # --diff compares trained steps
    bad = eval_dir / "average_last_2" / "step_00000200.json"
    bad.write_text(json.dumps({"step": 200, "sets": {}}))
    proc = report(str(run))
    assert proc.returncode != 0 and f"{bad}: in an averaged checkpoint's folder but without an 'average'" in proc.stderr
