"""Evaluator benchmarks on a Qwen2.5-Math-1.5B-shaped model (vLLM backend, one GPU).

    python -m bench.bench_eval throughput        # evaluator generate vs raw vLLM generate, same engine and prompts;
                                                 # two sets in one engine call vs one call per set
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
import statistics
import sys
import time
from pathlib import Path

from bench.common import digits_sft_jsonl, make_qwen15_dir, report, write_config


def eval_config(num: int, data: Path | None = None, max_num_seqs: int | None = None):
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
        **({"vllm_max_num_seqs": max_num_seqs} if max_num_seqs else {}),
    )


def throughput(work: Path, num_prompts: int, rounds: int, max_num_seqs: int | None) -> None:
    """Each kind of request, `rounds` times in turn (the card's speed drifts within a call, by 17 % between
    two rounds on an H200: a kind measured once, after the others, is not comparable); the best round of each
    kind and, for ratios, the median of the ratios within each round are reported."""
    import dataclasses

    from vllm import SamplingParams

    from evaluator.backends import VLLMBackend
    from evaluator.evaluation import request_seed

    model_dir = make_qwen15_dir(work / "q15")
    cfg = eval_config(num_prompts, max_num_seqs=max_num_seqs)
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
    # Two sets of unlike lengths, as MATH-500 and AIME: one call per set (the evaluator) or both in one call.
    # (prompts, seeds, sampling) of each set
    two_sets = [
        (prompts, seeds, dataclasses.replace(sampling, max_tokens=512)),
        (prompts[: num_prompts // 4], seeds[: num_prompts // 4], dataclasses.replace(sampling, max_tokens=1536)),
    ]

    def raw(seeded: bool) -> int:
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
        return sum(len(o.outputs[0].token_ids) for o in backend.llm.generate(token_prompts, params, use_tqdm=False))

    def raw_same_requests() -> int:
        """Text prompts and the evaluator's own SamplingParams (seeds, stop string, detokenization), without it."""
        outs = backend.llm.generate(prompts, backend.sampling_params(seeds, sampling), use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    gens = []

    def evaluator() -> int:
        gens[:] = backend.generate(prompts, seeds, sampling)  # per-request seeds
        return sum(g.num_tokens for g in gens)

    kinds = {
        "raw_fastest": lambda: raw(seeded=False),
        "raw_seeded": lambda: raw(seeded=True),
        "raw_same_requests": raw_same_requests,
        "evaluator": evaluator,
        "two_sets_call_per_set": lambda: sum(g.num_tokens for s in two_sets for g in backend.generate(*s)),
        "two_sets_one_call": lambda: sum(
            len(o.outputs[0].token_ids)
            for o in backend.llm.generate(
                [p for ps, _, _ in two_sets for p in ps],
                [p for _, ss, sc in two_sets for p in backend.sampling_params(ss, sc)],
                use_tqdm=False,
            )
        ),
    }
    rates: dict[str, list[int]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind, fn in kinds.items():
            t0 = time.perf_counter()
            tokens = fn()
            rates[kind].append(round(tokens / (time.perf_counter() - t0)))
    best = {k: max(v) for k, v in rates.items()}

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=False)), 3)

    again = backend.generate(prompts[:64], seeds[:64], sampling)
    t0 = time.perf_counter()
    how = backend.load(model_dir)
    reload_s = time.perf_counter() - t0
    report(
        "eval_throughput",
        **{f"{k}_tokens_per_s": v for k, v in best.items()},
        rounds=rates,
        # each ratio: the median over rounds of the ratio within a round (the card drifts less within one)
        ratio=ratio("evaluator", "raw_fastest"),
        ratio_to_raw_seeded=ratio("evaluator", "raw_seeded"),
        ratio_to_same_requests=ratio("evaluator", "raw_same_requests"),
        seeded_cost=round(1 - ratio("raw_seeded", "raw_fastest"), 3),
        one_call_gain=ratio("two_sets_one_call", "two_sets_call_per_set"),
        # the first 64 requests again, alone: same seeds, another batch around them
        identical_when_batched_otherwise=sum(a.text == b.text for a, b in zip(again, gens, strict=False)) / len(again),
        engine=(os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1" and "child process") or "in-process",
        prompts=num_prompts,
        max_num_seqs=cfg.vllm_max_num_seqs,
        max_tokens=1024,
        engine_start_s=round(start_s, 1),
        reload_in_place_s=round(reload_s, 2),
        reload=how,
        command=f"python -m bench.bench_eval throughput --rounds {rounds} --max-num-seqs {cfg.vllm_max_num_seqs}",
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
    parser.add_argument("--rounds", type=int, default=3, help="throughput: times each kind of request is measured")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="throughput: evaluation.vllm_max_num_seqs")
    parser.add_argument("--work", default="/tmp/bench_eval")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.mode == "throughput":
        throughput(work, args.num, args.rounds, args.max_num_seqs)
    else:
        latency(work, args.num, args.checkpoints)


if __name__ == "__main__":
    main()
