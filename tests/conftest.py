"""Shared fixtures: a tiny config, a trained tiny run to copy, helpers to run the real services."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"

# Small enough that a service starts, trains and evaluates in seconds on one CPU core.
TINY = {
    "run_name": "tiny",
    "prompt_template": str(REPO / "prompts" / "r1_zero.prompt"),
    "model": {
        "path": "embedded:tiny-qwen2",
        "embedded_hidden_size": 64,
        "embedded_num_layers": 2,
        "embedded_vocab_size": 400,
    },
    "training": {
        "data": {"path": "embedded:arithmetic", "split": "train", "num_examples": 400},
        "max_steps": 6,
        "batch_size": 8,
        "micro_batch_size": 4,
        "max_seq_len": 128,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "eval_every": 2,
        # Tests assert exact checkpoint lists, with saves every 2 fast steps (and slowed on purpose): every save
        # waits for the previous one. The default, skip, has its own test.
        "checkpoint_when_busy": "wait",
        "num_threads": 1,
    },
    "evaluation": {
        "data": {"path": "embedded:arithmetic", "split": "test", "num_examples": 40},
        "num_samples": 8,
        "temperature": 0.0,
        "max_tokens": 24,
        "hf_batch_size": 8,
        "num_grader_workers": 1,
        "rescan_s": 2.0,
    },
    "wandb": {"mode": "disabled"},
}


def deep_update(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_config(tmp_path):
    """Write a tiny config (with updates) under tmp_path; returns its path. runs_dir is tmp_path/runs."""

    def make(updates: dict | None = None, name: str = "cfg.yaml") -> Path:
        data = deep_update({**TINY, "runs_dir": str(tmp_path / "runs")}, updates or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return make


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        {
            # the repository first; what the caller's path adds (e.g. a GPU machine's vLLM) stays after it
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def run_service(
    module: str, *args: str, env_extra: dict | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        check=False,
        cwd=REPO,
        env=service_env(**(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


_STARTED: list[subprocess.Popen] = []


def start_service(module: str, *args: str, log: Path, env_extra: dict | None = None) -> subprocess.Popen:
    """Start a service in the background; the `_no_leftover_services` fixture kills it if a test fails."""
    f = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=service_env(**(env_extra or {})),
        stdout=f,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _STARTED.append(proc)
    return proc


def start_trainer_saving(
    cfg: Path,
    log: Path,
    step: int,
    *,
    published: tuple[int, ...] = (),
    slow_save_s: float = 0.5,
    env_extra: dict | None = None,
) -> subprocess.Popen:
    """Start the trainer with every save slowed by `slow_save_s` (MATH_SFT_FAULT_SLOW_SAVE_S) and return it once the
    save of `step` is in progress (its temporary folder exists) with the steps `published` already published."""
    from shared.config import load_config
    from shared.protocol import READY, RunLayout

    layout = RunLayout(load_config(cfg).run_dir)
    proc = start_service(
        "trainer",
        "--config",
        cfg,
        log=log,
        env_extra={**(env_extra or {}), "MATH_SFT_FAULT_SLOW_SAVE_S": str(slow_save_s)},
    )
    wait_for(
        lambda: (
            layout.tmp_checkpoint_dir(step).exists()
            and all((layout.checkpoint_dir(s) / READY).exists() for s in published)
        ),
        120,
        f"the save of step {step}" + (f" after steps {list(published)} were published" if published else ""),
    )
    return proc


@pytest.fixture(autouse=True)
def _no_leftover_services():
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoints at steps 2, 4, 6), trained once per session; copy before changing."""
    root = tmp_path_factory.mktemp("trained")
    data = {**TINY, "runs_dir": str(root / "runs")}
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run_service("trainer", "--config", cfg)
    return root / "runs" / "tiny"


def flip_byte(path: Path, index: int = -1) -> None:
    """Corrupt a file in place: one byte inverted, so its content hash no longer matches its manifest."""
    data = bytearray(path.read_bytes())
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def rewind_copy(run: Path, dest: Path, to_step: int) -> Path:
    """Copy a finished run as if it had been stopped right after `to_step`'s checkpoint."""
    from shared.protocol import list_ready_checkpoints

    shutil.copytree(run, dest)
    for step, path in list_ready_checkpoints(dest / "checkpoints").items():
        if step > to_step:
            shutil.rmtree(path)
    (dest / "train_log.jsonl").unlink()
    return dest


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    dest = tmp_path / "runs" / "tiny"
    shutil.copytree(trained_run, dest)
    return dest


def publish_copy(src_ckpt: Path, run_dir: Path, step: int) -> Path:
    """Publish a copy of an existing checkpoint as `step` of `run_dir`, through the real protocol."""
    from shared.protocol import READY, RunLayout, publish_checkpoint

    layout = RunLayout(run_dir)
    layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.tmp_checkpoint_dir(step)
    shutil.copytree(src_ckpt, tmp, ignore=shutil.ignore_patterns(READY))
    publish_checkpoint(tmp, layout.checkpoint_dir(step), step, "test")
    return layout.checkpoint_dir(step)


def ledger_of(run_dir: Path, name: str = "default") -> dict:
    from shared.protocol import Ledger, RunLayout

    try:
        return Ledger(RunLayout(run_dir).eval_dir(name)).read()
    except ValueError:
        return {}
