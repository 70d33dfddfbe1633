"""Trainer throughput (non-padding tokens/s, MFU) and checkpoint stall on a Qwen2.5-Math-1.5B-shaped model.

    python -m bench.bench_train                 # throughput + stall (checkpoints at steps 40 and 80)
    python -m bench.bench_train --tag alone     # step time only (used by the interference benchmark)
    python -m bench.bench_train --gpus 3        # tokens/s per GPU with FSDP2 on 3 GPUs (compare with --gpus 1)

Batch 8 x 1024 tokens, bf16, fused AdamW: the plain transformers loop of ../shared/gpu/baseline_qwen1p5b.py
("train" mode) is the baseline; run it in the same call on the same card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from bench.common import digits_sft_jsonl, make_qwen15_dir, report, run, write_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/bench_train")
    parser.add_argument("--tag", default=None, help="only measure the step time, under this label")
    parser.add_argument("--gpus", type=int, default=1, help="train on this many GPUs (FSDP2 under torchrun), 8 x 1024 tokens per GPU")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_qwen15_dir(work / "q15")
    data = digits_sft_jsonl(work / "data.jsonl", 512, 200, 825)  # 1025 tokens -> 1024 inputs per example
    stall = args.tag is None and args.gpus == 1
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cfg = write_config(work / "cfg.yaml", {
        "run_name": "bench", "runs_dir": str(runs),
        "model": {"path": str(model_dir)},
        "training": {"gpus": list(range(args.gpus)), "data": {"path": str(data), "format": "sft"}, "max_steps": 80 if stall else 25,
                     "batch_size": 8 * args.gpus,
                     "micro_batch_size": 8, "max_seq_len": 1025, "learning_rate": 1e-5, "warmup_steps": 0,
                     "eval_every": 40 if stall else 1000, "keep_last": 1, "log_every": 5},
        "wandb": {"mode": "disabled"},
    })
    env = {"TQDM_DISABLE": "1"}
    if args.gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(args.gpus)))
    run([sys.executable, "-m", "trainer", "--config", str(cfg)], work / f"train_{args.tag or 'stall'}.log", env=env)
    rows = {r["train_step"]: r for r in map(json.loads, (runs / "bench" / "train_log.jsonl").read_text().splitlines())}
    steady = [rows[s] for s in (10, 15)]  # after warm-up, no checkpoint in the interval
    step_s = statistics.mean(r["train/step_s"] for r in steady)
    if args.gpus > 1:
        tokens_per_s = statistics.mean(r["train/tokens_per_s"] for r in steady)
        report("train_scaling", gpus=args.gpus, tokens_per_s=round(tokens_per_s), tokens_per_s_per_gpu=round(tokens_per_s / args.gpus),
               command=f"python -m bench.bench_train --gpus {args.gpus}")
        return
    if not stall:
        report("train_step_time", tag=args.tag, step_s=round(step_s, 4))
        return
    report("train_throughput", tokens_per_s=round(statistics.mean(r["train/tokens_per_s"] for r in steady)),
           mfu=round(statistics.mean(r.get("train/mfu", 0) for r in steady), 3), step_s=round(step_s, 4),
           peak_memory_gb=round(max(r.get("train/peak_memory_gb", 0) for r in rows.values()), 1),
           batch="8x1024", command="python -m bench.bench_train")
    report("checkpoint_stall", blocked_s_first=round(rows[40]["train/checkpoint_blocked_s"], 3),
           blocked_s_second=round(rows[80]["train/checkpoint_blocked_s"], 3),
           waited_for_previous_s=round(rows[80]["train/checkpoint_waited_s"], 3),
           step_s_after_save=round(rows[45]["train/step_s"], 4), step_s_steady=round(step_s, 4),
           checkpoint_bytes=sum(p.stat().st_size for p in (runs / "bench" / "checkpoints").rglob("*") if p.is_file()),
           command="python -m bench.bench_train")


if __name__ == "__main__":
    main()
