"""Trainer throughput (non-padding tokens/s, MFU) and checkpoint stall on a Qwen2.5-Math-1.5B-shaped model.

    python -m bench.bench_train                 # throughput + stall (checkpoints due at steps 40 and 80)
    python -m bench.bench_train --tag alone     # step time only (used by the interference benchmark)
    python -m bench.bench_train --gpus 3        # tokens/s per GPU with FSDP2 on 3 GPUs (compare with --gpus 1)
    python -m bench.bench_train --lengths ../shared/data/math500/sft_lengths.json   # real SFT lengths
    ... --lengths ... --set training.batch_size=32 --profile   # the recipe's batch; a profile of 3 later steps
    ... --set training.micro_batch_tokens=null --set training.compile=true          # any trainer setting

Batch 8 x 1024 tokens, bf16, fused AdamW: the plain transformers loop of ../shared/gpu/baseline_qwen1p5b.py
("train" mode) is the baseline; run it in the same call on the same card. With --lengths: 8 examples a step (or
training.batch_size) whose prompt and response token counts are those of the file, in the baseline's order
("trainvar" mode) for the first epoch; bench_trl runs TRL's SFTTrainer on the same examples in the same order.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from bench.common import digits_sft_jsonl, make_qwen15_dir, report, run, write_config

REAL_STEPS = 25
"""Optimizer steps with real lengths: 5 of warm-up, then 20 timed (the baseline times 20 after 3). The run goes on
for 5 more, so that the final checkpoint's save falls outside the timed steps."""


def real_lengths_sft_jsonl(path: Path, lengths_file: Path, max_len: int, seed: int) -> tuple[Path, list[int]]:
    """Records with the prompt/response token counts of `lengths_file`, placed so that the trainer's seeded
    data order visits them in the baseline script's order (its shuffle of the pairs with random.Random(0)) in its
    first epoch. Returns the file and each record's token count, in the file's order."""
    import random

    import yaml  # noqa: F401 - the trainer's config reader; imported here to fail early if missing
    from trainer.train import DataOrder

    lengths = json.loads(lengths_file.read_text())
    pairs = [
        (p, min(r, max_len - p)) for p, r in zip(lengths["prompt_tokens"], lengths["response_tokens"]) if p < max_len
    ]
    random.Random(0).shuffle(pairs)
    order = DataOrder(len(pairs), seed)
    slots = [None] * len(pairs)
    for position, pair in enumerate(pairs):
        slots[order[position]] = pair
    rng = random.Random(seed)
    with open(path, "w") as f:
        for p, r in slots:
            f.write(
                json.dumps(
                    {
                        "prompt": "".join(rng.choice("0123456789") for _ in range(p)),
                        "response": "".join(rng.choice("0123456789") for _ in range(r)),
                        "ground_truth": "1",
                    }
                )
                + "\n"
            )
    return path, [p + r for p, r in slots]


def visited(values: list, num: int, seed: int) -> list:
    """values[i] of each of the first `num` records the trainer visits (its seeded DataOrder, epoch after epoch)."""
    from trainer.train import DataOrder

    order = DataOrder(len(values), seed)
    return [values[order[p]] for p in range(num)]


def parse_sets(items: list[str]) -> dict:
    """["training.compile=true"] -> {"training": {"compile": True}} (YAML-typed values)."""
    import yaml

    out: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def report_profile(profile_dir: Path, tag: str, label: str) -> None:
    """The GPU time of a profiled step by kind (bench.common.profile_breakdown), and the profiler's tables in $OUT."""
    from bench.common import out_dir, profile_breakdown

    shutil.copy(profile_dir / "profile.txt", out_dir() / f"profile_{tag}.txt")
    report(
        "train_profile",
        tag=tag,
        settings=label or "defaults",
        ms_per_step=profile_breakdown(profile_dir / "trace.json"),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/bench_train")
    parser.add_argument("--tag", default=None, help="only measure the step time, under this label")
    parser.add_argument(
        "--gpus", type=int, default=1, help="train on this many GPUs (FSDP2 under torchrun), 8 x 1024 tokens per GPU"
    )
    parser.add_argument(
        "--lengths", default=None, help="sft_lengths.json: real prompt/response lengths instead of 8 x 1024"
    )
    parser.add_argument("--set", action="append", default=[], help="trainer setting, e.g. training.compile=true")
    parser.add_argument(
        "--profile", action="store_true", help="also profile 3 steps after the timed ones (--tag/--lengths)"
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_qwen15_dir(work / "q15")
    stall = args.tag is None and args.gpus == 1 and not args.lengths
    if args.lengths:
        data, lengths = real_lengths_sft_jsonl(work / "real.jsonl", Path(args.lengths), 1024, seed=0)
    else:
        data = digits_sft_jsonl(work / "data.jsonl", 512, 200, 825)  # 1025 tokens -> 1024 inputs per example
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    settings = {
        "run_name": "bench",
        "runs_dir": str(runs),
        "model": {"path": str(model_dir)},
        "training": {
            "gpus": list(range(args.gpus)),
            "publish_step0": False,  # the timed steps and the stall saves only, as before step 0 existed
            "data": {"path": str(data), "format": "sft"},
            # stall: saves due at 40 and 80; the run's last save (85, which always waits) comes after both
            "max_steps": 85 if stall else REAL_STEPS + 5 if args.lengths else 25,
            "batch_size": 8 * args.gpus,
            "micro_batch_size": 8,
            "max_seq_len": 1024 if args.lengths else 1025,
            # Scaling: padded 8 x 1024 rows, the same work per GPU as on one (packing works with several GPUs too:
            # --set training.micro_batch_tokens=8192).
            "micro_batch_tokens": None if args.gpus > 1 else 8192,
            "learning_rate": 1e-5,
            "warmup_steps": 0,
            "eval_every": 40 if stall else 1000,
            "keep_last": 1,
            "log_every": 5,
        },
        "wandb": {"mode": "disabled"},
    }
    merged = deep_merge(settings, parse_sets(args.set))
    cfg = write_config(work / "cfg.yaml", merged)
    label = " ".join(f"--set {s}" for s in args.set)
    env = {"TQDM_DISABLE": "1"}
    profile_dir = work / f"profile_{args.tag or 'real'}"
    if args.profile and not stall:
        shutil.rmtree(profile_dir, ignore_errors=True)
        # after the timed steps (real lengths: 6-25 of 30; fixed: 6-15 of 25), before the run's last step
        env.update(MATH_SFT_PROFILE_DIR=str(profile_dir), MATH_SFT_PROFILE_WAIT="25" if args.lengths else "15")
    if args.gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(args.gpus)))
    run([sys.executable, "-m", "trainer", "--config", str(cfg)], work / f"train_{args.tag or 'stall'}.log", env=env)
    rows = {r["train_step"]: r for r in map(json.loads, (runs / "bench" / "train_log.jsonl").read_text().splitlines())}
    if args.profile and not stall:
        report_profile(profile_dir, args.tag or "real", label)
    if args.lengths:
        timed = [rows[s] for s in range(10, REAL_STEPS + 1, 5)]  # steps 6-25
        seconds = sum(r["train/step_s"] * 5 for r in timed)
        per_gpu = merged["training"]["batch_size"] // args.gpus
        micro = merged["training"]["micro_batch_size"]
        seen = visited(lengths, REAL_STEPS * per_gpu * args.gpus, seed=0)
        # each GPU's examples of each timed step
        passes = [seen[i * per_gpu : (i + 1) * per_gpu] for i in range(5 * args.gpus, REAL_STEPS * args.gpus)]
        useful = sum(map(sum, passes))
        packed = bool(merged["training"]["micro_batch_tokens"])
        # padded: every row of a micro-batch as long as its longest
        computed = (
            useful if packed else sum(micro * max(p[i : i + micro]) for p in passes for i in range(0, len(p), micro))
        )
        report(
            "train_real_lengths",
            gpus=args.gpus,
            examples_per_step=merged["training"]["batch_size"],
            useful_tokens_per_s=round(useful / seconds),
            useful_tokens_per_s_per_gpu=round(useful / seconds / args.gpus),
            step_s=round(seconds / 20, 4),
            mfu_useful=round(statistics.mean(r.get("train/mfu", 0) for r in timed), 3),
            pad_fraction=round(1 - useful / computed, 3),
            peak_memory_gb=round(max(r.get("train/peak_memory_gb", 0) for r in rows.values()), 1),
            settings=label or "defaults",
            command=f"python -m bench.bench_train --lengths {args.lengths} {label}".strip(),
        )
        return
    steady = [rows[s] for s in (10, 15)]  # after warm-up, no checkpoint in the interval
    step_s = statistics.mean(r["train/step_s"] for r in steady)
    if args.gpus > 1:
        tokens_per_s = statistics.mean(r["train/tokens_per_s"] for r in steady)
        report(
            "train_scaling",
            gpus=args.gpus,
            tokens_per_s=round(tokens_per_s),
            tokens_per_s_per_gpu=round(tokens_per_s / args.gpus),
            command=f"python -m bench.bench_train --gpus {args.gpus}",
        )
        return
    if not stall:
        report(
            "train_step_time",
            tag=args.tag,
            settings=label or "defaults",
            step_s=round(step_s, 4),
            tokens_per_s=round(statistics.mean(r["train/tokens_per_s"] for r in steady)),
            mfu=round(statistics.mean(r.get("train/mfu", 0) for r in steady), 3),
            peak_memory_gb=round(max(r.get("train/peak_memory_gb", 0) for r in rows.values()), 1),
        )
        return
    report(
        "train_throughput",
        settings=label or "defaults",
        tokens_per_s=round(statistics.mean(r["train/tokens_per_s"] for r in steady)),
        mfu=round(statistics.mean(r.get("train/mfu", 0) for r in steady), 3),
        step_s=round(step_s, 4),
        peak_memory_gb=round(max(r.get("train/peak_memory_gb", 0) for r in rows.values()), 1),
        batch="8x1024",
        command="python -m bench.bench_train",
    )
    second = rows[80]
    report(
        "checkpoint_stall",
        settings=label or "defaults",
        blocked_s_first=round(rows[40]["train/checkpoint_blocked_s"], 3),
        second="skipped" if "train/checkpoints_skipped" in second else "saved",
        blocked_s_second=round(second.get("train/checkpoint_blocked_s", 0.0), 3),
        waited_for_previous_s=round(second.get("train/checkpoint_waited_s", 0.0), 3),
        # what the loop lost in steps 76-80 (the second save included) against the steady step time
        held_s_second=round(5 * (second["train/step_s"] - step_s), 3),
        step_s_after_save=round(rows[45]["train/step_s"], 4),
        step_s_steady=round(step_s, 4),
        # keep_last 1: the one checkpoint left
        checkpoint_bytes=sum(p.stat().st_size for p in (runs / "bench" / "checkpoints").rglob("*") if p.is_file()),
        command=f"python -m bench.bench_train {label}".strip(),
    )


if __name__ == "__main__":
    main()
