"""Trainer throughput (non-padding tokens/s, MFU) and checkpoint stall on a Qwen2.5-Math-1.5B-shaped model.

    python -m bench.bench_train                 # throughput + stall (checkpoints due at steps 40 and 80)
    python -m bench.bench_train --tag alone     # step time only (used by the interference benchmark)
    python -m bench.bench_train --gpus 3        # tokens/s per GPU with FSDP2 on 3 GPUs (compare with --gpus 1)
    python -m bench.bench_train --lengths ../shared/data/math500/sft_lengths.json   # real SFT lengths
    ... --lengths ... --set training.batch_size=32 --profile   # the recipe's batch; a profile of 3 later steps
    ... --recompiles          # count torch.compile's recompilations (TORCH_LOGS=recompiles), the log in $OUT
    ... --set training.micro_batch_tokens=null --set training.compile=true          # any trainer setting

Batch 8 x 1024 tokens, bf16, fused AdamW: the plain transformers loop of ../shared/gpu/baseline_qwen1p5b.py
("train" mode) is the baseline; run it in the same call on the same card. With --lengths: 8 examples a step (or
training.batch_size) whose prompt and response token counts are those of the file, in the baseline's order
("trainvar" mode) for the first epoch; bench_trl runs TRL's SFTTrainer on the same examples in the same order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

from bench.common import digits_sft_jsonl, make_qwen15_dir, out_dir, report, run, write_config

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
        (p, min(r, max_len - p))
        for p, r in zip(lengths["prompt_tokens"], lengths["response_tokens"], strict=True)
        if p < max_len
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


def window_tokens_per_s(rows: list[dict]) -> float:
    """Tokens over time of logged intervals of equal steps: total tokens / total time."""
    return sum(r["train/tokens_per_s"] * r["train/step_s"] for r in rows) / sum(r["train/step_s"] for r in rows)


def window_mfu(rows: list[dict]) -> float:
    """MFU of logged intervals of equal steps as total FLOPs / total time (each interval's weighted by its time)."""
    return sum(r.get("train/mfu", 0) * r["train/step_s"] for r in rows) / sum(r["train/step_s"] for r in rows)


def count_recompiles(log: Path) -> int:
    """torch.compile recompilations in a trainer log written with TORCH_LOGS=recompiles."""
    return sum("Recompiling function" in line for line in log.read_text().splitlines())


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


@dataclasses.dataclass
class Bench:
    """One benchmark run: its arguments, settings and outputs."""

    args: argparse.Namespace
    work: Path
    merged: dict  # the trainer's config
    label: str  # the --set arguments, as given
    lengths: list[int] | None  # each record's token count (--lengths)
    log_path: Path
    rows: dict = dataclasses.field(default_factory=dict)  # train_log.jsonl by step

    @property
    def stall(self) -> bool:
        return self.args.tag is None and self.args.gpus == 1 and not self.args.lengths

    def peak_memory_gb(self) -> float:
        return round(max(r.get("train/peak_memory_gb", 0) for r in self.rows.values()), 1)

    def recompiles(self) -> int | None:
        return count_recompiles(self.log_path) if self.args.recompiles else None


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--recompiles", action="store_true", help="log torch.compile's recompilations; count them")
    return parser.parse_args()


def trainer_settings(args: argparse.Namespace, model_dir: Path, data: Path, runs: Path, stall: bool) -> dict:
    return {
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


def prepare(args: argparse.Namespace) -> Bench:
    """The model folder, the data and the trainer's config of this benchmark."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_qwen15_dir(work / "q15")
    lengths = None
    if args.lengths:
        data, lengths = real_lengths_sft_jsonl(work / "real.jsonl", Path(args.lengths), 1024, seed=0)
    else:
        data = digits_sft_jsonl(work / "data.jsonl", 512, 200, 825)  # 1025 tokens -> 1024 inputs per example
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    stall = args.tag is None and args.gpus == 1 and not args.lengths
    merged = deep_merge(trainer_settings(args, model_dir, data, runs, stall), parse_sets(args.set))
    label = " ".join(f"--set {s}" for s in args.set)
    return Bench(args, work, merged, label, lengths, work / f"train_{args.tag or 'stall'}.log")


def run_trainer(b: Bench) -> None:
    """The trainer on the benchmark's config; its logged rows in b.rows, its profile and log in $OUT as asked."""
    args = b.args
    cfg = write_config(b.work / "cfg.yaml", b.merged)
    env = {"TQDM_DISABLE": "1"}
    if args.recompiles:
        env["TORCH_LOGS"] = "recompiles"
    profile_dir = b.work / f"profile_{args.tag or 'real'}"
    profiled = args.profile and not b.stall
    if profiled:
        shutil.rmtree(profile_dir, ignore_errors=True)
        # after the timed steps (real lengths: 6-25 of 30; fixed: 6-15 of 25), before the run's last step
        env.update(MATH_SFT_PROFILE_DIR=str(profile_dir), MATH_SFT_PROFILE_WAIT="25" if args.lengths else "15")
    if args.gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(args.gpus)))
    run([sys.executable, "-m", "trainer", "--config", str(cfg)], b.log_path, env=env)
    if args.recompiles:
        name = f"train_{args.tag or 'real'}_{re.sub(r'[^a-z0-9]+', '_', b.label.lower())}.log"
        shutil.copy(b.log_path, out_dir() / name)
    log = Path(b.merged["runs_dir"]) / "bench" / "train_log.jsonl"
    b.rows = {r["train_step"]: r for r in map(json.loads, log.read_text().splitlines())}
    if profiled:
        report_profile(profile_dir, args.tag or "real", b.label)


def main() -> None:
    b = prepare(parse_args())
    run_trainer(b)
    if b.args.lengths:
        report_real_lengths(b)
    elif b.args.gpus > 1:
        report(
            "train_scaling",
            gpus=b.args.gpus,
            tokens_per_s=round(window_tokens_per_s(steady(b))),
            tokens_per_s_per_gpu=round(window_tokens_per_s(steady(b)) / b.args.gpus),
            command=f"python -m bench.bench_train --gpus {b.args.gpus}",
        )
    elif not b.stall:
        report(
            "train_step_time",
            tag=b.args.tag,
            settings=b.label or "defaults",
            step_s=round(steady_step_s(b), 4),
            tokens_per_s=round(window_tokens_per_s(steady(b))),
            mfu=round(window_mfu(steady(b)), 3),
            recompiles=b.recompiles(),
            peak_memory_gb=b.peak_memory_gb(),
        )
    else:
        report_throughput_and_stall(b)


def steady(b: Bench) -> list[dict]:
    return [b.rows[s] for s in (10, 15)]  # steps 6-15: after warm-up, no checkpoint in the interval


def steady_step_s(b: Bench) -> float:
    return statistics.mean(r["train/step_s"] for r in steady(b))  # equal intervals of 5 steps: total time / steps


def report_real_lengths(b: Bench) -> None:
    args, tc = b.args, b.merged["training"]
    timed = [b.rows[s] for s in range(10, REAL_STEPS + 1, 5)]  # steps 6-25
    seconds = sum(r["train/step_s"] * 5 for r in timed)
    tokens = sum(r["train/tokens_per_s"] * r["train/step_s"] * 5 for r in timed)  # as the trainer counts them
    per_gpu, micro = tc["batch_size"] // args.gpus, tc["micro_batch_size"]
    seen = visited(b.lengths, REAL_STEPS * per_gpu * args.gpus, seed=0)
    # each GPU's examples of each timed step
    passes = [seen[i * per_gpu : (i + 1) * per_gpu] for i in range(5 * args.gpus, REAL_STEPS * args.gpus)]
    useful = sum(map(sum, passes))
    # padded: every row of a micro-batch as long as its longest
    computed = (
        useful
        if tc["micro_batch_tokens"]
        else sum(micro * max(p[i : i + micro]) for p in passes for i in range(0, len(p), micro))
    )
    report(
        "train_real_lengths",
        gpus=args.gpus,
        examples_per_step=tc["batch_size"],
        useful_tokens_per_s=round(useful / seconds),
        useful_tokens_per_s_per_gpu=round(useful / seconds / args.gpus),
        step_s=round(seconds / 20, 4),
        # total tokens over total time (a mean of the intervals' figures would overweight the fast ones)
        mfu_useful=round(window_mfu(timed) * useful / tokens, 3),
        interval_step_s=[round(r["train/step_s"], 4) for r in timed],
        recompiles=b.recompiles(),
        pad_fraction=round(1 - useful / computed, 3),
        peak_memory_gb=b.peak_memory_gb(),
        settings=b.label or "defaults",
        command=f"python -m bench.bench_train --lengths {args.lengths} {b.label}".strip(),
    )


def report_throughput_and_stall(b: Bench) -> None:
    rows, step_s = b.rows, steady_step_s(b)
    report(
        "train_throughput",
        settings=b.label or "defaults",
        tokens_per_s=round(window_tokens_per_s(steady(b))),
        mfu=round(window_mfu(steady(b)), 3),
        step_s=round(step_s, 4),
        peak_memory_gb=b.peak_memory_gb(),
        batch="8x1024",
        command="python -m bench.bench_train",
    )
    second = rows[80]
    checkpoints = Path(b.merged["runs_dir"]) / "bench" / "checkpoints"
    report(
        "checkpoint_stall",
        settings=b.label or "defaults",
        blocked_s_first=round(rows[40]["train/checkpoint_blocked_s"], 3),
        second="skipped" if "train/checkpoints_skipped" in second else "saved",
        blocked_s_second=round(second.get("train/checkpoint_blocked_s", 0.0), 3),
        waited_for_previous_s=round(second.get("train/checkpoint_waited_s", 0.0), 3),
        # what the loop lost in steps 76-80 (the second save included) against the steady step time
        held_s_second=round(5 * (second["train/step_s"] - step_s), 3),
        step_s_after_save=round(rows[45]["train/step_s"], 4),
        step_s_steady=round(step_s, 4),
        # keep_last 1: the one checkpoint left
        checkpoint_bytes=sum(p.stat().st_size for p in checkpoints.rglob("*") if p.is_file()),
        command=f"python -m bench.bench_train {b.label}".strip(),
    )


if __name__ == "__main__":
    main()
