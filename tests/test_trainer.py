"""The trainer as users run it: a real subprocess training a 2-layer model for a few steps."""

import json
import resource
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, rewind_copy, run_service, service_env, start_service, wait_for
from shared.protocol import READY, Lease, RunLayout, list_ready_checkpoints, verify_checkpoint

CKPT_FILES = {
    "READY", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "trainer_state/state.pt", "trainer_state/trainer_state.json",
}


def files_of(path):
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def train_log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_checkpoint_files_and_logs(trained_run):
    layout = RunLayout(trained_run)
    assert sorted(p.name for p in layout.checkpoints_dir.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    for step in (2, 4, 6):
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
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6)
    for step in (4, 6):
        a = (RunLayout(run).checkpoint_dir(step) / "model.safetensors").read_bytes()
        b = (RunLayout(trained_run).checkpoint_dir(step) / "model.safetensors").read_bytes()
        assert a == b


def test_sigkill_during_save_leaves_nothing_loadable_and_resume_cleans_up(tmp_path, make_config):
    cfg = make_config()
    layout = RunLayout(tmp_path / "runs" / "tiny")
    proc = start_service("trainer", "--config", cfg, log=tmp_path / "t.log", env_extra={"MATH_SFT_FAULT_SLOW_SAVE_S": "0.5"})
    try:
        # Wait until the second save is in progress (the first one published), then kill.
        wait_for(lambda: layout.checkpoint_dir(2).joinpath(READY).exists() and layout.tmp_checkpoint_dir(4).exists(), 120, "save of step 4")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert layout.tmp_checkpoint_dir(4).exists()
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [2]
    assert not layout.checkpoint_dir(4).exists()
    out = run_service("trainer", "--config", cfg).stdout
    assert "removed incomplete checkpoint" in out and "resumed from" in out
    assert not layout.tmp_checkpoint_dir(4).exists()
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [2, 4, 6]
    for step in (2, 4, 6):
        verify_checkpoint(layout.checkpoint_dir(step))


def test_write_error_during_save_fails_loudly_and_keeps_earlier_checkpoints(tmp_path, make_config):
    """A file-size limit makes the OS refuse the write (EFBIG), as a full disk would (ENOSPC)."""
    layout = RunLayout(tmp_path / "runs" / "tiny")
    run_service("trainer", "--config", make_config({"training": {"max_steps": 2}}))
    before = (layout.checkpoint_dir(2) / "model.safetensors").read_bytes()

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", make_config({"training": {"max_steps": 4}})], cwd=REPO,
                          env=service_env(), capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode != 0
    assert "saving checkpoint 4" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [2]
    assert not layout.tmp_checkpoint_dir(4).exists() and not layout.checkpoint_dir(4).exists()
    verify_checkpoint(layout.checkpoint_dir(2))
    assert (layout.checkpoint_dir(2) / "model.safetensors").read_bytes() == before


def test_retention_keeps_leased_and_needed_checkpoints(tmp_path, make_config):
    layout = RunLayout(tmp_path / "runs" / "tiny")
    cfg = make_config({"training": {"max_steps": 10, "keep_last": 1}})
    layout.leases_dir.mkdir(parents=True)
    from shared.protocol import Ledger, Status

    Ledger(layout.eval_dir("default")).set(6, Status.PENDING)  # an evaluator still means to back-fill 6
    with Lease(layout, 2):  # held by this (live) process
        run_service("trainer", "--config", cfg)
        assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [2, 6, 10]
    for step in (2, 6, 10):
        verify_checkpoint(layout.checkpoint_dir(step))
