"""Run the benchmarks. `python -m bench.run_all` runs what this machine can (the grader on a CPU; all on GPUs).

    python -m bench.run_all --part train        GPU 0: baseline loop, trainer throughput + stall, step time alone
    python -m bench.run_all --part eval         GPU 1: baseline vLLM, evaluator throughput, latency for 100 examples
    python -m bench.run_all --part interference GPU 1 busy evaluating 5,000 examples while GPU 0 trains
    python -m bench.run_all --part grader       CPU: grader throughput

BASELINE=path/to/baseline_qwen1p5b.py (the team's plain-loop and raw-vLLM baselines) runs them in the same call.
Results: one JSON line each, appended to $OUT/results.jsonl (or bench/results/results.jsonl).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench.common import out_dir, run
from shared.launch import physical_gpu_count

# GPU of the trainer-side and evaluator-side benchmarks (on a one-GPU machine: EVAL_GPU=0).
TRAIN_GPU = int(os.environ.get("TRAIN_GPU", "0"))
EVAL_GPU = int(os.environ.get("EVAL_GPU", "1"))


def on_gpu(index: int) -> dict:
    return {"CUDA_VISIBLE_DEVICES": str(index)}


def baseline(mode: str, gpu: int) -> None:
    script = os.environ.get("BASELINE")
    if script:
        run(["python3", script, mode], out_dir() / f"baseline_{mode}.log", env={**on_gpu(gpu), "OUT": str(out_dir())})
        print((out_dir() / f"baseline_{mode}.log").read_text().strip().splitlines()[-1], flush=True)


def gpu1_busy() -> bool:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(EVAL_GPU)],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out.isdigit() and int(out) > 50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["train", "eval", "interference", "grader", "all"], default="all")
    args = parser.parse_args()
    parts = (
        [args.part]
        if args.part != "all"
        else (["grader", "train", "eval", "interference"] if physical_gpu_count() >= 2 else ["grader"])
    )
    py = sys.executable
    for part in parts:
        if part == "grader":
            run([py, "-m", "bench.bench_grader"], out_dir() / "grader.log")
        elif part == "train":
            baseline("train", TRAIN_GPU)
            run([py, "-m", "bench.bench_train"], out_dir() / "bench_train.log", env=on_gpu(TRAIN_GPU))
            run(
                [py, "-m", "bench.bench_train", "--tag", "alone"],
                out_dir() / "bench_train_alone.log",
                env=on_gpu(TRAIN_GPU),
            )
            baseline("hfgen", TRAIN_GPU)
        elif part == "eval":
            baseline("vllm", EVAL_GPU)
            run([py, "-m", "bench.bench_eval", "throughput"], out_dir() / "bench_eval.log", env=on_gpu(EVAL_GPU))
            run(
                [py, "-m", "bench.bench_eval", "latency", "--num", "100"],
                out_dir() / "latency100.log",
                env=on_gpu(EVAL_GPU),
            )
        elif part == "interference":
            log = open(out_dir() / "latency5000.log", "w")
            evaluator = subprocess.Popen(
                [py, "-m", "bench.bench_eval", "latency", "--num", "5000", "--checkpoints", "1"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **on_gpu(EVAL_GPU)},
            )
            deadline = time.monotonic() + 300
            while not gpu1_busy():  # wait until the evaluator is generating, not starting up
                if evaluator.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the evaluator never got busy on GPU 1")
                time.sleep(1)
            run(
                [py, "-m", "bench.bench_train", "--tag", "with_evaluator_busy"],
                out_dir() / "bench_train_busy.log",
                env=on_gpu(TRAIN_GPU),
            )
            still_busy = evaluator.poll() is None
            print(f"evaluator still generating when the trainer finished: {still_busy}", flush=True)
            if evaluator.wait() != 0:
                raise SystemExit((out_dir() / "latency5000.log").read_text()[-3000:])
    for line in (out_dir() / "results.jsonl").read_text().splitlines():
        print(line)


if __name__ == "__main__":
    main()
