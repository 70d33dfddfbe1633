"""vLLM backend on a real GPU (opt-in: `pytest -m gpu`, run by `make gpu-check`)."""

import os

import pytest

from conftest import run_service

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    pytest.importorskip("vllm")
    import yaml

    root = tmp_path_factory.mktemp("gpu")
    cfg = root / "cfg.yaml"
    from conftest import TINY

    data = {
        **TINY,
        "runs_dir": str(root / "runs"),
        "model": {
            "path": "embedded:tiny-qwen2",
            "embedded_hidden_size": 256,
            "embedded_num_layers": 4,
            "embedded_vocab_size": 512,
        },
        "training": {
            **TINY["training"],
            "data": {"path": "embedded:arithmetic", "split": "train"},
            "max_steps": 600,
            "batch_size": 64,
            "micro_batch_size": 64,
            "learning_rate": 1e-3,
            "warmup_steps": 50,
            "eval_every": 300,
            "log_every": 100,
            "num_threads": None,
        },
    }
    cfg.write_text(yaml.safe_dump(data))
    run_service(
        "trainer",
        "--config",
        cfg,
        env_extra={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") or "0"},
    )
    return root / "runs" / "tiny" / "checkpoints"


def prompts(n=64):
    from conftest import REPO
    from shared.data import generate_arithmetic, load_prompt_template, render_prompt

    template = load_prompt_template(REPO / "prompts" / "r1_zero.prompt")
    return [render_prompt(template, ex) for ex in generate_arithmetic("test", n)]


def test_vllm_in_place_reload_matches_transformers(gpu_run):
    from evaluator.backends import HFBackend, VLLMBackend
    from shared.config import EvaluationConfig

    cfg = EvaluationConfig(temperature=0.0, max_tokens=48, gpu_memory_utilization=0.3, hf_batch_size=64)
    greedy = cfg.eval_sets()[0]
    ps = prompts()
    seeds = list(range(len(ps)))
    vllm = VLLMBackend(cfg, trust_remote_code=False, num_gpus=1)
    assert vllm.load(gpu_run / "step_00000300") == "new-engine"
    before = [g.text for g in vllm.generate(ps, seeds, greedy)]
    fp_before = vllm.fingerprint(ps[0])
    assert vllm.load(gpu_run / "step_00000600") == "in-place"
    after = [g.text for g in vllm.generate(ps, seeds, greedy)]
    assert vllm.fingerprint(ps[0]) != fp_before

    hf = HFBackend(cfg, trust_remote_code=False)
    hf.load(gpu_run / "step_00000600")
    reference = [g.text for g in hf.generate(ps, seeds, greedy)]
    same = sum(a == b for a, b in zip(after, reference, strict=False)) / len(ps)
    changed = sum(a != b for a, b in zip(after, before, strict=False)) / len(ps)
    print(f"vLLM vs transformers identical: {same:.2%}; changed by the reload: {changed:.2%}")
    assert same >= 0.95
    assert changed > 0
    vllm.close()


def test_an_engine_child_that_does_not_start_in_time_falls_back_to_in_process(gpu_run, tmp_path):
    """The real service, with a start-up bound no engine meets: the child is killed, the engine is built in the
    evaluator's own process, one warning says so, and the checkpoint is evaluated. The bound (8 s) passes while
    the engine core starts (about 20 s), after vLLM's model inspection helper has finished: a bound of 1 s
    killed that helper, and vLLM then refused the model in-process too (it keeps the failed inspection)."""
    proc = run_service(
        "evaluator",
        "--config",
        gpu_run.parent.parent.parent / "cfg.yaml",
        "--ckpt",
        gpu_run / "step_00000600",
        "--out",
        tmp_path / "out",
        "evaluation.backend=vllm",
        "evaluation.engine_start_timeout_s=8",
        "evaluation.gpu_memory_utilization=0.3",
        env_extra={
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") or "0",
        },
    )
    # a warning: on stderr (shared/logs.py), once
    assert proc.stderr.count("vLLM's engine in a child process failed (did not start within 8s)") == 1, proc.stderr
    assert (tmp_path / "out" / "step_00000600.json").is_file()


def test_a_hung_vllm_generate_is_killed_and_its_step_evaluated_again(gpu_run):
    """The real service on a finished run, its first generate wedged (MATH_SFT_FAULT_GENERATE_HANG=1) with the
    engine core in a child process: after generate_timeout_s with no progress the evaluator kills that process,
    records the failed attempt, builds a new engine and evaluates the step; nothing is left unevaluated."""
    from conftest import ledger_of
    from shared.protocol import Status

    run_dir = gpu_run.parent
    proc = run_service(
        "evaluator",
        "--config",
        run_dir.parent.parent / "cfg.yaml",
        "--run",
        run_dir,
        "--once",
        "evaluation.backend=vllm",
        "evaluation.vllm_engine_process=child",
        "evaluation.engine_start_timeout_s=300",
        "evaluation.generate_timeout_s=20",
        "evaluation.gpu_memory_utilization=0.3",
        "evaluation.name=hang",
        env_extra={
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") or "0",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
            "MATH_SFT_FAULT_GENERATE_HANG": "1",
        },
        timeout=540,
    )
    out = proc.stdout + proc.stderr
    assert "vLLM generate hung: killed its engine-core processes" in out, out[-3000:]
    ledger = ledger_of(run_dir, "hang")
    [hung] = [entry for entry in ledger.values() if entry.get("failed_attempts")]
    assert "generate_timeout_s" in hung["failed_attempts"][0]["reason"] and hung["status"] == Status.DONE, hung
    assert all(entry["status"] == Status.DONE for entry in ledger.values()), ledger
