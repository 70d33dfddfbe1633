"""The SFT training loop. Read it top to bottom: setup, resume, loop, shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.config import EMBEDDED_MODEL, Config, ConfigError, resume_config_changes
from shared.data import Example, load_dataset, load_prompt_template, render_prompt
from shared.protocol import (
    BestRule,
    CheckpointInvalid,
    RunLayout,
    TrainerLock,
    atomic_write_bytes,
    list_ready_checkpoints,
    move_aside_corrupt,
    remove_incomplete_checkpoints,
    verify_checkpoint,
)
from shared.tracking import Tracker
from trainer.checkpoint import AsyncCheckpointer, load_trainer_state, read_trainer_meta, restore_rng
from trainer.distributed import (
    all_reduce,
    full_tensor,
    from_main,
    init_distributed,
    load_local_optimizer_state,
    shard_model,
    shutdown,
    StopFlag,
)
from trainer.embedded import save_embedded_model
from trainer.logprobs import ResponseLogProbs
from trainer.master import MasterWeights
from trainer.packing import (
    group_by_budget,
    packed_forward_kwargs,
    packed_microbatch,
    tokenize_examples,
    use_packed_attention,
)
from trainer.sft import sft_microbatch_train_step, tokenize_prompt_and_output


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to the peak, then cosine decay to peak * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


class DataOrder:
    """Example index for each global sample position: a fresh seeded permutation every epoch.
    Depends only on (seed, position), so resuming at a step needs no saved iterator."""

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return int(self._perm[position % self.n])


def resolve_model_path(cfg: Config, layout: RunLayout, template: str, train: list[Example]) -> str:
    if cfg.model.path != EMBEDDED_MODEL:
        return cfg.model.path
    if not (layout.base_model_dir / "model.safetensors").is_file():
        tmp = layout.run_dir / ".tmp_base_model"
        save_embedded_model(cfg.model, template, train, tmp, cfg.training.seed)
        tmp.rename(layout.base_model_dir)
    return str(layout.base_model_dir)


PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
"""Dense bf16 peak per device name (first match: the PCIe and NVL parts before the SXM ones)."""


def peak_bf16_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known accelerators, for MFU; None where unknown (and on CPU).
    MFU counts 6 x parameters FLOPs per token: it leaves out attention and counts the LM head at every token,
    where the chunked head skips prompt tokens (on Qwen2.5-1.5B the head is 15 % of the parameters)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def model_files_dir(model_path: str, model, tokenizer, layout: RunLayout) -> Path:
    """A local folder with the model's config and tokenizer files, copied into every checkpoint.
    A hub name has none: export them once into the run's base_model folder."""
    if Path(model_path).is_dir():
        return Path(model_path)
    out = layout.base_model_dir
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def newest_valid_checkpoint(layout: RunLayout) -> Path | None:
    """Newest checkpoint whose manifest verifies. A broken one is moved aside (corrupt_step_N) with a message:
    training will write that step again, and a READY folder in the way would stop it there."""
    for step, path in sorted(list_ready_checkpoints(layout.checkpoints_dir).items(), reverse=True):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointInvalid as exc:
            print(f"warning: not resuming from {path}: {exc}; moved it aside to {move_aside_corrupt(path)}")
    return None


def check_resume(cfg: Config, layout: RunLayout, checkpoint: Path, log) -> int:
    """The step to resume at, after comparing the config with the one the checkpoint was trained with
    (ConfigError for changes that alter the past; allowed ones, and what they do to the schedule, printed)."""
    meta = read_trainer_meta(checkpoint)
    saved = meta.get("config")
    if saved is None:  # checkpoints from before the config was saved in them: the run's last config
        saved = yaml.safe_load(layout.config_path.read_text()) if layout.config_path.is_file() else cfg.to_dict()
    step = int(meta["step"])
    for change in resume_config_changes(saved, cfg.to_dict(), f"{layout.run_dir} at step {step}"):
        log(f"resume: {change}")
    old_max_steps = saved["training"]["max_steps"]
    if old_max_steps != cfg.training.max_steps and step < cfg.training.max_steps:
        old_tc = dataclasses.replace(cfg.training, max_steps=old_max_steps)
        log(
            f"resume: the cosine schedule now ends at step {cfg.training.max_steps}, not {old_max_steps}: "
            f"learning rate at step {step} is {lr_at(step, cfg.training):.3e} (it was {lr_at(step, old_tc):.3e} on the old schedule)"
        )
    return step


def make_micro_batches(
    prompts: list[str], responses: list[str], tokenizer, tc, d, pad_id: int
) -> tuple[list[dict], int]:
    """This rank's examples of one step as forward passes, and the gradient accumulation divisor: packed rows of
    whole examples up to micro_batch_tokens (divisor 1: the loss is normalised over the global batch's response
    tokens), or padded micro-batches of micro_batch_size examples (the reference recipe).
    With several ranks every rank runs the same number of passes (FSDP's collectives pair them up): a rank whose
    examples pack into fewer rows adds rows of two padding tokens with no response token, which add nothing to
    the loss or the gradients (two, not one: a length of 1 would make torch.compile specialise a new graph)."""
    if tc.micro_batch_tokens:
        examples = tokenize_examples(prompts, responses, tokenizer, tc.max_seq_len)
        groups = group_by_budget([len(ids) - 1 for ids, _ in examples], tc.micro_batch_tokens)
        rows = [packed_microbatch([examples[i] for i in group]) for group in groups]
        for _ in range(int(all_reduce(len(rows), d, op="max")) - len(rows)):
            rows.append({**packed_microbatch([([pad_id] * 3, 3)]), "filler": True})
        return rows, 1
    micro = [
        tokenize_prompt_and_output(
            prompts[i : i + tc.micro_batch_size],
            responses[i : i + tc.micro_batch_size],
            tokenizer,
            max_len=tc.max_seq_len,
        )
        for i in range(0, len(prompts), tc.micro_batch_size)
    ]
    return micro, tc.batch_size // (tc.micro_batch_size * d.world)


PROFILE_ENV = "MATH_SFT_PROFILE_DIR"
"""Benchmarks: a folder to write a torch profile of 3 steps of rank 0 into (a table and a trace)."""
PROFILE_WAIT_ENV = "MATH_SFT_PROFILE_WAIT"
"""Steps before the profiled ones (default 8: steps 10-12 are profiled, after one of profiler warm-up); benchmarks set
it past their timed steps, which the profiler would slow down."""


def profile_if_asked(d):
    out = os.environ.get(PROFILE_ENV)
    if not out or not d.is_main:
        return None

    def write(prof) -> None:
        Path(out).mkdir(parents=True, exist_ok=True)
        tables = [
            prof.key_averages().table(sort_by=key, row_limit=30)
            for key in ("self_cuda_time_total", "self_cpu_time_total")
        ]
        (Path(out) / "profile.txt").write_text("\n\n".join(tables))
        prof.export_chrome_trace(str(Path(out) / "trace.json"))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=int(os.environ.get(PROFILE_WAIT_ENV, "8")), warmup=1, active=3, repeat=1),
        on_trace_ready=write,
    )
    profiler.start()
    return profiler


def num_real_tokens(mb: dict, pad_id: int) -> int:
    """Tokens that are not padding in a micro-batch (inputs plus each row's last label)."""
    if mb.get("filler"):
        return 0
    if "cu_seq_lens" in mb:
        return mb["labels"].numel() + len(mb["cu_seq_lens"]) - 1
    return int((mb["labels"] != pad_id).sum()) + len(mb["labels"])


def ignore_stop_signals() -> None:
    """From here on a second Ctrl-C or SIGTERM no longer interrupts (SIGKILL does): what follows (the pending
    checkpoint, a collective with several ranks) must finish on every rank."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train(cfg: Config) -> dict[str, Any]:
    """Train the run of `cfg`, resuming from its newest valid checkpoint. Only one trainer holds a run."""
    d = init_distributed()
    layout = RunLayout(cfg.run_dir)
    new_run = not layout.run_dir.exists()
    try:
        with TrainerLock(layout) if d.is_main else contextlib.nullcontext():
            return _train(cfg, d, layout)
    except BaseException:
        # A start that failed leaves no half-made run behind, unless an evaluator already works in it.
        attached = (layout.run_dir / "eval").exists() or layout.leases_dir.exists()
        if new_run and d.is_main and not attached and not list_ready_checkpoints(layout.checkpoints_dir):
            shutil.rmtree(layout.run_dir, ignore_errors=True)
        raise


def _train(cfg: Config, d, layout: RunLayout) -> dict[str, Any]:
    tc = cfg.training

    # ---------------------------------------------------------------- setup (nothing written yet)
    if tc.micro_batch_tokens and tc.batch_size % d.world:
        raise ConfigError(f"training.batch_size ({tc.batch_size}) must be a multiple of the {d.world} processes")
    if not tc.micro_batch_tokens and tc.batch_size % (tc.micro_batch_size * d.world):
        raise ConfigError(
            f"training.batch_size ({tc.batch_size}) must be a multiple of training.micro_batch_size "
            f"({tc.micro_batch_size}) x {d.world} processes"
        )
    device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[tc.dtype]
    # Sharded training keeps fp32 master parameters and computes in `dtype`; one process trains in `dtype`.
    param_dtype = torch.float32 if d.enabled else dtype
    log = print if d.is_main else (lambda *a, **k: None)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    template = load_prompt_template(cfg.prompt_template_path())
    train_set = load_dataset(tc.data)
    order = DataOrder(len(train_set), tc.seed)

    # ---------------------------------------------------------------- run directory, resume point, model
    if d.is_main:
        layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for leftover in remove_incomplete_checkpoints(layout.checkpoints_dir):
            print(f"removed incomplete checkpoint {leftover}")
        if not list_ready_checkpoints(layout.checkpoints_dir):
            resolve_model_path(
                cfg, layout, template, train_set
            )  # builds the embedded model once, before other ranks look
    # Rank 0 verifies (hashes every file once); the other ranks take its choice.
    resume_from = from_main(newest_valid_checkpoint(layout) if d.is_main else None, d)
    start_step = check_resume(cfg, layout, resume_from, log) if resume_from else 0
    if start_step >= tc.max_steps:
        log(
            f"{layout.run_dir}: already trained to step {start_step} (training.max_steps={tc.max_steps}); "
            "nothing to do. Raise training.max_steps to train further."
        )
        shutdown(d)
        return {"step": start_step, "last_checkpoint": start_step}
    tracker = Tracker(cfg, "train", "train_step", layout.run_dir) if d.is_main else None
    if d.is_main:
        atomic_write_bytes(layout.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    model_path = str(resume_from) if resume_from else resolve_model_path(cfg, layout, template, train_set)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=param_dtype, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code
    ).to(device)
    model.config.use_cache = False  # no KV cache while training
    model.train()
    varlen = use_packed_attention(model, device) if tc.micro_batch_tokens else False
    if tc.compile or (tc.compile is None and device.type == "cuda"):
        for layer in model.model.layers:
            # The forward alone: FSDP's hooks around it stay eager (compiling `layer` would trace them too).
            layer.forward = torch.compile(layer.forward, dynamic=True)
    head = ResponseLogProbs(model)  # the LM head in chunks, only at response tokens, where the model allows
    if d.enabled:
        shard_model(head, model.model.layers, dtype, tc.fsdp_reshard_after_forward, tc.fsdp_layers_per_unit)
    # One process in bf16: the optimizer updates fp32 masters (sharded training has fp32 parameters already).
    master = MasterWeights(model) if tc.master_weights and not d.enabled and param_dtype != torch.float32 else None
    trained = master.params if master else list(model.parameters())  # what the optimizer and clipping see
    optimizer = torch.optim.AdamW(
        trained,
        lr=tc.learning_rate,
        betas=tuple(tc.adam_betas),
        weight_decay=tc.weight_decay,
        fused=device.type == "cuda",
    )
    if resume_from:
        state = load_trainer_state(resume_from, d)
        if d.enabled:
            load_local_optimizer_state(optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        if master and "master_weights" in state:
            master.load(state["master_weights"])
        elif master:
            log(f"resume: {resume_from} has no fp32 master weights; they start from its bf16 weights")
        restore_rng(state["rng"])
        log(f"resumed from {resume_from} (step {start_step})")
    # Only rank 0 writes model files into checkpoints.
    files_dir = model_files_dir(model_path, model, tokenizer, layout) if d.is_main else None
    checkpointer = AsyncCheckpointer(
        layout,
        cfg.hash(),
        files_dir,
        tc.keep_last,
        d,
        eval_backfill={cfg.evaluation.name: cfg.evaluation.backfill},
        master_weights=master.params if master else None,
        keep_best=BestRule.of(cfg),
        when_busy=tc.checkpoint_when_busy,
    )
    num_params = sum(p.numel() for p in model.parameters())  # a sharded parameter reports its full size
    attention = "varlen flash" if varlen else "sdpa"
    batching = (
        f"packed micro-batches of <= {tc.micro_batch_tokens} tokens ({attention} attention)"
        if tc.micro_batch_tokens
        else f"padded micro-batches of {tc.micro_batch_size} examples"
    )
    log(
        f"model {model_path}: {num_params / 1e6:.2f}M parameters, {dtype}{' (fp32 master weights)' if master else ''}, "
        f"{device} x {d.world}; {len(train_set)} training examples; {batching}; "
        + ("the LM head in chunks at response tokens" if head.chunked else "the model's own logits")
    )

    # Ctrl-C or SIGTERM (on any rank): every rank stops after the same step, finishes the pending save, exits 0.
    stop = StopFlag(d)

    # ---------------------------------------------------------------- loop
    step = start_step
    trainer_state = {"config_hash": cfg.hash(), "config": cfg.to_dict()}
    # Due checkpoints not saved because the previous save was still at work, over the whole run (resumes included:
    # every checkpoint records the list so far).
    skipped_steps: list[int] = read_trainer_meta(resume_from).get("checkpoints_skipped", []) if resume_from else []
    last_saved = start_step  # the newest step whose save was started

    def saved_meta(at: int) -> dict[str, Any]:
        """trainer_state.json of the checkpoint of step `at`."""
        return {"step": at, **trainer_state, "checkpoints_skipped": skipped_steps}

    if tc.publish_step0 and resume_from is None:  # the base model: every evaluation curve starts here
        checkpointer.save(0, model, optimizer, saved_meta(0))
    flops_per_token = 6 * num_params
    peak_flops = peak_bf16_flops(device)
    interval_t0, interval_tokens, interval_steps = time.perf_counter(), 0, 0
    # disable=None: a bar on a terminal only (piped, as in `make demo`, it would garble the other service's lines)
    bar = tqdm(
        total=tc.max_steps,
        initial=start_step,
        desc="train",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=None if d.is_main else True,
    )
    local_batch = tc.batch_size // d.world
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        profiler = profile_if_asked(d)
        while step < tc.max_steps and not stop.should_stop():
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tc)
            # This rank's slice of the global batch: the same examples in the same order for any world size.
            first = step * tc.batch_size + d.rank * local_batch
            batch = [train_set[order[p]] for p in range(first, first + local_batch)]
            prompts, responses = [render_prompt(template, ex) for ex in batch], [ex.response for ex in batch]
            micro, grad_accum_steps = make_micro_batches(prompts, responses, tokenizer, tc, d, pad_id)
            # Per-token mean over the whole global batch: normalize by response tokens per example (or per rank).
            num_response_tokens = all_reduce(sum(int(m["response_mask"].sum()) for m in micro), d)
            normalize = max(1, num_response_tokens) / (d.world if tc.micro_batch_tokens else tc.batch_size)
            interval_tokens += sum(num_real_tokens(m, pad_id) for m in micro)
            log_now = (step + 1) % tc.log_every == 0
            loss_sum, entropy_sum = 0.0, 0.0
            for mb in micro:
                forward = packed_forward_kwargs(mb, device, varlen) if tc.micro_batch_tokens else {}
                mb = {k: v.to(device, non_blocking=True) for k, v in mb.items() if isinstance(v, torch.Tensor)}
                out = head(mb["input_ids"], mb["labels"], mb["response_mask"], with_entropy=log_now, **forward)
                loss, _ = sft_microbatch_train_step(out["log_probs"], mb["response_mask"], grad_accum_steps, normalize)
                loss_sum += loss.detach()
                if log_now:
                    entropy_sum += (out["token_entropy"] * mb["response_mask"]).sum()
            with torch.profiler.record_function("optimizer_step"):  # a span in profiles (benchmarks)
                grad_norm = torch.nn.utils.clip_grad_norm_(trained, tc.max_grad_norm)
                checkpointer.before_optimizer_step()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if master:
                    master.sync()
            step += 1
            interval_steps += 1
            if step == start_step + 1:
                checkpointer.prepare(model, optimizer)  # host buffers for snapshots, allocated off the loop
            checkpointer.raise_if_failed()

            metrics: dict[str, Any] = {}
            if step % tc.eval_every == 0 or step == tc.max_steps:
                saved = checkpointer.save(step, model, optimizer, saved_meta(step), final=step == tc.max_steps)
                if "skipped" in saved:
                    skipped_steps = [*skipped_steps, step]
                    metrics["train/checkpoints_skipped"] = len(skipped_steps)
                    log(
                        f"warning: step {step} not saved: the checkpointer is still {saved['skipped']} (a save takes "
                        f"longer than training.eval_every={tc.eval_every} steps here); raise eval_every, write to a "
                        "faster disk, or set training.checkpoint_when_busy=wait to keep every checkpoint and let the "
                        "loop wait"
                    )
                else:
                    last_saved = step
                    metrics["train/checkpoint_blocked_s"] = saved["blocked_s"]
                    metrics["train/checkpoint_waited_s"] = saved["waited_for_previous_s"]
                    slow_disk = tc.checkpoint_when_busy == "wait" and step != tc.max_steps
                    if slow_disk and saved["waited_for_previous_s"] > 1.0:
                        log(
                            f"warning: the checkpoint of step {step} waited {saved['waited_for_previous_s']:.1f}s for "
                            f"the previous save to finish: writing takes longer than training.eval_every="
                            f"{tc.eval_every} steps here; raise eval_every, or write checkpoints to a faster disk"
                        )
            if log_now or metrics:
                # Global figures (sums over ranks); this waits for the device: only on logging steps.
                loss_value = all_reduce(loss_sum, d) / d.world
                elapsed = time.perf_counter() - interval_t0
                tokens_per_s = all_reduce(interval_tokens, d) / elapsed
                grad_norm = float(full_tensor(grad_norm))
                metrics.update(
                    {
                        "train_step": step,
                        "train/loss": loss_value,
                        "train/grad_norm": grad_norm,
                        "train/lr": optimizer.param_groups[0]["lr"],
                        "train/tokens_per_s": tokens_per_s,
                        "train/step_s": elapsed / interval_steps,
                    }
                )
                if log_now:
                    metrics["train/response_entropy"] = all_reduce(entropy_sum, d) / max(1, num_response_tokens)
                if peak_flops:
                    metrics["train/mfu"] = flops_per_token * tokens_per_s / (peak_flops * d.world)  # per GPU
                    metrics["train/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                if tracker:
                    tracker.log(metrics)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    gnorm=f"{grad_norm:.2f}",
                    lr=f"{metrics['train/lr']:.2e}",
                    tok_s=f"{tokens_per_s:.0f}",
                    refresh=False,
                )
                interval_t0, interval_tokens, interval_steps = time.perf_counter(), 0, 0
            bar.update(1)
            if profiler is not None:
                profiler.step()
        if step < tc.max_steps:
            log(f"\nstopped at step {step} (Ctrl-C or SIGTERM): finishing the pending checkpoint")
            if skipped_steps and skipped_steps[-1] > last_saved:  # resuming from the last save would lose more
                log(f"saving step {step}: the newest due checkpoint (step {skipped_steps[-1]}) was not saved")
                ignore_stop_signals()  # a rank interrupted inside this collective save would leave the others in it
                checkpointer.save(step, model, optimizer, saved_meta(step), final=True)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, wherever this rank was
        log(f"\ninterrupted during step {step + 1}: finishing the pending checkpoint")
    finally:
        ignore_stop_signals()  # the pending checkpoint must be finished
        bar.close()
        waited = checkpointer.wait()
        if tracker:
            tracker.finish()
        shutdown(d)
    newest = f"steps {skipped_steps}" if len(skipped_steps) <= 10 else f"the newest: steps {skipped_steps[-10:]}"
    log(
        f"done at step {step}; last checkpoint: step {checkpointer.last_published} (final save took {waited:.2f}s more)"
        + (f"; {len(skipped_steps)} not saved, the disk being behind: {newest}" if skipped_steps else "")
    )
    return {"step": step, "last_checkpoint": checkpointer.last_published}
