"""The generate watchdog (evaluation.generate_timeout_s): real threads, real processes, the hf backend on the tiny
model; vLLM itself cannot run here, so its kill path is shown on real stand-in processes."""

import itertools
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import ledger_of, start_service, wait_for
from evaluator import backends
from evaluator.backends import GenerateTimeout, HFBackend, kill_process_tree, run_watched
from shared.config import load_config
from shared.protocol import READY, RunLayout, Status, list_ready_checkpoints

SLACK_S = 20.0
"""Generous: two shared CPU cores. Only bounds that the watchdog fires at all, never how fast anything runs."""


def test_every_tick_restarts_the_deadline_and_silence_ends_it():
    """Work that ticks every 0.2 s for 3 s outlives a 1 s deadline; work that then goes silent is given up on
    no sooner than 1 s after its last tick, and the waiting thread gets each tick."""
    got = []

    def ticking(tick, seconds):
        for _ in range(int(seconds / 0.2)):
            time.sleep(0.2)
            tick(1)
        return "done"

    assert run_watched(lambda tick: ticking(tick, 3.0), got.append, timeout_s=1.0) == "done"
    assert sum(got) == 15
    last_tick = []

    def then_silent(tick):
        ticking(tick, 1.0)
        last_tick.append(time.monotonic())
        threading.Event().wait()  # a wedged engine

    with pytest.raises(GenerateTimeout, match=r"no progress for 1 s \(evaluation.generate_timeout_s\)"):
        run_watched(then_silent, None, timeout_s=1.0)
    waited = time.monotonic() - last_tick[0]
    assert 1.0 <= waited < 1.0 + SLACK_S


def test_an_error_in_the_work_reaches_the_caller():
    def fails(tick):
        raise OSError("engine died")

    with pytest.raises(OSError, match="engine died"):
        run_watched(fails, None, timeout_s=5.0)


@pytest.fixture
def sampled(trained_run, make_config, monkeypatch):
    """A config with a short generate_timeout_s and sampled generation (the random stream matters), the tiny
    model's step-6 checkpoint, prompts and seeds; this process's generate count starts at 0 (the hang hook)."""
    monkeypatch.setattr(backends, "_GENERATE_CALLS", itertools.count())
    cfg = load_config(
        make_config({"evaluation": {"generate_timeout_s": 2.0, "temperature": 1.0, "hf_batch_size": 4}}), []
    )
    prompts = [f"What is {i} + {i}?" for i in range(8)]
    return cfg, RunLayout(trained_run).checkpoint_dir(6), prompts, list(range(100, 108))


def fresh_texts(cfg, ckpt, prompts, seeds):
    backend = HFBackend(cfg.evaluation, False)
    backend.load(ckpt)
    try:
        return [g.text for g in backend.generate(prompts, seeds, cfg.evaluation.eval_sets()[0])]
    finally:
        backend.close()


def test_a_hung_generate_times_out_at_the_deadline_and_the_next_load_generates_as_new(sampled, monkeypatch):
    cfg, ckpt, prompts, seeds = sampled
    expected = fresh_texts(cfg, ckpt, prompts, seeds)
    monkeypatch.setattr(backends, "_GENERATE_CALLS", itertools.count())
    monkeypatch.setenv("MATH_SFT_FAULT_GENERATE_HANG", "1")
    backend = HFBackend(cfg.evaluation, False)
    backend.load(ckpt)
    sampling = cfg.evaluation.eval_sets()[0]
    t0 = time.monotonic()
    with pytest.raises(GenerateTimeout, match="2 s"):
        backend.generate(prompts, seeds, sampling)
    assert 2.0 <= time.monotonic() - t0 < 2.0 + SLACK_S
    assert backend.model is None and backend.signature is None  # closed: the next load builds a new engine
    assert backend.load(ckpt) == "new-engine"
    ticks = []
    assert [g.text for g in backend.generate(prompts, seeds, sampling, ticks.append)] == expected
    assert sum(ticks) == len(prompts)  # per batch of prompts (token-step ticks count 0)
    backend.close()


def test_a_delay_shorter_than_the_deadline_does_not_trip_it(sampled, monkeypatch):
    """MATH_SFT_FAULT_GENERATE_DELAY_S (a slow evaluator): the delay counts as no progress, so one under the
    deadline passes and one over it trips the watchdog."""
    cfg, ckpt, prompts, seeds = sampled
    expected = fresh_texts(cfg, ckpt, prompts, seeds)
    backend = HFBackend(cfg.evaluation, False)
    backend.load(ckpt)
    sampling = cfg.evaluation.eval_sets()[0]
    monkeypatch.setenv("MATH_SFT_FAULT_GENERATE_DELAY_S", "1.0")
    assert [g.text for g in backend.generate(prompts, seeds, sampling)] == expected
    monkeypatch.setenv("MATH_SFT_FAULT_GENERATE_DELAY_S", "2.5")
    with pytest.raises(GenerateTimeout):
        backend.generate(prompts, seeds, sampling)
    assert backend.model is None


def _engine_core(ready):
    """Stands in for vLLM's engine core: it starts a worker of its own, says so, and hangs."""
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
    worker.start()
    ready.put(worker.pid)
    time.sleep(600)


def _is_gone(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_a_hung_vllm_generate_kills_its_engine_processes_and_closes_the_backend(make_config):
    """vLLM's path with its engine stand-ins: a generate that never progresses raises GenerateTimeout at the
    deadline, the engine core and its worker are SIGKILLed, a bystander child (a grader) is left alone, and the
    backend is closed (the next load builds a new engine)."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    bystander = ctx.Process(target=time.sleep, args=(600,))
    bystander.start()
    core = ctx.Process(target=_engine_core, args=(ready,))
    core.start()
    worker_pid = ready.get(timeout=60)

    class WedgedLLM:  # what a client of a wedged engine does: waits for outputs that never come
        def generate(self, prompts, params, use_tqdm):
            use_tqdm(total=len(prompts))  # the progress bar is made, and never advances
            threading.Event().wait()

    backend = object.__new__(backends.VLLMBackend)  # vLLM cannot be imported here; only its generate path runs
    backend.cfg = load_config(make_config({"evaluation": {"generate_timeout_s": 1.0}}), []).evaluation
    backend.llm, backend.signature, backend._engine_pids = WedgedLLM(), "sig", {core.pid}
    backend.sampling_params = lambda seeds, sampling: [None] * len(seeds)
    try:
        with pytest.raises(GenerateTimeout):
            backend.generate(["a", "b"], [1, 2], backend.cfg.eval_sets()[0])
        core.join(SLACK_S)
        assert core.exitcode == -signal.SIGKILL
        deadline = time.monotonic() + SLACK_S
        while not _is_gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _is_gone(worker_pid)
        assert bystander.is_alive()
        assert backend.llm is None and backend.signature is None and backend._engine_pids == set()
    finally:
        for proc in (core, bystander):
            proc.kill()
            proc.join()
        if not _is_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_a_hung_in_place_reload_is_given_up_on_too(trained_run, make_config):
    """vLLM's in-place reload is a collective of its workers: one that never returns is a hung engine as well."""
    ckpt = RunLayout(trained_run).checkpoint_dir(6)

    class StuckReload:
        def collective_rpc(self, method, kwargs):
            threading.Event().wait()

    backend = object.__new__(backends.VLLMBackend)
    backend.cfg = load_config(make_config({"evaluation": {"generate_timeout_s": 1.0}}), []).evaluation
    backend.llm, backend.signature, backend._engine_pids = StuckReload(), backends.model_signature(ckpt), set()
    with pytest.raises(GenerateTimeout, match="reloading the weights made no progress for 1 s"):
        backend.load(ckpt)
    assert backend.llm is None and backend.signature is None


def test_vllm_progress_comes_from_its_progress_bar_as_requests_finish(make_config):
    """vLLM's LLM.generate makes its progress bar from the factory passed as use_tqdm and updates it per finished
    request (and reads its format_dict for the speed): each update reaches progress and restarts the deadline,
    also where bars are disabled by default (TQDM_DISABLE=1, as in the services' test environment, is read when
    tqdm is imported: the stand-in passes disable=True instead), so a generation longer than the deadline passes."""
    from types import SimpleNamespace

    class SlowLLM:  # finishes one request every 0.4 s: 2 s in all, against a deadline of 1 s
        def generate(self, prompts, params, use_tqdm):
            for _ in use_tqdm(prompts, desc="Adding requests"):
                pass
            pbar = use_tqdm(total=len(prompts), desc="Processed prompts", dynamic_ncols=True, postfix="", disable=True)
            for _ in prompts:
                time.sleep(0.4)
                pbar.postfix = f"output: {3 / pbar.format_dict['elapsed']:.2f} toks/s"  # as vLLM computes it
                pbar.update(1)
            pbar.close()
            done = SimpleNamespace(text="so <answer>4</answer>", token_ids=[1, 2, 3], finish_reason="stop")
            return [SimpleNamespace(outputs=[done]) for _ in prompts]

    backend = object.__new__(backends.VLLMBackend)
    backend.cfg = load_config(make_config({"evaluation": {"generate_timeout_s": 1.0}}), []).evaluation
    backend.llm, backend.signature, backend._engine_pids = SlowLLM(), "sig", set()
    backend.sampling_params = lambda seeds, sampling: [None] * len(seeds)
    got = []
    generated = backend.generate(["a"] * 5, list(range(5)), backend.cfg.eval_sets()[0], got.append)
    assert got == [1] * 5 and [g.num_tokens for g in generated] == [3] * 5 and backend.llm is not None


def test_kill_process_tree_kills_only_the_tree():
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    core = ctx.Process(target=_engine_core, args=(ready,))
    other = ctx.Process(target=time.sleep, args=(600,))
    core.start()
    other.start()
    worker_pid = ready.get(timeout=60)
    try:
        assert sorted(kill_process_tree({core.pid})) == sorted([core.pid, worker_pid])
        core.join(SLACK_S)
        assert core.exitcode == -signal.SIGKILL and other.is_alive()
        assert kill_process_tree({core.pid}) == []  # gone: nothing to kill
    finally:
        other.kill()
        other.join()


HUNG_RUN = {
    "training": {"max_steps": 18, "eval_every": 2, "keep_last": 1, "max_unevaluated": 2},  # 10 saves, step 0 too
    "evaluation": {"generate_timeout_s": 3.0, "engine_start_timeout_s": 5.0, "heartbeat_timeout_s": 10.0},
}


def test_a_hung_generation_neither_fills_the_disk_nor_stops_training_and_its_step_is_evaluated_again(
    tmp_path, make_config
):
    """python -m evaluator whose first generate hangs (MATH_SFT_FAULT_GENERATE_HANG=1) beside python -m trainer
    with keep_last=1 and 10 saves: the published checkpoints stay within keep_last + max_unevaluated (+1: the
    newest is published before the retention pass that makes room for it), training exits 0, the hung engine is
    given up on at the deadline (generate_timeout_s after its step was published, at the earliest) and that step
    is evaluated again after it, with the failed attempt and its reason in the ledger."""
    cfg = make_config(HUNG_RUN)
    run = tmp_path / "runs" / "tiny"
    checkpoints = RunLayout(run).checkpoints_dir
    evaluator = start_service(
        "evaluator", "--config", cfg, log=tmp_path / "eval.log", env_extra={"MATH_SFT_FAULT_GENERATE_HANG": "1"}
    )
    wait_for(lambda: "watching" in (tmp_path / "eval.log").read_text(), 60, "evaluator start")
    # saves slowed (0.5 s a file) so that the hung step is still on disk when its retry comes (3 newer unevaluated
    # checkpoints would delete it)
    trainer = start_service(
        "trainer", "--config", cfg, log=tmp_path / "train.log", env_extra={"MATH_SFT_FAULT_SLOW_SAVE_S": "0.5"}
    )
    published, most_on_disk = {}, 0
    while trainer.poll() is None:
        ready = list_ready_checkpoints(checkpoints) if checkpoints.is_dir() else {}
        most_on_disk = max(most_on_disk, len(ready))
        for step, path in ready.items():
            published.setdefault(step, (path / READY).stat().st_mtime if (path / READY).exists() else time.time())
        time.sleep(0.02)
    assert trainer.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    assert len(published) == 10 and most_on_disk <= 1 + 2 + 1, (sorted(published), most_on_disk)
    assert len(list_ready_checkpoints(checkpoints)) <= 1 + 2
    wait_for(lambda: ledger_of(run).get(18, {}).get("status") == Status.DONE, 120, "the last step evaluated")
    evaluator.send_signal(signal.SIGINT)
    assert evaluator.wait(30) == 0
    log_text = (tmp_path / "eval.log").read_text()
    assert "no progress for 3 s (evaluation.generate_timeout_s)" in log_text, log_text[-3000:]
    [(hung_step, hung)] = [(s, e) for s, e in ledger_of(run).items() if e.get("failed_attempts")]
    [failure] = hung["failed_attempts"]
    assert "generate_timeout_s" in failure["reason"] and failure["attempt"] == 1
    assert hung["status"] == Status.DONE and hung["attempts"] == 2, hung
    given_up_after_s = failure["time"] - published[hung_step]
    assert 3.0 <= given_up_after_s < 3.0 + SLACK_S + 10, given_up_after_s  # + the claim, snapshot and load
