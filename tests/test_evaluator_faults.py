"""The evaluator under injected faults, as real processes on the tiny model (issue 20): its own snapshot of what it
evaluates, transient failures retried, the logging duty taken over, results keyed by the evaluation config."""

import json
import shutil
import signal

import pytest

from conftest import REPO, ledger_of, publish_copy, run_service, start_service, wait_for
from shared.protocol import READY, Ledger, RunLayout, Status, read_manifest, weights_id


def one_step_run(trained_run, tmp_path, step=2, *more):
    """A run of its own holding the trained run's checkpoint `step` (and `more`), published through the protocol."""
    run = tmp_path / "runs" / "tiny"
    for s in (step, *more):
        publish_copy(RunLayout(trained_run).checkpoint_dir(s), run, s)
    return run


def result_of(run, step, name="default"):
    return json.loads(RunLayout(run).result_path(name, step).read_text())


def output(proc):
    return proc.stdout + proc.stderr


def test_a_presence_write_that_fails_after_recording_loses_nothing(trained_run, tmp_path, make_config):
    run = one_step_run(trained_run, tmp_path)
    env = {"MATH_SFT_FAULT_PRESENCE_WRITE_FAILS": "1"}
    proc = run_service("evaluator", "--config", make_config(), "--run", run, "--once", env_extra=env)
    assert "presence of recorded step 2: not advanced (OSError)" in output(proc)
    entry = ledger_of(run)[2]
    assert entry["status"] == Status.DONE and entry["logged"] and entry["attempts"] == 1
    assert result_of(run, 2)["weights_id"] == entry["weights_id"]


def test_a_transient_grader_start_failure_is_retried_then_done(trained_run, tmp_path, make_config):
    run = one_step_run(trained_run, tmp_path)
    env = {"MATH_SFT_FAULT_GRADER_START_FAILS": "1"}
    proc = run_service("evaluator", "--config", make_config(), "--run", run, "--once", env_extra=env)
    entry = ledger_of(run)[2]
    assert entry["status"] == Status.DONE and entry["attempts"] == 2
    [failed] = entry["failed_attempts"]
    assert failed["attempt"] == 1 and "GraderError: grader workers failed to start" in failed["reason"]
    assert "step 2: attempt failed, to be tried again" in output(proc)
    assert "step        2: main: acc" in proc.stdout


def test_max_attempts_failures_fail_the_step_with_every_reason(trained_run, tmp_path, make_config):
    run = one_step_run(trained_run, tmp_path)
    cfg = make_config({"evaluation": {"max_attempts": 2}})
    env = {"MATH_SFT_FAULT_GRADER_START_FAILS": "99"}
    proc = run_service("evaluator", "--config", cfg, "--run", run, "--once", env_extra=env)
    entry = ledger_of(run)[2]
    assert entry["status"] == Status.FAILED and entry["attempts"] == 2
    assert [a["attempt"] for a in entry["failed_attempts"]] == [1, 2]
    assert all("grader workers failed to start" in a["reason"] for a in entry["failed_attempts"])
    assert entry["reason"].startswith("2 attempts failed; the last: ")
    assert "step 2: not evaluated: 2 attempts failed" in output(proc)
    assert not RunLayout(run).result_path("default", 2).exists()
    assert not list(RunLayout(run).eval_dir("default").glob("snapshots/*"))  # removed on failure too


def test_retention_deleting_the_checkpoint_during_the_evaluation_does_not_change_its_result(
    trained_run, tmp_path, make_config
):
    """The evaluator loads from its snapshot: the published folder deleted (READY first, then the rest, as
    retention does) after the snapshot was taken still gives the result of the weights claimed."""
    run = one_step_run(trained_run, tmp_path)
    layout = RunLayout(run)
    expected = weights_id(read_manifest(layout.checkpoint_dir(2)))
    env = {"MATH_SFT_FAULT_PAUSE_AFTER_SNAPSHOT_S": "3"}
    proc = start_service("evaluator", "--config", make_config(), "--run", run, log=tmp_path / "eval.log", env_extra=env)
    snapshots = layout.eval_dir("default") / "snapshots"
    [snapshot] = wait_for(lambda: list(snapshots.glob("step_00000002-*/READY")), 60, "the snapshot")
    assert snapshot.parent.name == f"step_00000002-{expected[:12]}"
    (layout.checkpoint_dir(2) / READY).unlink()
    shutil.rmtree(layout.checkpoint_dir(2))
    wait_for(lambda: ledger_of(run).get(2, {}).get("status") == Status.DONE, 60, "step 2 evaluated")
    result = result_of(run, 2)
    assert result["weights_id"] == expected and result["checkpoint"] == str(layout.checkpoint_dir(2))
    assert ledger_of(run)[2]["attempts"] == 1 and not list(snapshots.iterdir())  # removed once recorded
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0


def test_a_checkpoint_deleted_before_its_snapshot_is_recorded_deleted(trained_run, tmp_path):
    """In-process: the snapshot of a folder retention is deleting (READY gone, then a model file) is refused as
    deleted, and leaves nothing; a missing file under a READY still there is a broken checkpoint instead."""
    from evaluator.snapshot import CheckpointDeleted, take_snapshot
    from shared.protocol import CheckpointInvalid

    run = one_step_run(trained_run, tmp_path)
    ckpt = RunLayout(run).checkpoint_dir(2)
    weights = weights_id(read_manifest(ckpt))
    eval_dir = tmp_path / "eval"
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointInvalid, match="missing file listed in READY") as broken:
        take_snapshot(ckpt, eval_dir, 2, weights)
    assert not isinstance(broken.value, CheckpointDeleted)
    (ckpt / READY).unlink()
    with pytest.raises(CheckpointDeleted, match="deleted before it could be evaluated"):
        take_snapshot(ckpt, eval_dir, 2, weights)
    assert not list((eval_dir / "snapshots").glob("*"))


def test_a_running_evaluator_takes_over_the_logging_of_a_dead_ones_result(trained_run, tmp_path, make_config):
    """A result written, not logged, by an evaluator that is gone: a watcher already running takes the duty over at
    its next rescan (not only at start) and logs the row with its samples table, read back from the files."""
    from shared.tracking import read_wandb_rows

    run = one_step_run(trained_run, tmp_path)
    run_service("evaluator", "--config", make_config(), "--run", run, "--once")  # W&B off: nothing in W&B
    offline = make_config({"wandb": {"mode": "offline"}, "evaluation": {"rescan_s": 1.0}}, name="offline.yaml")
    env = {"WANDB_SILENT": "true"}
    proc = start_service("evaluator", "--config", offline, "--run", run, log=tmp_path / "eval.log", env_extra=env)
    wait_for(lambda: "watching" in (tmp_path / "eval.log").read_text(), 60, "the watcher started")
    eval_dir = RunLayout(run).eval_dir("default")
    Ledger(eval_dir).update(lambda e: e[2].update(logged=False, log_owner={"id": "dead-evaluator"}))
    wait_for(lambda: ledger_of(run)[2].get("logged"), 60, "step 2 logged by the running evaluator")
    assert (
        "step 2: logging results that an earlier evaluator wrote but did not log" in (tmp_path / "eval.log").read_text()
    )
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    rows = read_wandb_rows(eval_dir / "wandb")
    metrics = [r for r in rows if r.get("train_step") == 2 and "eval/main/accuracy" in r]
    assert len(metrics) == 1 and metrics[0]["eval/weights_id"] == result_of(run, 2)["weights_id"]
    tables = {k.rsplit("/", 1)[0]: row for row in rows for k in row if k.endswith("/_type")}
    assert tables["eval/main/samples"]["eval/main/samples/nrows"] == 8
    assert tables["eval/main/samples"]["train_step"] == 2


def test_a_changed_prompt_template_evaluates_again_and_never_ranks_across(trained_run, tmp_path, make_config):
    run = one_step_run(trained_run, tmp_path, 2, 4)
    layout = RunLayout(run)
    keep_best = {"training": {"keep_best": {"k": 1, "metric": "format_rate"}}}
    run_service("evaluator", "--config", make_config(keep_best), "--run", run, "--once")
    before = {s: result_of(run, s) for s in (2, 4)}
    assert layout.best_path.resolve() == layout.checkpoint_dir(4).resolve()  # among equals the later step
    template = tmp_path / "other.prompt"
    template.write_text((REPO / "prompts" / "r1_zero.prompt").read_text().replace("{question}", "Q: {question}"))
    changed = make_config({**keep_best, "prompt_template": str(template)}, name="changed.yaml")
    # Only step 2 under the new template first: it must not be ranked against step 4's result of the old one.
    run_service("evaluator", "--config", changed, "--ckpt", layout.checkpoint_dir(2))
    now = result_of(run, 2)
    old_id, new_id = before[2]["eval_config_id"], now["eval_config_id"]
    assert old_id == before[4]["eval_config_id"] != new_id
    metric = now["sets"]["main"]["metrics"]["format_rate"]
    assert before[4]["sets"]["main"]["metrics"]["format_rate"] >= metric  # ranked together, 4 would stay best
    assert layout.best_path.resolve() == layout.checkpoint_dir(2).resolve()
    aside = layout.eval_dir("default") / "superseded" / old_id
    assert json.loads((aside / "step_00000002.json").read_text()) == before[2]  # moved aside, not lost
    assert (aside / "main" / "step_00000002.samples.jsonl").is_file()
    # The watcher's way: every step of the old config is not yet evaluated, and is evaluated again.
    out = run_service("evaluator", "--config", changed, "--run", run, "--once").stdout
    assert "step 4: evaluated under another evaluation config" in out and "step        2:" not in out
    entries = ledger_of(run)
    assert all(entries[s]["eval_config_id"] == new_id and entries[s]["status"] == Status.DONE for s in (2, 4))
    assert result_of(run, 4)["eval_config_id"] == new_id and (aside / "step_00000004.json").is_file()


def test_snapshots_left_by_a_dead_evaluator_are_removed_at_start(trained_run, tmp_path, make_config):
    """A snapshot whose step no live owner is running is removed when an evaluator starts; one of a step a live
    evaluator is evaluating stays (it is loading from it)."""
    from shared.protocol import Presence, current_owner

    run = one_step_run(trained_run, tmp_path)
    layout = RunLayout(run)
    snapshots = layout.eval_dir("default") / "snapshots"
    left, in_use = snapshots / "step_00000002-aaaaaaaaaaaa", snapshots / "step_00000004-bbbbbbbbbbbb"
    for folder in (left, in_use):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x")
    live = Presence(layout, "default", watching=True, backfill=False, timeout_s=60).start()  # this test process
    try:
        Ledger(layout.eval_dir("default")).update(
            lambda e: e.update({4: {"status": Status.RUNNING, "owner": current_owner(), "weights_id": "b"}})
        )
        out = run_service("evaluator", "--config", make_config(), "--run", run, "--once").stdout
    finally:
        live.stop()
    assert f"removed {left} (left by an evaluator that is gone)" in out
    assert not left.exists() and (in_use / "model.safetensors").is_file()
    assert ledger_of(run)[2]["status"] == Status.DONE
