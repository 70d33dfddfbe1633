"""The product as users run it: both services as real processes on one run directory (CPU, tiny model)."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    REPO,
    ledger_of,
    publish_copy,
    run_service,
    service_env,
    start_service,
    start_trainer_saving,
    wait_for,
)
from shared.protocol import RunLayout, Status, list_ready_checkpoints, verify_checkpoint

SLOW_EVAL = {"evaluation": {"num_samples": 40, "max_tokens": 64, "hf_batch_size": 1}}


def results(run_dir, name="default"):
    return {int(p.stem[5:]): json.loads(p.read_text()) for p in RunLayout(run_dir).eval_dir(name).glob("step_*.json")}


def status_of(run_dir, step):
    return ledger_of(run_dir).get(step, {}).get("status")


def settled(run_dir, steps):
    return all(status_of(run_dir, s) in (Status.DONE, Status.SKIPPED) for s in steps)


def stop(proc, sig=signal.SIGINT, timeout=30):
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


def train_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- 1. two terminals


@pytest.mark.parametrize("evaluator_first", [True, False], ids=["evaluator-first", "trainer-first"])
def test_two_terminals(tmp_path, make_config, evaluator_first):
    cfg = make_config({"training": {"max_steps": 8}, "evaluation": {"backfill": True}})  # every step must be evaluated
    run = tmp_path / "runs" / "tiny"
    procs = []
    if evaluator_first:
        procs.append(start_service("evaluator", "--config", cfg, log=tmp_path / "eval.log"))
        wait_for(lambda: "watching" in (tmp_path / "eval.log").read_text(), 60, "evaluator start")
    trainer = start_service("trainer", "--config", cfg, log=tmp_path / "train.log")
    if not evaluator_first:
        wait_for(lambda: list_ready_checkpoints(RunLayout(run).checkpoints_dir), 120, "first checkpoint")
        procs.append(start_service("evaluator", "--config", cfg, log=tmp_path / "eval.log"))
    assert trainer.wait(180) == 0
    wait_for(lambda: all(status_of(run, s) == Status.DONE for s in (0, 2, 4, 6, 8)), 120, "every checkpoint evaluated")
    assert stop(procs[0]) == 0
    assert set(results(run)) == {0, 2, 4, 6, 8}
    assert all(e["attempts"] == 1 and e["logged"] for e in ledger_of(run).values())  # each once, and logged
    # flips are counted against an earlier evaluated step (back-fill may evaluate out of order)
    for step, r in results(run).items():
        vs = r["sets"]["main"]["changes"]["vs_step"]
        assert vs is None or (vs < step and vs in results(run)), (step, vs)
    assert results(run)[0]["sets"]["main"]["changes"]["vs_step"] is None


def test_trainer_never_waits_for_the_evaluator(tmp_path, make_config, trained_run):
    """A frozen evaluator (SIGSTOP while it holds a checkpoint) does not hold the trainer: judged by what the trainer
    itself records of every save (how long it held the loop, how long it waited for the save before it, retention
    and its locks included), not by a wall-clock ratio that a busy machine can break."""
    run = tmp_path / "runs" / "tiny"
    publish_copy(RunLayout(trained_run).checkpoint_dir(2), run, 2)
    evaluator = start_service(
        "evaluator", "--config", make_config(SLOW_EVAL, name="slow.yaml"), log=tmp_path / "eval.log"
    )
    try:
        wait_for(lambda: status_of(run, 2) == Status.RUNNING, 60, "evaluation running")
        # Frozen while generating (SLOW_EVAL), not inside the claim's lock, which it leaves right after writing
        # RUNNING: a holder frozen inside a lock is test_retention_gives_up_on_a_lock_held_by_a_frozen_process.
        time.sleep(1.0)
        evaluator.send_signal(signal.SIGSTOP)
        # the run now holds a step the frozen evaluator has claimed: the trainer resumes from it and trains on, with
        # retention deleting what it may (the frozen evaluator's heartbeat is fresh for 60 s)
        trainer = run_service(
            "trainer", "--config", make_config({"training": {"max_steps": 12, "keep_last": 1}}, name="t.yaml")
        )
    finally:
        evaluator.send_signal(signal.SIGCONT)
        stop(evaluator)
    saves = {r["train_step"]: r for r in train_rows(run) if "train/checkpoint_blocked_s" in r}
    assert sorted(saves) == [4, 6, 8, 10, 12], sorted(saves)  # every save made, none skipped or failed
    # A save that waited for the evaluator waits until it resumes (never, here) or, in retention, for a lock up to
    # RETENTION_LOCK_TIMEOUT_S (5 s) and then says so: a tiny model's save takes milliseconds.
    held = {step: (r["train/checkpoint_blocked_s"], r["train/checkpoint_waited_s"]) for step, r in saves.items()}
    assert all(blocked < 2.5 and waited < 2.5 for blocked, waited in held.values()), held
    assert not re.search(r"retention .* skipped", trainer.stdout + trainer.stderr)  # no lock waited for to the end
    # retention was not held either: despite the frozen evaluator's claim it bounded the disk to keep_last (1) +
    # max_unevaluated (2) checkpoints (it decides from results only, never from leases: shared/protocol/retention.py)
    left = list_ready_checkpoints(RunLayout(run).checkpoints_dir)
    assert 12 in left and len(left) <= 3, sorted(left)


# ------------------------------------------------------------------------------- 2. evaluator restart


def wandb_history_steps(root: Path) -> list[int]:
    """train_step of every evaluation row in the W&B offline files under `root`."""
    from shared.tracking import read_wandb_rows

    return [row["train_step"] for row in read_wandb_rows(root) if "eval/main/accuracy" in row]


def test_evaluator_sigkill_and_restart_while_training(tmp_path, make_config):
    cfg = make_config(
        {
            "training": {"max_steps": 8},
            "wandb": {"mode": "offline"},
            "evaluation": {**SLOW_EVAL["evaluation"], "backfill": True},
        }
    )
    run = tmp_path / "runs" / "tiny"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    trainer = start_service(
        "trainer", "--config", cfg, log=tmp_path / "train.log", env_extra={**env, "MATH_SFT_FAULT_SLOW_SAVE_S": "0.3"}
    )
    first = start_service("evaluator", "--config", cfg, log=tmp_path / "eval1.log", env_extra=env)
    victim = wait_for(
        lambda: next((s for s, e in ledger_of(run).items() if e["status"] == Status.RUNNING), None),
        180,
        "an evaluation",
    )
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    second = start_service("evaluator", "--config", cfg, log=tmp_path / "eval2.log", env_extra=env)
    assert trainer.wait(300) == 0
    wait_for(lambda: all(status_of(run, s) == Status.DONE for s in (0, 2, 4, 6, 8)), 300, "all evaluated")
    assert stop(second, timeout=60) == 0
    entries = ledger_of(run)
    assert entries[victim]["attempts"] == 2  # the interrupted one: evaluated again, once
    assert sorted(results(run)) == [0, 2, 4, 6, 8]
    eval_dir = RunLayout(run).eval_dir("default")
    assert not [p for p in eval_dir.rglob("*") if p.name.startswith(".tmp")]
    logged = [json.loads(line)["train_step"] for line in (eval_dir / "eval_log.jsonl").read_text().splitlines()]
    assert sorted(logged) == [0, 2, 4, 6, 8]
    assert sorted(wandb_history_steps(eval_dir / "wandb")) == [0, 2, 4, 6, 8]
    from shared.tracking import read_wandb_rows

    # a table of sample generations (prompt, response, reference answer, rewards, failure kind) per step
    rows = read_wandb_rows(eval_dir / "wandb")
    tables = [row for row in rows if row.get("eval/main/samples/_type") == "table-file"]
    assert tables and {row["train_step"] for row in tables} <= {0, 2, 4, 6, 8}
    assert all(row["eval/main/samples/nrows"] == 8 and row["eval/main/samples/ncols"] == 9 for row in tables)


# ------------------------------------------------------------------------------- 3. trainer crash mid-save


def test_trainer_sigkill_mid_save_then_resume(tmp_path, make_config):
    cfg = make_config()
    run = tmp_path / "runs" / "tiny"
    layout = RunLayout(run)
    evaluator = start_service("evaluator", "--config", cfg, log=tmp_path / "eval.log")
    trainer = start_trainer_saving(cfg, tmp_path / "train.log", 4, published=(2,))
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(10)
    time.sleep(2)  # the evaluator sees the partial directory's events and must not touch it
    assert 4 not in ledger_of(run)
    eval_log = (tmp_path / "eval.log").read_text()
    assert ".tmp_step" not in eval_log and "Warning" not in eval_log and "Traceback" not in eval_log
    assert all(json.loads(p.read_text()).get("step") != 4 for p in layout.presence_dir.glob("*.json"))  # none at it
    proc = subprocess.run(
        ["make", "-s", "train", f"CONFIG={cfg}"],
        check=False,
        cwd=REPO,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removed incomplete checkpoint" in proc.stdout and "resumed from" in proc.stdout
    assert not layout.tmp_checkpoint_dir(4).exists()
    wait_for(lambda: status_of(run, 6) == Status.DONE, 120, "step 6 evaluated")
    assert stop(evaluator) == 0
    for step in list_ready_checkpoints(layout.checkpoints_dir):
        verify_checkpoint(layout.checkpoint_dir(step))


# ------------------------------------------------------------------------------- 4. after the fact, via make


def test_make_eval_after_the_fact(run_copy, tmp_path, make_config):
    cfg = make_config()

    def make_eval(*args):
        return subprocess.run(
            ["make", "-s", "eval", f"CONFIG={cfg}", *args],
            check=False,
            cwd=REPO,
            env=service_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    one = make_eval(f"CKPT={RunLayout(run_copy).checkpoint_dir(2)}")
    assert one.returncode == 0 and "step        2: main: acc" in one.stdout, one.stderr
    rest = make_eval(f"RUN={run_copy}")
    assert rest.returncode == 0, rest.stderr
    assert "step        2:" not in rest.stdout and "step        4:" in rest.stdout and "step        6:" in rest.stdout
    again = make_eval(f"RUN={run_copy}")
    assert again.returncode == 0 and "main: acc" not in again.stdout  # nothing missing any more
    missing = make_eval(f"CKPT={tmp_path / 'nope'}")
    assert missing.returncode != 0 and f"--ckpt {tmp_path / 'nope'}: no such directory" in missing.stderr


# ------------------------------------------------------------------------------- 5. burst


@pytest.mark.parametrize("backfill", [False, True])
def test_burst_newest_next(trained_run, tmp_path, make_config, backfill):
    run = tmp_path / "runs" / "tiny"
    src = RunLayout(trained_run)
    cfg = make_config({"evaluation": {**SLOW_EVAL["evaluation"], "backfill": backfill}})
    evaluator = start_service("evaluator", "--config", cfg, log=tmp_path / "eval.log")
    wait_for(lambda: "watching" in (tmp_path / "eval.log").read_text(), 60, "evaluator start")
    publish_copy(src.checkpoint_dir(2), run, 2)
    wait_for(lambda: status_of(run, 2) == Status.RUNNING, 60, "step 2 running")
    for step in (4, 6, 8):  # three checkpoints while step 2 is being evaluated
        publish_copy(src.checkpoint_dir(min(step, 6)), run, step)
    assert status_of(run, 2) == Status.RUNNING
    wait_for(lambda: status_of(run, 8) == Status.DONE, 120, "step 8")
    if backfill:
        wait_for(lambda: all(status_of(run, s) == Status.DONE for s in (4, 6)), 120, "back-fill")
        order = [r["step"] for r in sorted(results(run).values(), key=lambda r: r["time"])]
        assert order == [2, 8, 6, 4]
    else:
        time.sleep(1)
        assert status_of(run, 4) == status_of(run, 6) == Status.SKIPPED
        assert sorted(results(run)) == [2, 8]
    assert stop(evaluator) == 0


# ------------------------------------------------------------------------------- 6. graceful stop


def test_trainer_ctrl_c_finishes_the_pending_checkpoint(tmp_path, make_config):
    cfg = make_config({"training": {"max_steps": 200}})
    layout = RunLayout(tmp_path / "runs" / "tiny")
    trainer = start_trainer_saving(cfg, tmp_path / "train.log", 4, slow_save_s=0.3)
    trainer.send_signal(signal.SIGINT)
    assert trainer.wait(60) == 0
    assert "finishing the pending checkpoint" in (tmp_path / "train.log").read_text()
    assert 4 in list_ready_checkpoints(layout.checkpoints_dir)
    verify_checkpoint(layout.checkpoint_dir(4))
    assert not [p for p in layout.checkpoints_dir.iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------------------- bad input


def snapshot(root: Path) -> dict:
    """Every file of a run but its logs/ (where a service appends its warnings and errors)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "logs"
    }


@pytest.fixture
def fake_one_gpu(tmp_path):
    """An `nvidia-smi` that reports one GPU: only the GPU can't exist here, so only it is faked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


def test_bad_input_one_clear_line_and_nothing_changed(run_copy, tmp_path, make_config, fake_one_gpu):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "p", "response": "r </think> <answer> 1 </answer>"}\n{"prompt": "p"\n')
    before = snapshot(run_copy)
    cases = [
        (
            "trainer",
            [make_config({"training": {"learning_rat": 1}}, name="typo.yaml").__str__()],
            {},
            "unknown key 'training.learning_rat'; did you mean 'training.learning_rate'?",
        ),
        (
            "trainer",
            [str(make_config({"training": {"data": {"path": str(tmp_path / "missing.jsonl")}}}, name="m.yaml"))],
            {},
            f"data file not found: {tmp_path / 'missing.jsonl'}",
        ),
        (
            "trainer",
            [str(make_config({"training": {"data": {"path": str(bad_jsonl)}}}, name="b.yaml"))],
            {},
            f"{bad_jsonl}:2: not valid JSON",
        ),
        (
            "evaluator",
            [str(make_config(name="c.yaml")), "--ckpt", str(tmp_path / "nothing")],
            {},
            f"--ckpt {tmp_path / 'nothing'}: no such directory",
        ),
        (
            "trainer",
            [str(make_config({"training": {"gpus": [3]}}, name="g.yaml"))],
            {"PATH": f"{fake_one_gpu}:{os.environ['PATH']}"},
            "training.gpus=[3]: GPU 3 does not exist; this machine has 1 (0-0)",
        ),
    ]
    for module, args, env, message in cases:
        env_full = service_env(**env)
        env_full.pop("CUDA_VISIBLE_DEVICES")
        proc = subprocess.run(
            [sys.executable, "-m", module, "--config", *args],
            check=False,
            cwd=REPO,
            env=env_full,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (module, args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (message, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert snapshot(run_copy) == before
    # the errors met once the trainer knew its run (after reading its config) are also in the run's log, one line each
    logged = (run_copy / "logs" / "trainer.log").read_text().splitlines()
    expected = [message for _, _, _, message in cases[1:3] + cases[4:]]
    assert len(logged) == len(expected) and all(m in line for m, line in zip(expected, logged, strict=True)), logged
