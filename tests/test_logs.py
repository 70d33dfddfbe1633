"""One log format for both services, and which errors are one line: real service processes (no training)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO, service_env

LINE = re.compile(r"^\d\d:\d\d:\d\d (trainer|evaluator) (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")
FILE_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (trainer|evaluator) (WARNING|ERROR|CRITICAL) \S")


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv],
        check=False,
        cwd=REPO,
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def injected(module: str, target: str, exc: str) -> list[str]:
    """argv running `python -m <module>` with `target` (module.function it imports) replaced by one that raises."""
    owner, name = target.rsplit(".", 1)
    code = (
        f"import runpy, sys, {owner}\n"
        f"def broken(*a, **k):\n    raise {exc}\n"
        f"{owner}.{name} = broken\n"
        f"sys.argv[0] = {module!r}\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    return ["-c", code]


def test_a_user_error_is_one_line_exit_2_and_with_debug_its_traceback(make_config):
    typo = make_config({"training": {"learning_rat": 1}}, name="typo.yaml")
    for module in ("trainer", "evaluator"):
        proc = run(["-m", module, "--config", str(typo)])
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and LINE.match(lines[0]) and " ERROR " in lines[0], proc.stderr
        assert "unknown key 'training.learning_rat'" in lines[0]
    debug = run(["-m", "trainer", "--config", str(typo), "--debug"])
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    assert run(["-m", "trainer", "--config", str(typo)], MATH_SFT_DEBUG="1").stderr.count("Traceback") == 1


def test_a_genuine_bug_keeps_its_traceback_and_exit_1(make_config, tmp_path):
    """A ValueError or OSError from deep inside (not one of the project's user errors) is a bug, not bad input."""
    cfg = str(make_config())
    (tmp_path / "model").mkdir()
    cases = [
        ("trainer", "trainer.train.train", "ValueError('deep inside torch')", "ValueError: deep inside torch"),
        ("trainer", "trainer.train.train", "OSError(5, 'Input/output error')", "OSError: [Errno 5]"),
        ("evaluator", "evaluator.backends.make_backend", "ValueError('bad shape')", "ValueError: bad shape"),
    ]
    for module, target, exc, last_line in cases:
        proc = run(
            [
                *injected(module, target, exc),
                "--config",
                cfg,
                *(["--ckpt", str(tmp_path / "model")] if module == "evaluator" else []),
            ]
        )
        assert proc.returncode == 1, (module, proc.stderr)
        assert "Traceback (most recent call last)" in proc.stderr and "in broken" in proc.stderr, proc.stderr
        assert f"a bug in {module}, not a problem with your input" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(last_line), proc.stderr


def test_info_on_stdout_in_the_format_warnings_and_errors_also_in_the_runs_log_file(run_copy, make_config, tmp_path):
    """The trainer's start line is INFO on stdout; its error (a GPU that does not exist) goes to stderr and is
    appended to the run's logs/trainer.log, with the date."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_API_KEY": "0123456789abcdef-secret"}
    cfg = make_config({"training": {"gpus": [3]}})
    log_file = run_copy / "logs" / "trainer.log"
    for attempt in (1, 2):
        proc = subprocess.run(
            [sys.executable, "-m", "trainer", "--config", str(cfg)],
            check=False,
            cwd=REPO,
            env={k: v for k, v in service_env(**env).items() if k != "CUDA_VISIBLE_DEVICES"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and LINE.match(proc.stderr) and " ERROR " in proc.stderr, proc.stderr
        lines = log_file.read_text().splitlines()
        assert len(lines) == attempt and all(FILE_LINE.match(line) for line in lines), lines  # appended
        assert "training.gpus=[3]: GPU 3 does not exist" in lines[-1]
    ok = run(["-m", "evaluator", "--config", str(make_config()), "--run", str(run_copy), "--once"], **env)
    assert ok.returncode == 0, ok.stderr
    out = ok.stdout.splitlines()
    assert out and all(LINE.match(line) for line in out), ok.stdout
    assert any(" INFO " in line for line in out)
    assert not (run_copy / "logs" / "evaluator.log").exists()  # nothing went wrong: no file


def test_secrets_never_reach_the_terminal_or_the_file(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    key = "local-0123456789abcdef0123456789abcdef"
    code = (
        "import logging\n"
        "from pathlib import Path\n"
        "from shared.logs import setup_logging\n"
        f"setup_logging('evaluator', run_dir=Path({str(run_dir)!r}))\n"
        f"logging.getLogger('wandb').warning('login with key %s failed', {key!r})\n"
        f"logging.getLogger('evaluator.x').info('the key is %s', {key!r})\n"
    )
    proc = run(["-c", code], WANDB_API_KEY=key)
    assert proc.returncode == 0, proc.stderr
    text = (run_dir / "logs" / "evaluator.log").read_text()
    assert "login with key *** failed" in text and "the key is" not in text  # INFO is not in the file
    assert "the key is ***" in proc.stdout and key not in proc.stdout + proc.stderr + text


def test_debug_lines_only_with_debug_and_no_log_folder_made_in_a_folder_that_is_no_run(tmp_path):
    not_a_run = tmp_path / "somewhere"
    not_a_run.mkdir()
    code = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from shared.logs import debug_requested, setup_logging\n"
        f"setup_logging('trainer', debug=debug_requested(), run_dir=Path({str(not_a_run)!r}))\n"
        "logging.getLogger('trainer.x').debug('a detail')\n"
        "logging.getLogger('filelock').debug('a library detail')\n"
        "logging.getLogger('trainer.x').warning('a warning')\n"
    )
    plain, debug = run(["-c", code]), run(["-c", code, "--debug"])
    assert "a detail" not in plain.stdout and "a detail" in debug.stdout and LINE.match(debug.stdout)
    assert "a library detail" not in debug.stdout + debug.stderr
    assert "a warning" in plain.stderr and "a warning" not in plain.stdout
    assert list(not_a_run.iterdir()) == []
