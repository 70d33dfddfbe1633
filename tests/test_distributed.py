"""FSDP2 on the CPU: two processes under torchrun with the gloo backend."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO, TINY, flip_byte, rewind_copy, run_service, service_env
from shared.protocol import RunLayout, list_ready_checkpoints, verify_checkpoint


def torchrun(cfg, nproc=2, check=True, env_extra=None):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "trainer",
            "--config",
            str(cfg),
        ],
        cwd=REPO,
        env=service_env(**(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(run_dir):
    return {
        r["train_step"]: r["train/loss"]
        for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
    }


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("fsdp")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "runs_dir": str(root / "runs")}))
    torchrun(cfg)
    return root / "runs" / "tiny"


def test_two_processes_match_one_with_the_same_global_batch(trained_run, sharded_run):
    one, two = losses(trained_run), losses(sharded_run)
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    a = load_file(RunLayout(trained_run).checkpoint_dir(6) / "model.safetensors")
    b = load_file(RunLayout(sharded_run).checkpoint_dir(6) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-4, name


def rows_per_rank(run_dir, micro_batch_tokens, nproc=2):
    """For each step of a finished tiny run, how many packed rows each rank's own examples make."""
    from transformers import AutoTokenizer

    from shared.config import load_config
    from shared.data import load_dataset, load_prompt_template, render_prompt
    from trainer.packing import group_by_budget, tokenize_examples
    from trainer.train import DataOrder

    tc = load_config(run_dir / "config.yaml").training
    template = load_prompt_template(str(REPO / "prompts" / "r1_zero.prompt"))
    train, tokenizer = load_dataset(tc.data), AutoTokenizer.from_pretrained(run_dir / "base_model")
    order, per_rank = DataOrder(len(train), tc.seed), tc.batch_size // nproc
    counts = []
    for step in range(tc.max_steps):
        counts.append([])
        for rank in range(nproc):
            first = step * tc.batch_size + rank * per_rank
            batch = [train[order[p]] for p in range(first, first + per_rank)]
            examples = tokenize_examples(
                [render_prompt(template, ex) for ex in batch], [ex.response for ex in batch], tokenizer, tc.max_seq_len
            )
            counts[-1].append(len(group_by_budget([len(ids) - 1 for ids, _ in examples], micro_batch_tokens)))
    return counts


def test_two_processes_packed_match_one_padded_when_ranks_pack_into_different_numbers_of_rows(trained_run, tmp_path):
    """FSDP pairs the ranks' passes up: a rank whose examples make fewer packed rows runs filler rows, which add
    nothing. The losses, gradient norms and weights stay those of one process. Here each decoder layer is its
    own FSDP unit, with the next unit's all-gather prefetched (the sharded_run has both layers in one unit)."""
    import yaml

    training = {**TINY["training"], "micro_batch_tokens": 160, "fsdp_layers_per_unit": 1}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "runs_dir": str(tmp_path / "runs"), "training": training}))
    torchrun(cfg)
    packed = tmp_path / "runs" / "tiny"
    assert any(len(set(step)) > 1 for step in rows_per_rank(packed, 160))  # the filler rows were needed
    one, two = losses(trained_run), losses(packed)
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    a = load_file(RunLayout(trained_run).checkpoint_dir(6) / "model.safetensors")
    b = load_file(RunLayout(packed).checkpoint_dir(6) / "model.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-4, name


def test_two_processes_skip_a_save_together(tmp_path, make_config):
    """checkpoint_when_busy=skip with two ranks: both see the save in flight the same way (the decision is
    all-reduced), skip the same steps, and finish with whole checkpoints; no rank waits in a collective alone."""
    cfg = make_config({"training": {"checkpoint_when_busy": "skip"}})
    # 2 s per file: step 0's save outlasts steps 1-4 even with FSDP's first-step set-up on a loaded machine
    out = torchrun(cfg, env_extra={"MATH_SFT_FAULT_SLOW_SAVE_S": "2.0"}).stdout
    layout = RunLayout(tmp_path / "runs" / "tiny")
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [0, 6]
    assert "2 not saved, the disk being behind: steps [2, 4]" in out
    for step in (0, 6):
        manifest = verify_checkpoint(layout.checkpoint_dir(step))
        assert {"trainer_state/state_rank00000.pt", "trainer_state/state_rank00001.pt"} <= set(manifest["files"])


def test_sharded_checkpoint_layout(sharded_run):
    ckpt = RunLayout(sharded_run).checkpoint_dir(6)
    manifest = verify_checkpoint(ckpt)
    assert {"trainer_state/state_rank00000.pt", "trainer_state/state_rank00001.pt", "model.safetensors"} <= set(
        manifest["files"]
    )
    assert json.loads((ckpt / "trainer_state" / "trainer_state.json").read_text())["world_size"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True)  # ordinary safetensors, loadable as is


def test_resume_on_the_same_number_of_processes(sharded_run, tmp_path, make_config):
    run = rewind_copy(sharded_run, tmp_path / "runs" / "tiny", to_step=2)
    out = torchrun(make_config()).stdout
    assert "resumed from" in out
    resumed, straight = losses(run), losses(sharded_run)
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)


def test_with_every_checkpoint_corrupt_and_no_base_model_the_run_starts_over_and_rank_0_alone_builds_it(
    sharded_run, tmp_path, make_config
):
    run = rewind_copy(sharded_run, tmp_path / "runs" / "tiny", to_step=2)
    layout = RunLayout(run)
    shutil.rmtree(layout.base_model_dir)
    for path in list_ready_checkpoints(layout.checkpoints_dir).values():
        flip_byte(path / "model.safetensors")
    out = torchrun(make_config())
    assert out.stderr.count("moved it aside to") == 2 and "resumed from" not in out.stdout
    assert sorted(p.name for p in layout.checkpoints_dir.glob("corrupt_*")) == [
        "corrupt_step_00000000",
        "corrupt_step_00000002",
    ]
    assert not layout.tmp_base_model_dir.exists() and layout.base_model_dir.is_dir()
    started_over, straight = losses(run), losses(sharded_run)
    assert sorted(started_over) == sorted(straight)
    for step in straight:
        assert started_over[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)


def test_resume_on_a_different_number_is_a_clear_error(sharded_run, tmp_path, make_config):
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(sharded_run, run)
    proc = run_service("trainer", "--config", make_config({"training": {"max_steps": 8}}), check=False)
    assert proc.returncode == 2
    assert "was written by 2 training process(es) and this run has 1" in proc.stderr


def test_make_train_with_two_gpus_launches_torchrun(tmp_path, make_config):
    """`training.gpus: [0, 1]` on a two-GPU machine re-launches the trainer under torchrun, one process
    per GPU. Only the GPUs are faked here (an nvidia-smi that lists two); the processes run on the CPU."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\necho 'GPU 1: fake'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = service_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("CUDA_VISIBLE_DEVICES")
    cfg = make_config({"training": {"gpus": [0, 1], "max_steps": 2}})
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launching 2 processes" in proc.stdout
    manifest = verify_checkpoint(RunLayout(tmp_path / "runs" / "tiny").checkpoint_dir(2))
    assert "trainer_state/state_rank00001.pt" in manifest["files"]


def _rank_pids(parent_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (their environment names the rank)."""
    import os

    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == parent_pid or any(e == f"TORCHELASTIC_AGENT_PID={parent_pid}".encode() for e in env):
            ranks = [int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK=")]
            if ranks:
                found[ranks[0]] = int(entry)
    return found


@pytest.mark.parametrize("how", ["sigterm-to-rank-1", "ctrl-c-to-the-launcher"])
def test_a_stop_on_any_rank_stops_all_at_the_same_step(tmp_path, make_config, how):
    """Both ranks leave after the same step, the pending checkpoint completes, every rank exits 0, and the
    run resumes from it; none waits in a collective (the old way: until a timeout, then exit 2)."""
    import os
    import signal
    import time

    from conftest import wait_for
    from shared.protocol import READY, list_ready_checkpoints

    cfg = make_config({"training": {"max_steps": 400, "eval_every": 4, "gpus": [0, 1]}})
    layout = RunLayout(tmp_path / "runs" / "tiny")
    log = open(tmp_path / "torchrun.log", "w")
    env = {**service_env(), "MATH_SFT_FAULT_SLOW_SAVE_S": "0.2"}
    if how == "sigterm-to-rank-1":
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "trainer",
            "--config",
            str(cfg),
        ]
    else:  # `make train` with training.gpus [0, 1]: the trainer launches torchrun (GPUs faked as in the test above)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\necho 'GPU 1: fake'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
        env.pop("CUDA_VISIBLE_DEVICES")
        argv = [sys.executable, "-m", "trainer", "--config", str(cfg)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for((layout.checkpoint_dir(4) / READY).exists, 180, "two checkpoints")
        t0 = time.monotonic()
        if how == "sigterm-to-rank-1":
            ranks = wait_for(lambda: r if len(r := _rank_pids(proc.pid)) == 2 else None, 30, "the two ranks")
            os.kill(ranks[1], signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C does to `make train`'s process
        code = proc.wait(120)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        log.close()
    out = (tmp_path / "torchrun.log").read_text()
    assert "Traceback" not in out and "exitcode  : 2" not in out, out[-3000:]
    assert code == 0, out[-3000:]
    assert "stopped at step" in out and "done at step" in out, out[-3000:]
    assert took < 60  # no rank waited for a collective timeout
    assert not [p for p in layout.checkpoints_dir.iterdir() if p.name.startswith(".tmp")]
    steps = list(list_ready_checkpoints(layout.checkpoints_dir))
    for step in steps:
        manifest = verify_checkpoint(layout.checkpoint_dir(step))
        assert {"trainer_state/state_rank00000.pt", "trainer_state/state_rank00001.pt"} <= set(manifest["files"])
    resumed = torchrun(make_config({"training": {"max_steps": steps[-1] + 2, "eval_every": 4}}, name="resume.yaml"))
    assert f"(step {steps[-1]})" in resumed.stdout + resumed.stderr
