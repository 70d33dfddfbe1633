"""The evaluator as a real process: real watchdog observers, real files, the hf backend, the tiny model."""

import json
import shutil
import signal
import time

import pytest

from conftest import ledger_of, publish_copy, run_service, start_service, wait_for
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
        proc = start_service("evaluator", "--config", cfg, "--run", tmp_path / "runs" / "tiny", *extra, log=tmp_path / f"{name}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except Exception:
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
    assert r["metrics"]["num_samples"] == 8 and r["load"] == "new-engine"
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
    wait_for(lambda: all(status_of(run_copy, s) == Status.DONE for s in (2, 4, 6)), 90, "all steps")
    finished = sorted(results(run_copy).values(), key=lambda r: r["time"])
    assert [r["step"] for r in finished] == [6, 4, 2]


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
    assert log_text(tmp_path).count("step        2: accuracy") == 1
    assert len(RunLayout(run).eval_dir("default").joinpath("eval_log.jsonl").read_text().splitlines()) == 1


def test_failed_verification_is_recorded_and_the_evaluator_goes_on(trained_run, tmp_path, evaluator):
    run = tmp_path / "runs" / "tiny"
    ckpt = publish_copy(RunLayout(trained_run).checkpoint_dir(2), run, 2)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
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
    proc = evaluator({"evaluation": {"num_samples": 40, "max_tokens": 64, "hf_batch_size": 1}})
    wait_for(lambda: status_of(run_copy, 6) == Status.RUNNING, 60, "evaluation running")
    assert list(RunLayout(run_copy).leases_dir.glob("step_00000006.*.json"))  # lease held while evaluating
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    eval_dir = RunLayout(run_copy).eval_dir("default")
    assert not list(eval_dir.glob("step_00000006*"))  # no partial result
    assert not [p for p in eval_dir.iterdir() if p.name.startswith(".tmp")]
    assert not list(RunLayout(run_copy).leases_dir.glob("*.json"))
    assert 6 not in ledger_of(run_copy)  # given back: a later evaluator evaluates it


def test_sigkill_mid_evaluation_then_restart_evaluates_it_exactly_once(run_copy, tmp_path, evaluator):
    slow = {"evaluation": {"num_samples": 40, "max_tokens": 64, "hf_batch_size": 1, "backfill": True}}
    proc = evaluator(slow)
    wait_for(lambda: status_of(run_copy, 6) == Status.RUNNING, 60, "evaluation running")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not results(run_copy)
    evaluator(slow, name="eval2")
    wait_for(lambda: all(status_of(run_copy, s) == Status.DONE for s in (2, 4, 6)), 180, "all evaluated")
    entries = ledger_of(run_copy)
    assert entries[6]["attempts"] == 2 and entries[4]["attempts"] == 1
    assert "evaluating again" in log_text(tmp_path, "eval2")
    assert sorted(results(run_copy)) == [2, 4, 6]
    logged = [json.loads(line)["train_step"] for line in RunLayout(run_copy).eval_dir("default").joinpath("eval_log.jsonl").read_text().splitlines()]
    assert sorted(logged) == [2, 4, 6]


def test_two_evaluators_never_evaluate_the_same_checkpoint(run_copy, tmp_path, evaluator):
    both = {"evaluation": {"backfill": True}}
    evaluator(both, name="a")
    evaluator(both, name="b")
    wait_for(lambda: all(status_of(run_copy, s) == Status.DONE for s in (2, 4, 6)), 120, "all evaluated")
    time.sleep(1)
    a, b = log_text(tmp_path, "a"), log_text(tmp_path, "b")
    for step in (2, 4, 6):
        assert (a + b).count(f"step {step:>8}: accuracy") == 1
    assert all(e.get("attempts") == 1 for e in ledger_of(run_copy).values())


def test_after_the_fact_single_checkpoint_run_and_copied_folder(run_copy, tmp_path, make_config):
    cfg = make_config()
    ckpt4 = RunLayout(run_copy).checkpoint_dir(4)
    out = run_service("evaluator", "--config", cfg, "--ckpt", ckpt4).stdout
    assert "step        4: accuracy" in out
    assert status_of(run_copy, 4) == Status.DONE and set(results(run_copy)) == {4}
    # the run: only what is missing, oldest first, then exit
    out = run_service("evaluator", "--config", cfg, "--run", run_copy, "--once").stdout
    assert out.index("step        2:") < out.index("step        6:") and "step        4:" not in out
    assert set(results(run_copy)) == {2, 4, 6}
    # a checkpoint copied elsewhere, without its run (no ledger, no config)
    elsewhere = tmp_path / "old" / "step_00000004"
    shutil.copytree(ckpt4, elsewhere)
    out = run_service("evaluator", "--config", cfg, "--ckpt", elsewhere).stdout
    assert "step        4: accuracy" in out
    written = list((tmp_path / "old" / "eval" / "default").glob("*/step_00000004.json"))
    assert len(written) == 1
    # a plain model folder without READY is accepted with a warning
    plain = tmp_path / "plain_model"
    shutil.copytree(ckpt4, plain, ignore=shutil.ignore_patterns(READY, "trainer_state"))
    out = run_service("evaluator", "--config", cfg, "--ckpt", plain).stdout
    assert "integrity cannot be checked" in out and "accuracy" in out


def test_after_the_fact_damaged_folder_is_refused_with_the_reason(run_copy, make_config):
    ckpt = RunLayout(run_copy).checkpoint_dir(2)
    with open(ckpt / "tokenizer.json", "ab") as f:
        f.write(b" ")
    proc = run_service("evaluator", "--config", make_config(), "--ckpt", ckpt, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {ckpt / 'tokenizer.json'}: size mismatch ({(ckpt / 'tokenizer.json').stat().st_size} bytes on disk, {(ckpt / 'tokenizer.json').stat().st_size - 1} in READY)"


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
    assert "cannot load model" in ledger_of(run)[2]["reason"] and str(layout.checkpoint_dir(2)) in ledger_of(run)[2]["reason"]
    publish_copy(RunLayout(trained_run).checkpoint_dir(4), run, 4)
    wait_for(lambda: status_of(run, 4) == Status.DONE, 60, "step 4")
    assert proc.poll() is None
