"""Evaluator benchmarks on a Qwen2.5-Math-1.5B-shaped model (vLLM backend, one GPU).

    python -m bench.bench_eval throughput        # evaluator generate vs raw vLLM generate, same engine and prompts
    python -m bench.bench_eval latency --num 100 # READY -> metrics written, split into verify/reload/generate/grade

Sampling: temperature 1.0, top_p 1.0, max_tokens 1024 (the reference's); prompts of 150 tokens. The raw
figure uses token prompts, ignore_eos and no detokenization: the fastest vLLM can be asked to go.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from bench.common import digits_sft_jsonl, make_qwen15_dir, report, write_config


def eval_config(num: int, data: Path | None = None):
    from shared.config import DatasetConfig, EvaluationConfig

    return EvaluationConfig(
        data=DatasetConfig(path=str(data) if data else "unused", format="sft"),
        num_samples=num,
        backend="vllm",
        temperature=1.0,
        top_p=1.0,
        max_tokens=1024,
        max_model_len=2048,
        gpu_memory_utilization=0.85,
    )


def throughput(work: Path, num_prompts: int) -> None:
    from vllm import SamplingParams

    from evaluator.backends import VLLMBackend
    from evaluator.service import request_seed

    model_dir = make_qwen15_dir(work / "q15")
    cfg = eval_config(num_prompts)
    sampling = cfg.eval_sets()[0]
    backend = VLLMBackend(cfg, trust_remote_code=False, num_gpus=1)
    t0 = time.perf_counter()
    backend.load(model_dir)
    start_s = time.perf_counter() - t0
    rng = random.Random(0)
    prompts = ["".join(rng.choice("0123456789") for _ in range(150)) for _ in range(num_prompts)]
    seeds = [request_seed(0, "bench", i, 0) for i in range(num_prompts)]
    tok = backend.llm.get_tokenizer()
    token_prompts = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    backend.generate(prompts[:8], seeds[:8], sampling)  # warm-up

    def raw(seeded: bool) -> float:
        """Token prompts, ignore_eos, no detokenization: the fastest vLLM can be asked to go."""
        params = [
            SamplingParams(
                temperature=1.0,
                top_p=1.0,
                max_tokens=1024,
                ignore_eos=True,
                detokenize=False,
                seed=seed if seeded else None,
            )
            for seed in seeds
        ]
        t0 = time.perf_counter()
        outs = backend.llm.generate(token_prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    def raw_same_requests() -> float:
        """Text prompts and the evaluator's own SamplingParams (seeds, stop string, detokenization), without it."""
        t0 = time.perf_counter()
        outs = backend.llm.generate(prompts, backend.sampling_params(seeds, sampling), use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    raw_rate = raw(seeded=False)
    raw_seeded_rate = raw(seeded=True)
    raw_same_rate = raw_same_requests()
    t0 = time.perf_counter()
    gens = backend.generate(prompts, seeds, sampling)  # per-request seeds, as the evaluator samples
    ours_rate = sum(g.num_tokens for g in gens) / (time.perf_counter() - t0)
    again = backend.generate(prompts[:64], seeds[:64], sampling)
    t0 = time.perf_counter()
    how = backend.load(model_dir)
    reload_s = time.perf_counter() - t0
    report(
        "eval_throughput",
        evaluator_tokens_per_s=round(ours_rate),
        raw_vllm_tokens_per_s=round(raw_rate),
        raw_vllm_seeded_tokens_per_s=round(raw_seeded_rate),
        raw_vllm_same_requests_tokens_per_s=round(raw_same_rate),
        ratio=round(ours_rate / raw_rate, 3),
        ratio_to_same_requests=round(ours_rate / raw_same_rate, 3),
        seeded_cost=round(1 - raw_seeded_rate / raw_rate, 3),
        # the first 64 requests again, alone: same seeds, another batch around them
        identical_when_batched_otherwise=sum(a.text == b.text for a, b in zip(again, gens)) / len(again),
        engine=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1" and "child process" or "in-process",
        prompts=num_prompts,
        max_tokens=1024,
        engine_start_s=round(start_s, 1),
        reload_in_place_s=round(reload_s, 2),
        reload=how,
        command="python -m bench.bench_eval throughput",
    )
    backend.close()


def latency(work: Path, num: int, checkpoints: int) -> None:
    """The real service: start `python -m evaluator`, publish checkpoints one by one, time READY -> result.
    The first checkpoint starts the engine; later ones are reloaded in place (the steady state)."""
    import subprocess

    from shared.protocol import READY, RunLayout, publish_checkpoint

    model_dir = make_qwen15_dir(work / "q15")
    root = work / f"latency{num}"
    shutil.rmtree(root, ignore_errors=True)
    layout = RunLayout(root / "runs" / "lat")
    layout.checkpoints_dir.mkdir(parents=True)
    data = digits_sft_jsonl(root / "eval.jsonl", num, 150, 20)
    cfg = write_config(
        root / "cfg.yaml",
        {
            "run_name": "lat",
            "runs_dir": str(root / "runs"),
            "evaluation": {
                "gpus": [0],
                "data": {"path": str(data), "format": "sft"},
                "num_samples": num,
                "backend": "vllm",
                "temperature": 1.0,
                "top_p": 1.0,
                "max_tokens": 1024,
                "max_model_len": 2048,
                "rescan_s": 5,
            },
            "wandb": {"mode": "disabled"},
        },
    )
    log = open(root / "evaluator.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "evaluator", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**__import__("os").environ, "TQDM_DISABLE": "1"},
    )
    figures = {}
    try:
        for step in range(1, checkpoints + 1):
            tmp = layout.tmp_checkpoint_dir(step)
            shutil.copytree(model_dir, tmp)
            publish_checkpoint(tmp, layout.checkpoint_dir(step), step, "bench")
            ready_t = (layout.checkpoint_dir(step) / READY).stat().st_mtime
            result = layout.result_path("default", step)
            while not result.exists():
                if proc.poll() is not None:
                    raise SystemExit(f"evaluator exited: {(root / 'evaluator.log').read_text()[-3000:]}")
                time.sleep(0.1)
            r = json.loads(result.read_text())
            figures[step] = {
                "ready_to_metrics_s": round(result.stat().st_mtime - ready_t, 2),
                **{k: round(v, 2) for k, v in r["timings_s"].items()},
                "load": r["load"],
                "generated_tokens_per_s": round(r["generated_tokens_per_s"]),
            }
    finally:
        proc.send_signal(2)
        proc.wait(120)
    report(
        "checkpoint_to_metrics",
        num_examples=num,
        first=figures[1],
        steady=figures.get(2),
        command=f"python -m bench.bench_eval latency --num {num}",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["throughput", "latency"])
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--checkpoints", type=int, default=2, help="latency: checkpoints to publish one after another")
    parser.add_argument("--work", default="/tmp/bench_eval")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    throughput(work, args.num) if args.mode == "throughput" else latency(work, args.num, args.checkpoints)


if __name__ == "__main__":
    main()
