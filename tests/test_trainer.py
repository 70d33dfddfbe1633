"""The trainer as users run it: a real subprocess training a 2-layer model for a few steps."""

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    REPO,
    flip_byte,
    rewind_copy,
    run_service,
    service_env,
    start_service,
    start_trainer_saving,
    wait_for,
)
from shared.protocol import (
    READY,
    Ledger,
    RunInUse,
    RunLayout,
    Status,
    TrainerLock,
    list_ready_checkpoints,
    read_manifest,
    verify_checkpoint,
    weights_id,
)

CKPT_FILES = {
    "READY",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state/state.pt",
    "trainer_state/trainer_state.json",
}


def files_of(path):
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def train_log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_checkpoint_files_and_logs(trained_run):
    layout = RunLayout(trained_run)
    assert sorted(p.name for p in layout.checkpoints_dir.iterdir()) == [
        "step_00000000",  # the base model, published first (training.publish_step0)
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]
    for step in (0, 2, 4, 6):
        ckpt = layout.checkpoint_dir(step)
        assert files_of(ckpt) == CKPT_FILES
        manifest = verify_checkpoint(ckpt)
        assert manifest["step"] == step
        assert json.loads((ckpt / "trainer_state" / "trainer_state.json").read_text())["step"] == step
    saved = yaml.safe_load(layout.config_path.read_text())
    assert saved["training"]["max_steps"] == 6
    rows = train_log(trained_run)
    assert [r["train_step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "train/response_entropy"} <= set(r)
    assert {r["train_step"] for r in rows if "train/checkpoint_blocked_s" in r} == {2, 4, 6}
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_step0_is_the_base_model(trained_run):
    from safetensors.torch import load_file

    layout = RunLayout(trained_run)
    base = load_file(layout.base_model_dir / "model.safetensors")
    step0 = load_file(layout.checkpoint_dir(0) / "model.safetensors")
    step2 = load_file(layout.checkpoint_dir(2) / "model.safetensors")
    assert step0.keys() == base.keys()
    assert all(step0[k].equal(base[k]) for k in base)
    assert not all(step2[k].equal(base[k]) for k in base)


def test_checkpoint_loads_as_plain_hugging_face_model(trained_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = RunLayout(trained_run).checkpoint_dir(6)
    model = AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("Ava has 3 apples.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape[-1] >= len(tok)
    # tied embeddings are restored from the config, not stored twice
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_resume_gives_the_same_losses(trained_run, tmp_path, make_config):
    """2 steps + resume + 4 steps == 6 uninterrupted steps, in fp32 on CPU, to 1e-6."""
    run = rewind_copy(trained_run, tmp_path / "runs" / "tiny", to_step=2)
    proc = run_service("trainer", "--config", make_config())
    assert "resumed from" in proc.stdout and "(step 2)" in proc.stdout
    resumed = {r["train_step"]: r["train/loss"] for r in train_log(run)}
    straight = {r["train_step"]: r["train/loss"] for r in train_log(trained_run)}
    assert sorted(resumed) == [3, 4, 5, 6]
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], abs=1e-6)
    for step in (4, 6):
        a = (RunLayout(run).checkpoint_dir(step) / "model.safetensors").read_bytes()
        b = (RunLayout(trained_run).checkpoint_dir(step) / "model.safetensors").read_bytes()
        assert a == b
    # The random stream continues where it was: the resumed process restored it (building the model in
    # the first process consumed random numbers that a resumed process never drew).
    import torch

    rng = [
        torch.load(RunLayout(r).checkpoint_dir(6) / "trainer_state" / "state.pt", weights_only=True)["rng"]["torch"]
        for r in (run, trained_run)
    ]
    assert torch.equal(rng[0], rng[1])


def test_a_save_due_while_the_previous_is_written_is_skipped_and_said_not_waited_for(tmp_path, make_config):
    """checkpoint_when_busy=skip (the default): with step 0's save held on the disk for seconds, the saves due at
    steps 2 and 4 find it still writing; they are not saved, each is named in a warning and counted, and the loop
    does not wait. The last step's save waits, so the run always ends on a checkpoint."""
    cfg = make_config({"training": {"checkpoint_when_busy": "skip"}})
    layout = RunLayout(tmp_path / "runs" / "tiny")
    # each file of a save takes 1 s more: step 0's save (7 files) is still in flight when steps 2 and 4 are due
    proc = run_service("trainer", "--config", cfg, env_extra={"MATH_SFT_FAULT_SLOW_SAVE_S": "1.0"})
    out = proc.stdout + proc.stderr
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 6]
    for step in (2, 4):
        assert f"WARNING step {step} not saved: the checkpointer is still writing step 0" in proc.stderr
    assert "2 not saved, the disk being behind: steps [2, 4]" in out
    rows = [json.loads(line) for line in (layout.run_dir / "train_log.jsonl").read_text().splitlines()]
    skipped = {r["train_step"]: r["train/checkpoints_skipped"] for r in rows if "train/checkpoints_skipped" in r}
    assert skipped == {2: 1, 4: 2}
    assert [r["train_step"] for r in rows if "train/checkpoint_blocked_s" in r] == [6]
    assert not [p for p in layout.checkpoints_dir.iterdir() if p.name.startswith(".tmp")]
    # the run's skipped steps are recorded in its checkpoints and survive a resume
    more = make_config({"training": {"checkpoint_when_busy": "skip", "max_steps": 8}}, name="more.yaml")
    assert "2 not saved, the disk being behind: steps [2, 4]" in run_service("trainer", "--config", more).stdout
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 6, 8]


def test_a_stop_after_a_skipped_save_saves_the_step_it_stops_at(tmp_path, make_config):
    """Ctrl-C finishes the save in flight; when the newest due save was skipped, the step the run stops at is
    saved too, so a resume does not go back to the save before the skipped one. A second Ctrl-C does not stop it."""
    cfg = make_config({"training": {"checkpoint_when_busy": "skip", "max_steps": 400}})
    layout = RunLayout(tmp_path / "runs" / "tiny")
    log = tmp_path / "t.log"
    proc = start_service("trainer", "--config", cfg, log=log, env_extra={"MATH_SFT_FAULT_SLOW_SAVE_S": "1.0"})
    try:
        wait_for(lambda: "not saved: the checkpointer is still writing step 0" in log.read_text(), 120, "a skip")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "saving step" in log.read_text(), 60, "the stop's save")
        # a second Ctrl-C (past the 3 s that make a repeat the same request) while step 0's save is still being
        # written: the stop's save is a collective with several ranks and must not be interrupted
        time.sleep(3.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    out = log.read_text()
    stopped_at = int(out.split("stopped at step ")[1].split()[0])
    assert f"saving step {stopped_at}: the newest due checkpoint (step " in out
    assert "interrupted during" not in out
    assert list(list_ready_checkpoints(layout.checkpoints_dir))[-1] == stopped_at > 0
    verify_checkpoint(layout.checkpoint_dir(stopped_at))


def test_sigkill_during_save_leaves_nothing_loadable_and_resume_cleans_up(tmp_path, make_config):
    cfg = make_config()
    layout = RunLayout(tmp_path / "runs" / "tiny")
    # killed while the save of step 4 is in progress, step 2's published
    proc = start_trainer_saving(cfg, tmp_path / "t.log", 4, published=(2,))
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert layout.tmp_checkpoint_dir(4).exists()
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 2]
    assert not layout.checkpoint_dir(4).exists()
    out = run_service("trainer", "--config", cfg).stdout
    assert "removed incomplete checkpoint" in out and "resumed from" in out
    assert not layout.tmp_checkpoint_dir(4).exists()
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 2, 4, 6]
    for step in (2, 4, 6):
        verify_checkpoint(layout.checkpoint_dir(step))


def test_write_error_during_save_fails_loudly_and_keeps_earlier_checkpoints(tmp_path, make_config):
    """A file-size limit makes the OS refuse the write (EFBIG), as a full disk would (ENOSPC)."""
    layout = RunLayout(tmp_path / "runs" / "tiny")
    run_service("trainer", "--config", make_config({"training": {"max_steps": 2}}))
    before = (layout.checkpoint_dir(2) / "model.safetensors").read_bytes()

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", make_config({"training": {"max_steps": 4}})],
        check=False,
        cwd=REPO,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert proc.returncode != 0
    assert "saving checkpoint 4" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 2]
    assert not layout.tmp_checkpoint_dir(4).exists() and not layout.checkpoint_dir(4).exists()
    verify_checkpoint(layout.checkpoint_dir(2))
    assert (layout.checkpoint_dir(2) / "model.safetensors").read_bytes() == before


def test_retention_is_bounded_whatever_the_ledger_says(tmp_path, make_config):
    """An evaluation that claimed step 4 and never came back, and one more step pending: neither pins a step.
    keep_last=1 and max_unevaluated (its default, 2) keep the newest step and the 2 newest unevaluated ones; the
    rest is deleted, logged and recorded `deleted`."""
    layout = RunLayout(tmp_path / "runs" / "tiny")
    run_service("trainer", "--config", make_config({"training": {"max_steps": 2, "keep_last": 1}}, name="first.yaml"))
    ledger = Ledger(layout.eval_dir("default"))
    ledger.set(2, Status.RUNNING, owner={"id": "gone"}, weights_id=weights_id(read_manifest(layout.checkpoint_dir(2))))
    ledger.set(4, Status.PENDING)
    proc = run_service("trainer", "--config", make_config({"training": {"max_steps": 10, "keep_last": 1}}))
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [6, 8, 10]
    for step in (6, 8, 10):
        verify_checkpoint(layout.checkpoint_dir(step))
    out = proc.stdout + proc.stderr
    for step in (0, 2, 4):
        assert f"retention: deleted step {step} before evaluation(s) default finished it" in out
    entries = ledger.read()
    assert [entries[step]["status"] for step in (0, 4)] == [Status.DELETED] * 2
    assert entries[2]["status"] == Status.RUNNING  # a claim is left to its evaluator (it evaluates a snapshot)
    assert not layout.checkpoint_dir(2).exists() and not layout.checkpoint_dir(4).exists()


def write_known_results(layout: RunLayout, accuracy_by_step: dict[int, float]) -> None:
    """Evaluation results as the evaluator writes them, for the weights now in each step's folder, and the
    ledger's `done` entries."""
    for step, accuracy in accuracy_by_step.items():
        weights = weights_id(read_manifest(layout.checkpoint_dir(step)))
        result = {"step": step, "weights_id": weights, "sets": {"main": {"metrics": {"accuracy": accuracy}}}}
        layout.result_path("default", step).parent.mkdir(parents=True, exist_ok=True)
        layout.result_path("default", step).write_text(json.dumps(result))
        Ledger(layout.eval_dir("default")).set(step, Status.DONE, weights_id=weights)


def test_keep_best_keeps_the_best_evaluated_checkpoints_and_points_at_the_best(run_copy, make_config):
    layout = RunLayout(run_copy)
    write_known_results(layout, {0: 0.5, 2: 0.9, 4: 0.1, 6: 0.3})
    retention = {"keep_last": 1, "keep_best": {"k": 2, "metric": "accuracy"}}
    out = run_service("trainer", "--config", make_config({"training": {"max_steps": 10, **retention}})).stdout
    # the 2 best (2: 0.9, 0: 0.5), the newest and 8 (not evaluated: max_unevaluated); 4 and 6 (evaluated, worse) go
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 2, 8, 10]
    assert sorted(p.name for p in layout.checkpoints_dir.iterdir()) == [
        "step_00000000",
        "step_00000002",
        "step_00000008",
        "step_00000010",
    ]
    assert "keeping step 2 beyond keep_last=1: one of the 2 best by main accuracy (0.9)" in out
    assert layout.best_path.is_symlink() and layout.best_path.resolve() == layout.checkpoint_dir(2).resolve()
    verify_checkpoint(layout.best_path)
    # a better result for a newer step moves the pointer at the next save, and the old best stays among the 2
    write_known_results(layout, {10: 0.95})
    run_service("trainer", "--config", make_config({"training": {"max_steps": 12, **retention}}, name="more.yaml"))
    assert layout.best_path.resolve() == layout.checkpoint_dir(10).resolve()
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [2, 8, 10, 12]


def test_a_second_trainer_on_the_same_run_is_refused(tmp_path, make_config):
    cfg = make_config()
    layout = RunLayout(tmp_path / "runs" / "tiny")
    first = start_trainer_saving(cfg, tmp_path / "first.log", 2)
    try:
        second = run_service("trainer", "--config", cfg, check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"another trainer is training this run (pid {first.pid} on" in second.stderr
        # the refused trainer disturbed nothing: the first one's save of step 2 goes on (or is published by now)
        # and the run's lock file is there
        assert (first.poll() is None and layout.tmp_checkpoint_dir(2).exists()) or layout.checkpoint_dir(2).exists()
        assert layout.trainer_lock_path.is_file()
        assert first.wait(120) == 0
    finally:
        first.kill()
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 2, 4, 6]


def test_two_trainers_starting_at_once_on_a_new_run_one_trains_and_the_other_deletes_nothing(tmp_path, make_config):
    """Both wait at a start barrier just before taking the run lock, then race: creating the run directory and
    taking its lock are one step, so exactly one trains; the other is refused and removes nothing of the winner's
    (before, the loser deleted the run directory, lock file included, and a third trainer could take the run)."""
    cfg = make_config()
    layout = RunLayout(tmp_path / "runs" / "tiny")
    barrier = tmp_path / "go"
    env = {"MATH_SFT_FAULT_START_BARRIER": str(barrier), "MATH_SFT_FAULT_SLOW_SAVE_S": "0.3"}
    procs = [start_service("trainer", "--config", cfg, log=tmp_path / f"t{i}.log", env_extra=env) for i in range(2)]
    wait_for(lambda: all(Path(f"{barrier}.{p.pid}").exists() for p in procs), 120, "both trainers at the barrier")
    assert not layout.run_dir.exists()
    barrier.touch()
    loser = wait_for(lambda: next((p for p in procs if p.poll() is not None), None), 120, "one trainer refused")
    (winner,) = [p for p in procs if p is not loser]
    refusal = (tmp_path / f"t{procs.index(loser)}.log").read_text()
    assert loser.returncode == 2 and f"another trainer is training this run (pid {winner.pid} on" in refusal
    assert winner.poll() is None and layout.trainer_lock_path.is_file()
    with pytest.raises(RunInUse), TrainerLock(layout):  # the winner still holds the run: a third is refused too
        pass
    assert winner.wait(300) == 0
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 2, 4, 6]
    assert layout.trainer_lock_path.is_file() and not list(layout.run_dir.parent.glob(".tmp_*"))


def test_rerunning_a_finished_run_does_nothing_and_keeps_its_config(run_copy, make_config):
    before = (run_copy / "config.yaml").read_text()
    proc = run_service("trainer", "--config", make_config())
    assert "already trained to step 6 (training.max_steps=6); nothing to do" in proc.stdout
    assert (run_copy / "config.yaml").read_text() == before
    assert list(list_ready_checkpoints(run_copy / "checkpoints")) == [0, 2, 4, 6]


def test_resume_refuses_changes_to_the_past_and_states_extensions(trained_run, tmp_path, make_config):
    run = rewind_copy(trained_run, tmp_path / "runs" / "tiny", to_step=2)
    bad = run_service("trainer", "--config", make_config({"training": {"batch_size": 4, "seed": 1}}), check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "training.batch_size: 8 -> 4" in bad.stderr and "training.seed: 0 -> 1" in bad.stderr  # every change at once
    assert list(list_ready_checkpoints(run / "checkpoints")) == [0, 2]
    out = run_service("trainer", "--config", make_config({"training": {"max_steps": 8}})).stdout
    assert "resume: training.max_steps: 6 -> 8" in out
    assert "the cosine schedule now ends at step 8, not 6: learning rate at step 2 is" in out
    assert list(list_ready_checkpoints(run / "checkpoints")) == [0, 2, 4, 6, 8]


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_step_trained_again(run_copy, make_config):
    flip_byte(run_copy / "checkpoints" / "step_00000006" / "model.safetensors")
    proc = run_service("trainer", "--config", make_config())
    assert "moved it aside to" in proc.stderr and "corrupt_step_00000006" in proc.stderr
    assert "resumed from" in proc.stdout and "(step 4)" in proc.stdout
    assert (run_copy / "checkpoints" / "corrupt_step_00000006").is_dir()
    assert list(list_ready_checkpoints(run_copy / "checkpoints")) == [0, 2, 4, 6]
    verify_checkpoint(run_copy / "checkpoints" / "step_00000006")


def test_a_tampered_trainer_state_is_refused_in_one_line_and_never_run(run_copy, tmp_path, make_config):
    ckpt = run_copy / "checkpoints" / "step_00000006"
    marker = tmp_path / "pwned"
    payload = (
        "import os, torch\nclass P:\n    def __reduce__(self):\n        return (os.system, ('touch "
        + str(marker)
        + "',))\n"
        f"torch.save({{'optimizer': P()}}, {str(ckpt / 'trainer_state' / 'state.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", payload], check=True)
    from shared.protocol import atomic_write_json, build_manifest  # READY updated to match, as an attacker would

    atomic_write_json(ckpt / READY, build_manifest(ckpt, 6, "x"))
    proc = run_service("trainer", "--config", make_config({"training": {"max_steps": 8}}), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "state.pt: refused: not a plain tensor file" in proc.stderr and "weights_only=False" not in proc.stderr
    assert not marker.exists()


def test_losses_match_a_plain_loop_with_clipping(trained_run):
    """The trainer's losses against an independent plain loop (whole batch at once, clip, AdamW): the
    clipping, the schedule and the loss normalisation are checked against code that is not the trainer's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.config import load_config
    from shared.data import load_dataset, load_prompt_template, render_prompt
    from trainer.sft import tokenize_prompt_and_output
    from trainer.train import DataOrder, lr_at

    cfg = load_config(trained_run / "config.yaml")
    tc = cfg.training
    logged = {r["train_step"]: r for r in train_log(trained_run)}
    assert max(r["train/grad_norm"] for r in logged.values()) > tc.max_grad_norm  # clipping is active in this run
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(trained_run / "base_model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "base_model")
    template = load_prompt_template(cfg.prompt_template_path())
    data = load_dataset(tc.data)
    order = DataOrder(len(data), tc.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.learning_rate, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay
    )
    for step in range(tc.max_steps):
        batch = [data[order[p]] for p in range(step * tc.batch_size, (step + 1) * tc.batch_size)]
        mb = tokenize_prompt_and_output(
            [render_prompt(template, ex) for ex in batch],
            [ex.response for ex in batch],
            tokenizer,
            max_len=tc.max_seq_len,
        )
        logits = model(input_ids=mb["input_ids"]).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), mb["labels"], reduction="none")
        loss = (nll * mb["response_mask"]).sum() / mb["response_mask"].sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        opt.step()
        opt.zero_grad()
        assert logged[step + 1]["train/loss"] == pytest.approx(loss.item(), abs=2e-5), step
        assert logged[step + 1]["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-4), step


def test_a_failed_wandb_start_leaves_no_half_made_run(tmp_path, make_config):
    """W&B refuses to start (here: a malformed API key, refused before any network use): one line, and the new
    run folder is removed again; the evaluator's new results folder likewise."""
    cfg = make_config({"wandb": {"mode": "online"}})
    bad_key = {"WANDB_API_KEY": "short"}
    proc = run_service("trainer", "--config", cfg, env_extra=bad_key, check=False)
    assert proc.returncode == 2 and "W&B (online) could not start" in proc.stderr and "Traceback" not in proc.stderr
    assert "short" not in proc.stderr  # no secret in the message
    assert not (tmp_path / "runs" / "tiny").exists()
    run_service("trainer", "--config", make_config(name="ok.yaml"))
    out_dir = tmp_path / "fresh_results"
    ckpt = RunLayout(tmp_path / "runs" / "tiny").checkpoint_dir(2)
    proc = run_service("evaluator", "--config", cfg, "--ckpt", ckpt, "--out", out_dir, env_extra=bad_key, check=False)
    assert proc.returncode == 2 and "W&B (online) could not start" in proc.stderr
    assert not out_dir.exists()
