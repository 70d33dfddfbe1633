"""The evaluator as a real process: real watchdog observers, real files, the hf backend, the tiny model."""

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import flip_byte, ledger_of, publish_copy, run_service, start_service, wait_for
from shared.protocol import READY, RunLayout, Status


def results(run_dir, name="default"):
    d = RunLayout(run_dir).eval_dir(name)
    return {int(p.stem[5:]): json.loads(p.read_text()) for p in d.glob("step_*.json")}


def status_of(run_dir, step):
    return ledger_of(run_dir).get(step, {}).get("status")


@pytest.fixture
def evaluator(tmp_path, make_config):
    """Start `python -m evaluator` on tmp_path/runs/tiny with config updates; stopped at the end."""
    procs = []

    def start(updates=None, *extra, name="eval"):
        cfg = make_config(updates, name=f"{name}.yaml")
        proc = start_service(
            "evaluator", "--config", cfg, "--run", tmp_path / "runs" / "tiny", *extra, log=tmp_path / f"{name}.log"
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def log_text(tmp_path, name="eval"):
    return (tmp_path / f"{name}.log").read_text()


@pytest.mark.parametrize("observer", ["auto", "polling"])
def test_new_checkpoint_is_picked_up_by_the_observer(trained_run, tmp_path, evaluator, observer):
    run = tmp_path / "runs" / "tiny"
    # rescan_s is long: only the observer can make this fast.
    proc = evaluator({"evaluation": {"observer": observer, "rescan_s": 600}})
    wait_for(lambda: "watching" in log_text(tmp_path), 60, "evaluator start")
    publish_copy(RunLayout(trained_run).checkpoint_dir(2), run, 2)
    wait_for(lambda: status_of(run, 2) == Status.DONE, 60, "step 2 evaluated")
    r = results(run)[2]
    assert r["sets"]["main"]["metrics"]["num_problems"] == 8 and r["load"] == "new-engine"
    assert ("(native;" if observer == "auto" else "(polling;") in log_text(tmp_path)
    # A second checkpoint swaps weights into the same engine.
    publish_copy(RunLayout(trained_run).checkpoint_dir(6), run, 6)
    wait_for(lambda: status_of(run, 6) == Status.DONE, 60, "step 6 evaluated")
    assert results(run)[6]["load"] == "in-place"
    assert proc.poll() is None


def test_checkpoints_present_before_start_newest_first_then_skipped(run_copy, tmp_path, evaluator):
    evaluator()
    wait_for(lambda: status_of(run_copy, 6) == Status.DONE, 60, "step 6")
    assert status_of(run_copy, 2) == status_of(run_copy, 4) == Status.SKIPPED
    assert set(results(run_copy)) == {6}


def test_backfill_evaluates_passed_over_checkpoints_newest_first(run_copy, tmp_path, evaluator):
    evaluator({"evaluation": {"backfill": True}})
    wait_for(lambda: all(status_of(run_copy, s) == Status.DONE for s in (0, 2, 4, 6)), 90, "all steps")
    finished = sorted(results(run_copy).values(), key=lambda r: r["time"])
    assert [r["step"] for r in finished] == [6, 4, 2, 0]


def test_duplicate_events_do_not_evaluate_twice(trained_run, tmp_path, evaluator):
    run = tmp_path / "runs" / "tiny"
    evaluator()
    wait_for(lambda: "watching" in log_text(tmp_path), 60, "evaluator start")
    ckpt = publish_copy(RunLayout(trained_run).checkpoint_dir(2), run, 2)
    wait_for(lambda: status_of(run, 2) == Status.DONE, 60, "step 2")
    marker = ckpt / READY
    for _ in range(5):  # the same READY rewritten and touched: events, but nothing new
        marker.write_text(marker.read_text())
        time.sleep(0.05)
    time.sleep(2)
    assert ledger_of(run)[2]["status"] == Status.DONE and ledger_of(run)[2].get("attempts", 1) == 1
    assert log_text(tmp_path).count("step        2: main: acc") == 1
    assert len(RunLayout(run).eval_dir("default").joinpath("eval_log.jsonl").read_text().splitlines()) == 1


def test_failed_verification_is_recorded_and_the_evaluator_goes_on(trained_run, tmp_path, evaluator):
    run = tmp_path / "runs" / "tiny"
    ckpt = publish_copy(RunLayout(trained_run).checkpoint_dir(2), run, 2)
    flip_byte(ckpt / "model.safetensors", -5)
    proc = evaluator()
    wait_for(lambda: status_of(run, 2) == Status.FAILED, 60, "step 2 failed")
    assert "content hash mismatch" in ledger_of(run)[2]["reason"]
    publish_copy(RunLayout(trained_run).checkpoint_dir(4), run, 4)
    wait_for(lambda: status_of(run, 4) == Status.DONE, 60, "step 4")
    assert proc.poll() is None
    assert 2 not in results(run)
    time.sleep(1.5)  # a rescan passes: the failed one is not retried
    assert status_of(run, 2) == Status.FAILED


def test_checkpoint_deleted_before_evaluation_is_recorded(trained_run, tmp_path, evaluator):
    run = tmp_path / "runs" / "tiny"
    ckpt = publish_copy(RunLayout(trained_run).checkpoint_dir(2), run, 2)
    (ckpt / "model.safetensors").unlink()  # retention (or a user) removing it while it is listed
    proc = evaluator()
    wait_for(lambda: status_of(run, 2) == Status.FAILED, 60, "step 2 failed")
    assert "missing file" in ledger_of(run)[2]["reason"]
    shutil.rmtree(ckpt)
    publish_copy(RunLayout(trained_run).checkpoint_dir(4), run, 4)
    wait_for(lambda: status_of(run, 4) == Status.DONE, 60, "step 4")
    assert proc.poll() is None


def test_sigint_stops_cleanly_and_gives_the_claim_back(run_copy, tmp_path, evaluator):
    slow = {"evaluation": {"num_samples": 40, "max_tokens": 64, "hf_batch_size": 1}}
    proc = evaluator(slow)
    wait_for(lambda: status_of(run_copy, 6) == Status.RUNNING, 60, "evaluation running")
    presence = RunLayout(run_copy).presence_dir
    eval_dir = RunLayout(run_copy).eval_dir("default")
    wait_for(
        lambda: [json.loads(p.read_text())["step"] for p in presence.glob("*.json")] == [6],
        30,
        "presence advancing on step 6",
    )
    assert [p.name[:13] for p in (eval_dir / "snapshots").iterdir()] == ["step_00000006"]  # loaded from there
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    assert not list(eval_dir.glob("step_00000006*"))  # no partial result
    assert not [p for p in eval_dir.iterdir() if p.name.startswith(".tmp")]
    assert not list(presence.glob("*.json")) and not list((eval_dir / "snapshots").iterdir())
    entry = ledger_of(run_copy)[6]
    assert entry["status"] == Status.PENDING and entry["given_back"] and entry["attempts"] == 0
    # A newer checkpoint arrives meanwhile: the given-back step is still evaluated (first), never skipped.
    publish_copy(RunLayout(run_copy).checkpoint_dir(6), run_copy, 8)
    evaluator(name="eval2")
    wait_for(lambda: status_of(run_copy, 6) == status_of(run_copy, 8) == Status.DONE, 120, "6 and 8 evaluated")
    # the summary line is printed just after the ledger says done
    wait_for(lambda: "step        8: main: acc" in log_text(tmp_path, "eval2"), 30, "step 8's line")
    log = log_text(tmp_path, "eval2")
    assert log.index("step        6: main: acc") < log.index("step        8: main: acc")
    assert "step 2: skipped (passed over for newer step 6)" in log_text(tmp_path)  # said when it happened


def test_sigkill_mid_evaluation_then_restart_evaluates_it_exactly_once(run_copy, tmp_path, evaluator):
    slow = {"evaluation": {"num_samples": 40, "max_tokens": 64, "hf_batch_size": 1, "backfill": True}}
    proc = evaluator(slow)
    wait_for(lambda: status_of(run_copy, 6) == Status.RUNNING, 60, "evaluation running")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not results(run_copy)
    evaluator(slow, name="eval2")
    wait_for(
        lambda: all(ledger_of(run_copy).get(s, {}).get("logged") for s in (0, 2, 4, 6)), 180, "all evaluated and logged"
    )
    entries = ledger_of(run_copy)
    assert entries[6]["attempts"] == 2 and entries[4]["attempts"] == 1
    assert "evaluating again" in log_text(tmp_path, "eval2")
    assert sorted(results(run_copy)) == [0, 2, 4, 6]
    logged = [
        json.loads(line)["train_step"]
        for line in RunLayout(run_copy).eval_dir("default").joinpath("eval_log.jsonl").read_text().splitlines()
    ]
    assert sorted(logged) == [0, 2, 4, 6]


def test_two_evaluators_never_evaluate_the_same_checkpoint(run_copy, tmp_path, evaluator):
    both = {"evaluation": {"backfill": True}}
    evaluator(both, name="a")
    evaluator(both, name="b")
    wait_for(lambda: all(status_of(run_copy, s) == Status.DONE for s in (0, 2, 4, 6)), 120, "all evaluated")
    time.sleep(1)
    a, b = log_text(tmp_path, "a"), log_text(tmp_path, "b")
    for step in (0, 2, 4, 6):
        assert (a + b).count(f"step {step:>8}: main: acc") == 1
    assert all(e.get("attempts") == 1 for e in ledger_of(run_copy).values())


def test_after_the_fact_single_checkpoint_run_and_copied_folder(run_copy, tmp_path, make_config):
    cfg = make_config()
    ckpt4 = RunLayout(run_copy).checkpoint_dir(4)
    out = run_service("evaluator", "--config", cfg, "--ckpt", ckpt4).stdout
    assert "step        4: main: acc" in out
    assert status_of(run_copy, 4) == Status.DONE and set(results(run_copy)) == {4}
    # the run: only what is missing, oldest first, then exit
    out = run_service("evaluator", "--config", cfg, "--run", run_copy, "--once").stdout
    assert out.index("step        2:") < out.index("step        6:") and "step        4:" not in out
    assert set(results(run_copy)) == {0, 2, 4, 6}
    # a checkpoint copied elsewhere, without its run (no ledger, no config)
    elsewhere = tmp_path / "old" / "step_00000004"
    shutil.copytree(ckpt4, elsewhere)
    out = run_service("evaluator", "--config", cfg, "--ckpt", elsewhere).stdout
    assert "step        4: main: acc" in out
    written = list((tmp_path / "old" / "eval" / "default").glob("*/step_00000004.json"))
    assert len(written) == 1
    # a plain model folder without READY is accepted with a warning
    plain = tmp_path / "plain_model"
    shutil.copytree(ckpt4, plain, ignore=shutil.ignore_patterns(READY, "trainer_state"))
    proc = run_service("evaluator", "--config", cfg, "--ckpt", plain)
    assert "integrity cannot be checked" in proc.stderr + proc.stdout and "main: acc" in proc.stdout


def test_after_the_fact_damaged_folder_is_refused_with_the_reason(run_copy, make_config):
    ckpt = RunLayout(run_copy).checkpoint_dir(2)
    with open(ckpt / "tokenizer.json", "ab") as f:
        f.write(b" ")
    proc = run_service("evaluator", "--config", make_config(), "--ckpt", ckpt, check=False)
    assert proc.returncode == 2
    size = (ckpt / "tokenizer.json").stat().st_size
    lines = proc.stderr.strip().splitlines()  # one line: the published file named, never the snapshot
    assert len(lines) == 1 and lines[0].endswith(
        f"{ckpt / 'tokenizer.json'}: size mismatch ({size} bytes on disk, {size - 1} in READY)"
    )
    assert not list(RunLayout(run_copy).eval_dir("default").glob("snapshots/*"))


def test_a_model_that_fails_to_load_is_recorded_and_the_evaluator_goes_on(trained_run, tmp_path, evaluator):
    """A checkpoint whose manifest verifies but whose weights are not a model (written wrong, not corrupted)."""
    from shared.protocol import publish_checkpoint

    run = tmp_path / "runs" / "tiny"
    layout = RunLayout(run)
    layout.checkpoints_dir.mkdir(parents=True)
    tmp = layout.tmp_checkpoint_dir(2)
    shutil.copytree(RunLayout(trained_run).checkpoint_dir(2), tmp, ignore=shutil.ignore_patterns(READY))
    (tmp / "model.safetensors").write_bytes(b"not a safetensors file")
    publish_checkpoint(tmp, layout.checkpoint_dir(2), 2, "test")
    proc = evaluator()
    wait_for(lambda: status_of(run, 2) == Status.FAILED, 60, "step 2 failed")
    assert (
        "cannot load model" in ledger_of(run)[2]["reason"]
        and str(layout.checkpoint_dir(2)) in ledger_of(run)[2]["reason"]
    )
    publish_copy(RunLayout(trained_run).checkpoint_dir(4), run, 4)
    wait_for(lambda: status_of(run, 4) == Status.DONE, 60, "step 4")
    assert proc.poll() is None


def test_results_are_tied_to_the_weights_not_the_step(trained_run, run_copy, tmp_path, make_config):
    """--ckpt A --out r, then --ckpt B --out r with B another run's checkpoint of the same step: once this printed
    A's accuracy for B. Now the same weights give the stored result, other weights are refused (or --force)."""
    cfg = make_config()
    out_dir = tmp_path / "results"
    a = RunLayout(trained_run).checkpoint_dir(4)
    other_run = tmp_path / "other" / "tiny"
    publish_copy(RunLayout(trained_run).checkpoint_dir(6), other_run, 4)  # other weights, published as step 4
    b = RunLayout(other_run).checkpoint_dir(4)
    first = run_service("evaluator", "--config", cfg, "--ckpt", a, "--out", out_dir).stdout
    weights_a = json.loads((out_dir / "step_00000004.json").read_text())["weights_id"]
    again = run_service("evaluator", "--config", cfg, "--ckpt", a, "--out", out_dir).stdout
    assert "already evaluated" in again and weights_a in again and "main: acc" in first
    refused = run_service("evaluator", "--config", cfg, "--ckpt", b, "--out", out_dir, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"already holds results for step 4 of other weights ({weights_a}" in refused.stderr
    assert json.loads((out_dir / "step_00000004.json").read_text())["weights_id"] == weights_a  # nothing lost
    run_service("evaluator", "--config", cfg, "--ckpt", b, "--out", out_dir, "--force")
    replaced = json.loads((out_dir / "step_00000004.json").read_text())
    assert replaced["weights_id"] != weights_a and replaced["checkpoint"] == str(b)
    # Two plain folders (no READY: both "step 0") collide the same way.
    plain_out = tmp_path / "plain_results"
    for i, src in enumerate((a, b)):
        shutil.copytree(src, tmp_path / f"plain{i}", ignore=shutil.ignore_patterns(READY, "trainer_state"))
    run_service("evaluator", "--config", cfg, "--ckpt", tmp_path / "plain0", "--out", plain_out)
    clash = run_service("evaluator", "--config", cfg, "--ckpt", tmp_path / "plain1", "--out", plain_out, check=False)
    assert clash.returncode == 2 and "already holds results for step 0 of other weights" in clash.stderr


def test_a_replaced_step_is_evaluated_again_by_the_watcher(trained_run, tmp_path, make_config):
    run = tmp_path / "runs" / "tiny"
    cfg = make_config()
    publish_copy(RunLayout(trained_run).checkpoint_dir(2), run, 2)
    run_service("evaluator", "--config", cfg, "--run", run, "--once")
    first = results(run)[2]["weights_id"]
    shutil.rmtree(RunLayout(run).checkpoint_dir(2))  # as after a corrupt step was moved aside and trained again
    publish_copy(RunLayout(trained_run).checkpoint_dir(4), run, 2)
    out = run_service("evaluator", "--config", cfg, "--run", run, "--once").stdout
    assert "its folder holds new weights since it was last seen" in out
    assert results(run)[2]["weights_id"] != first and ledger_of(run)[2]["weights_id"] == results(run)[2]["weights_id"]


def test_run_that_is_not_a_run_is_an_error_and_nothing_is_created(tmp_path, make_config):
    nope = tmp_path / "runs" / "nope"
    proc = run_service("evaluator", "--config", make_config(), "--run", nope, "--once", check=False)
    assert proc.returncode == 2 and "not a run folder (no config.yaml and no checkpoints/)" in proc.stderr
    assert not nope.exists()


def test_nothing_to_do_prints_one_summary_line(run_copy, make_config):
    cfg = make_config()
    run_service("evaluator", "--config", cfg, "--run", run_copy, "--once")
    out = run_service("evaluator", "--config", cfg, "--run", run_copy, "--once").stdout
    assert f"evaluator: {run_copy}: 4 checkpoint(s) on disk; ledger: 4 done; evaluated 0 now, 0 failed" in out


def test_the_evaluator_points_best_at_the_best_result_and_evaluates_it_by_that_name(run_copy, make_config):
    cfg = make_config({"training": {"keep_best": {"k": 1, "metric": "format_rate"}}})
    out = run_service("evaluator", "--config", cfg, "--run", run_copy, "--once").stdout
    layout = RunLayout(run_copy)
    rates = {s: r["sets"]["main"]["metrics"]["format_rate"] for s, r in results(run_copy).items()}
    best = max(rates, key=lambda s: (rates[s], s))  # among equals, the later step
    assert layout.best_path.resolve() == layout.checkpoint_dir(best).resolve()
    assert f"best: step {best} by main format_rate" in out
    again = run_service("evaluator", "--config", cfg, "--ckpt", layout.best_path).stdout
    assert f"already evaluated: {layout.result_path('default', best)}" in again


def test_results_written_but_not_logged_are_logged_once_after_a_crash(run_copy, make_config):
    """A crash between writing results and logging them: the next evaluator logs them, once."""
    cfg = make_config()
    run_service("evaluator", "--config", cfg, "--run", run_copy, "--once")
    eval_dir = RunLayout(run_copy).eval_dir("default")
    log = eval_dir / "eval_log.jsonl"
    log.unlink()
    from shared.protocol import Ledger

    Ledger(eval_dir).update(lambda e: e[4].update(logged=False, log_owner={"id": "crashed-evaluator"}))
    out = run_service("evaluator", "--config", cfg, "--run", run_copy, "--once").stdout
    assert "step 4: logging results that an earlier evaluator wrote but did not log" in out
    assert [json.loads(line)["train_step"] for line in log.read_text().splitlines()] == [4]
    assert ledger_of(run_copy)[4]["logged"] is True and "log_owner" not in ledger_of(run_copy)[4]
    run_service("evaluator", "--config", cfg, "--run", run_copy, "--once")
    assert len(log.read_text().splitlines()) == 1  # never again


def test_ledger_says_done_only_after_samples_then_metrics_are_on_disk(run_copy, make_config, monkeypatch):
    """In-process, with the real hf backend: the order of writes of one recording."""
    import shared.protocol as protocol
    from evaluator.backends import make_backend
    from evaluator.evaluation import Evaluator
    from evaluator.serving import serve_run
    from shared.config import load_config

    cfg = load_config(make_config(), [])
    layout = RunLayout(run_copy)
    eval_dir = layout.eval_dir("default")
    seen = []
    real = protocol.atomic_write_bytes

    def spy(path, data):
        path = type(eval_dir)(path)
        if path.name == "ledger.json" and b'"done"' in data:
            done = [int(k) for k, v in json.loads(data).items() if v["status"] == "done"]
            seen.append(("ledger", done, {s: (eval_dir / f"step_{s:08d}.json").exists() for s in done}))
        elif path.parent == eval_dir / "main" and path.name.startswith("step_"):
            kinds = {".samples.jsonl": "set samples", ".disagreements.jsonl": "set disagreements"}
            kind = next((k for suffix, k in kinds.items() if path.name.endswith(suffix)), "set metrics")
            seen.append((kind, path.name[:13], None))
        elif path.parent == eval_dir and path.name.startswith("step_"):
            seen.append(("metrics", path.name[:13], None))
        real(path, data)

    monkeypatch.setattr(protocol.durable, "atomic_write_bytes", spy)
    import evaluator.audit as audit
    import evaluator.recording as recording

    monkeypatch.setattr(recording, "atomic_write_bytes", spy)
    monkeypatch.setattr(audit, "atomic_write_bytes", spy)
    evaluator = Evaluator(cfg, make_backend(cfg.evaluation, False), None)
    try:
        serve_run(cfg, layout, evaluator, once=True, force=False)
    finally:
        evaluator.close()
    writes = [(kind, name) for kind, name, _ in seen if kind != "ledger"]
    assert writes == [
        (kind, f"step_{step:08d}")
        for step in (0, 2, 4, 6)
        for kind in ("set samples", "set disagreements", "set metrics", "metrics")
    ]
    assert all(all(exists.values()) for kind, _, exists in seen if kind == "ledger")


def test_stale_weights_after_an_in_place_reload_are_caught_and_the_engine_rebuilt(
    trained_run, make_config, caplog, tmp_path
):
    """A backend whose in-place reload silently keeps the old weights (a known vLLM failure): the fingerprint
    check sees outputs unchanged for other weights and rebuilds, so step 6 is measured on step 6's weights."""
    from evaluator.backends import HFBackend
    from evaluator.evaluation import Evaluator
    from shared.config import load_config
    from shared.protocol import read_manifest, weights_id

    class KeepsOldWeights(HFBackend):
        def load(self, ckpt_dir):
            if self.signature is not None and self.model is not None:
                return "in-place"  # claims success, changes nothing
            return super().load(ckpt_dir)

    cfg = load_config(make_config(), [])
    layout = RunLayout(trained_run)
    evaluator = Evaluator(cfg, KeepsOldWeights(cfg.evaluation, False), None)
    honest = Evaluator(cfg, HFBackend(cfg.evaluation, False), None)
    try:
        for step in (2, 6):
            ckpt = layout.checkpoint_dir(step)
            result, samples = evaluator.evaluate(step, ckpt, weights_id(read_manifest(ckpt)), tmp_path)
        _, expected_samples = honest.evaluate(6, layout.checkpoint_dir(6), "x", tmp_path)
    finally:
        evaluator.close()
        honest.close()
    assert "outputs unchanged after an in-place reload of different weights; rebuilding the engine" in caplog.text
    assert result["load"] == "new-engine"
    assert [s["response"] for s in samples["main"]] == [s["response"] for s in expected_samples["main"]]


SETS = {
    "greedy": {},
    "sampled": {"n": 3, "temperature": 1.0, "num_samples": 4, "breakdown_fields": ["kind"]},
}


def test_several_sets_share_one_load_and_samples_do_not_depend_on_history(trained_run, make_config, tmp_path):
    """Two sets (one sampled, n=3) per checkpoint with one weight load; evaluating step 6, then 2, then 6
    again gives step 6 the same samples: each request's seed depends on what it samples, not on history."""
    from evaluator.backends import Generation, make_backend
    from evaluator.evaluation import Evaluator
    from shared.config import load_config

    cfg = load_config(make_config({"evaluation": {"sets": SETS}}), [])
    backend = make_backend(cfg.evaluation, False)
    loads = []
    real_load = backend.load
    backend.load = lambda ckpt_dir: loads.append(ckpt_dir) or real_load(ckpt_dir)  # a spy on the real load
    evaluator = Evaluator(cfg, backend, None)
    # The tiny model answers nothing right yet: every other greedy response is made right after generation, so
    # that a grade given to another set's or another problem's sample shows.
    answers = {prompt: ex.answer for es in evaluator.sets for ex, prompt in zip(es.examples, es.prompts, strict=True)}
    real_generate = backend.generate

    def generate(prompts, seeds, sampling, progress=None):
        generated = real_generate(prompts, seeds, sampling, progress)
        for i in range(0, len(generated), 2) if sampling.name == "greedy" else ():
            generated[i] = Generation(f"so </think> <answer>{answers[prompts[i]]}</answer>", 9, False)
        return generated

    backend.generate = generate
    layout = RunLayout(trained_run)
    try:
        first, first_samples = evaluator.evaluate(6, layout.checkpoint_dir(6), "w6", tmp_path)
        evaluator.evaluate(2, layout.checkpoint_dir(2), "w2", tmp_path)
        _, again_samples = evaluator.evaluate(6, layout.checkpoint_dir(6), "w6", tmp_path)
    finally:
        evaluator.close()
    assert len(loads) == 3  # one per checkpoint, for both sets
    assert list(first["sets"]) == ["greedy", "sampled"]
    sampled = first_samples["sampled"]
    assert len(first_samples["greedy"]) == 8 and len(sampled) == 4 * 3
    metrics = first["sets"]["sampled"]["metrics"]
    assert {"pass@1", "pass@2", "pass@3", "maj@1", "maj@2", "maj@3", "accuracy_truncated"} <= set(metrics)
    assert any(k.startswith("accuracy_by/kind/type") for k in metrics)
    assert first["sets"]["sampled"]["sampling"]["n"] == 3
    # the n samples of a problem differ (temperature 1), and are the same the second time
    assert len({s["response"] for s in sampled if s["problem"] == sampled[0]["problem"]}) > 1
    assert [s["response"] for s in sampled] == [s["response"] for s in again_samples["sampled"]]
    assert all(s["failure"] in (None, "truncated", "format", "no_answer", "wrong") for s in sampled)
    # each sample keeps its own grade
    from evaluator.grader import grade

    graded = [s for set_samples in first_samples.values() for s in set_samples]
    assert [s["reward"] for s in first_samples["greedy"]] == [1.0, 0.0] * 4
    assert all(s["reward"] == grade(s["response"], s["ground_truth"])["reward"] for s in graded)
    assert {"reload", "generation", "grading", "total"} <= set(first["timings_s"])
    assert first["generated_tokens_per_s"] > 0


def test_a_restarted_evaluator_gives_the_same_samples(trained_run, make_config, tmp_path):
    cfg = make_config({"evaluation": {"sets": SETS}})
    ckpt = RunLayout(trained_run).checkpoint_dir(6)

    def sampled(out, *overrides):
        run_service("evaluator", "--config", cfg, "--ckpt", ckpt, "--out", tmp_path / out, *overrides)
        return (tmp_path / out / "sampled" / "step_00000006.samples.jsonl").read_text()

    assert sampled("a") == sampled("b")
    assert sampled("c", "evaluation.seed=1") != sampled("a")


def test_an_idle_watcher_does_not_spin(run_copy, tmp_path, evaluator):
    """Reading READY manifests makes inotify report opens and closes of READY; waking on those made the
    watcher re-read them forever, one core at 100% (and the trainer beside it 9x slower)."""
    import os

    proc = evaluator({"evaluation": {"rescan_s": 600}})
    wait_for(
        lambda: all(status_of(run_copy, s) in (Status.DONE, Status.SKIPPED) for s in (2, 4, 6)), 60, "steps settled"
    )
    time.sleep(1.0)

    def cpu_s():
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_s()
    time.sleep(3.0)
    assert cpu_s() - before < 0.3  # idle: waiting for events, not busy


def test_a_crash_after_wandb_wrote_the_row_does_not_log_it_twice(run_copy, make_config):
    """W&B offline: the evaluator died after W&B's service wrote step 4's row, before the ledger said `logged`.
    The next evaluator finds the row in W&B's own files and marks it, instead of logging it again."""
    from conftest import REPO  # noqa: F401 - the services run from the repository
    from shared.protocol import Ledger
    from shared.tracking import read_wandb_rows

    cfg = make_config({"wandb": {"mode": "offline"}})
    run_service("evaluator", "--config", cfg, "--run", run_copy, "--once", env_extra={"WANDB_SILENT": "true"})
    eval_dir = RunLayout(run_copy).eval_dir("default")

    def rows_of_step(step):
        return [
            r for r in read_wandb_rows(eval_dir / "wandb") if r.get("train_step") == step and "eval/main/accuracy" in r
        ]

    assert len(rows_of_step(4)) == 1
    Ledger(eval_dir).update(lambda e: e[4].update(logged=False, log_owner={"id": "crashed-evaluator"}))
    out = run_service(
        "evaluator", "--config", cfg, "--run", run_copy, "--once", env_extra={"WANDB_SILENT": "true"}
    ).stdout
    assert "step 4: already in W&B's files; marked logged" in out
    assert len(rows_of_step(4)) == 1 and ledger_of(run_copy)[4]["logged"] is True
    assert len(list((eval_dir / "wandb").glob("offline-run-*"))) == 2  # one W&B run per evaluator process


def _start_and_wait(ctx, delay_s: float):
    """As vLLM waits for its engine core: start a child that never gets ready, and wait on it with no deadline."""
    time.sleep(delay_s)
    child = ctx.Process(target=time.sleep, args=(600,))
    child.start()
    child.join()
    return child


@pytest.mark.parametrize("delay_s", [0.0, 1.5], ids=["child-started-before", "child-started-after"])
def test_a_hung_engine_child_is_killed_at_the_deadline(delay_s):
    """The vLLM engine's start-up bound (evaluation.engine_start_timeout_s), with real processes: a child started
    before or after the deadline is killed once it has passed, so the wait on it ends; children from before
    the deadline's start are left alone."""
    import multiprocessing

    from evaluator.backends import ChildDeadline

    ctx = multiprocessing.get_context("spawn")
    bystander = ctx.Process(target=time.sleep, args=(30,))
    bystander.start()
    try:
        t0 = time.monotonic()
        with ChildDeadline(1.0) as deadline:
            child = _start_and_wait(ctx, delay_s)
        assert deadline.expired and child.exitcode == -signal.SIGKILL
        assert time.monotonic() - t0 < 10
        assert bystander.is_alive()
        with ChildDeadline(5.0) as in_time:
            quick = ctx.Process(target=time.sleep, args=(0.1,))
            quick.start()
            quick.join()
        assert not in_time.expired and quick.exitcode == 0
    finally:
        bystander.kill()
