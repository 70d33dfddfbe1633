"""What a researcher would run instead of our trainer: TRL's SFTTrainer, and a plain padded transformers loop, on the
same records, in the same order, at the recipe's batch (32 examples a step, real lengths, loss on the response only).

    python -m bench.bench_trl --lengths sft_lengths.json --variant padding_free --liger
    python -m bench.bench_trl --lengths sft_lengths.json --variant padded --per-device 8 --liger
    python -m bench.bench_trl --lengths sft_lengths.json --variant padding_free --liger --compile
    python -m bench.bench_trl --lengths sft_lengths.json --variant plain          # no TRL: the hand-written loop

TRL, datasets and liger-kernel are benchmark dependencies only (`pip install -e ".[bench]"`), never the trainer's.
Every TRL variant: bf16 weights (TRL's default for a bf16 checkpoint; no fp32 master copy, unlike our trainer), fused
AdamW, constant learning rate 1e-5, gradient clipping at 1.0, no gradient checkpointing (TRL turns it on by default;
off is faster when the memory is there), sdpa attention (no flash-attn package on the machine, Hub kernels need a
network), a sequential sampler over the records our trainer visits, so that each step holds the same 32 examples.
The time of steps 6-25 is reported (host clock, with the GPU synchronised at both ends), as useful (non-padding)
tokens/s and MFU on useful tokens, with bench_train's formula (6 x parameters per token, 989 TFLOP/s dense bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.bench_train import real_lengths_sft_jsonl, visited
from bench.common import make_qwen15_dir, report

WARMUP_STEPS = 5
TIMED_STEPS = 20
PEAK_FLOPS = 989e12
"""bf16 dense peak of the H100/H200 SXM, as the trainer's MFU uses (trainer/train.py PEAK_BF16_FLOPS)."""


class StepTimer:
    """A transformers TrainerCallback (made in `make_timer`): GPU-synchronised time from the end of the warm-up to
    the end of the last timed step."""

    def __init__(self):
        self.t0 = self.t1 = None

    def mark(self, step: int) -> None:
        import torch

        if step in (WARMUP_STEPS, WARMUP_STEPS + TIMED_STEPS):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if step == WARMUP_STEPS:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()


def make_timer():
    from transformers import TrainerCallback

    timer = StepTimer()

    class Callback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.mark(state.global_step)

    return timer, Callback()


def run_trl(args, model_dir: Path, records: list[dict], out: Path) -> dict:
    import torch
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    class InOrderSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, *unused, **unused_kw):
            return SequentialSampler(self.train_dataset)

    padding_free = args.variant == "padding_free"
    config = SFTConfig(
        output_dir=str(out),
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        per_device_train_batch_size=args.per_device,
        gradient_accumulation_steps=args.batch // args.per_device,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch_fused",
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        padding_free=padding_free,
        # padding-free without packing does not truncate: the records are <= 1024 tokens already
        max_length=None if padding_free else 1024,
        completion_only_loss=True,
        use_liger_kernel=args.liger,
        torch_compile=args.compile,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_drop_last=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=args.attn)
    # A fingerprint given: datasets would otherwise hash the table with dill, which fails on some pyarrow builds
    rows = [{"prompt": r["prompt"], "completion": r["response"]} for r in records]
    data = Dataset(InMemoryTable.from_pylist(rows), fingerprint="bench_trl_records")
    timer, callback = make_timer()
    trainer = InOrderSFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[callback]
    )
    trainer.train()
    timed = trainer.train_dataset.select(range(WARMUP_STEPS * args.batch, (WARMUP_STEPS + TIMED_STEPS) * args.batch))
    useful = sum(len(ids) for ids in timed["input_ids"])
    computed = (
        useful
        if padding_free
        else sum(
            args.per_device * max(len(ids) for ids in timed["input_ids"][i : i + args.per_device])
            for i in range(0, len(timed), args.per_device)
        )
    )
    return {"useful": useful, "computed": computed, "seconds": timer.t1 - timer.t0, "params": model.num_parameters()}


def run_plain(args, model_dir: Path, records: list[dict]) -> dict:
    """The hand-written loop of ../shared/gpu/baseline_qwen1p5b.py (trainvar) at `args.batch` examples a step:
    micro-batches of `args.per_device` padded to their longest, loss on response tokens (a per-token mean over the
    step), bf16 weights, fused AdamW, clipping at 1.0, sdpa."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    pairs = [
        (
            tokenizer(r["prompt"], add_special_tokens=False)["input_ids"],
            tokenizer(r["response"], add_special_tokens=False)["input_ids"],
        )
        for r in records
    ]
    useful = computed = 0
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        if step == WARMUP_STEPS:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        batch = pairs[step * args.batch : (step + 1) * args.batch]
        num_response = sum(len(r) for _, r in batch)
        for i in range(0, args.batch, args.per_device):
            micro = batch[i : i + args.per_device]
            width = max(len(p) + len(r) for p, r in micro)
            ids = torch.full((len(micro), width), tokenizer.pad_token_id)
            labels = torch.full((len(micro), width), -100)
            mask = torch.zeros((len(micro), width), dtype=torch.long)
            for j, (p, r) in enumerate(micro):
                ids[j, : len(p) + len(r)] = torch.tensor(p + r)
                labels[j, len(p) : len(p) + len(r)] = torch.tensor(r)
                mask[j, : len(p) + len(r)] = 1
            if step >= WARMUP_STEPS:
                useful += int(mask.sum())
                computed += mask.numel()
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels[:, 1:].flatten().to(device), reduction="sum"
            )
            (loss / num_response).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "useful": useful,
        "computed": computed,
        "seconds": time.perf_counter() - t0,
        "params": model.num_parameters(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/bench_train", help="shares bench_train's model folder")
    parser.add_argument("--lengths", required=True, help="sft_lengths.json: real prompt/response lengths")
    parser.add_argument("--variant", choices=("padding_free", "padded", "plain"), default="padding_free")
    parser.add_argument("--batch", type=int, default=32, help="examples per optimizer step")
    parser.add_argument("--per-device", type=int, default=32, help="examples per forward pass (accumulation: the rest)")
    parser.add_argument("--liger", action="store_true", help="use_liger_kernel=True (RMSNorm, SwiGLU, RoPE)")
    parser.add_argument("--compile", action="store_true", help="torch_compile=True")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation of the model")
    parser.add_argument("--model", default=None, help="a model folder instead of the 1.5B shape (a CPU smoke test)")
    args = parser.parse_args()
    if args.batch % args.per_device:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --per-device {args.per_device}")
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else make_qwen15_dir(work / "q15")
    records_path, _ = real_lengths_sft_jsonl(work / "real.jsonl", Path(args.lengths), 1024, seed=0)
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    records = visited(records, (WARMUP_STEPS + TIMED_STEPS) * args.batch, seed=0)  # in our trainer's order
    if args.variant == "plain":
        figures = run_plain(args, model_dir, records)
    else:
        figures = run_trl(args, model_dir, records, work / f"trl_{args.variant}")
    report(
        "trl_real_lengths" if args.variant != "plain" else "plain_loop_real_lengths",
        variant=args.variant,
        batch=args.batch,
        per_device=args.per_device,
        liger=args.liger,
        compile=args.compile,
        attn=args.attn,
        useful_tokens_per_s=round(figures["useful"] / figures["seconds"]),
        step_s=round(figures["seconds"] / TIMED_STEPS, 4),
        mfu_useful=round(6 * figures["params"] * figures["useful"] / figures["seconds"] / PEAK_FLOPS, 3),
        pad_fraction=round(1 - figures["useful"] / figures["computed"], 3),
        peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
        command=" ".join(["python -m bench.bench_trl", *sys.argv[1:]]),
    )


if __name__ == "__main__":
    main()
