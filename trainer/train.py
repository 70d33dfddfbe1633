"""The SFT training loop, in the shape of torchtitan's: `_train` reads as the plan (set up, resume, loop, finish);
`train_step` is one optimizer step, `forward_backward` one micro-batch's passes; the checkpoint policy
(`save_if_due`), the log policy (`log_metrics`) and the stop policy (`StopFlag`, `finish_after_stop`) are small
named pieces. Every event goes through logging, from rank 0 only (`RankLog`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
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
    fsync_dir,
    fsync_tree,
    list_ready_checkpoints,
    move_aside_corrupt,
    remove_incomplete_checkpoints,
    verify_checkpoint,
)
from shared.tracking import Tracker
from trainer.checkpoint import AsyncCheckpointer, load_trainer_state, read_trainer_meta, restore_rng
from trainer.distributed import (
    Dist,
    StopFlag,
    all_reduce,
    from_main,
    full_tensor,
    init_distributed,
    load_local_optimizer_state,
    shard_model,
    shutdown,
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

logger = logging.getLogger(__name__)


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


def publish_base_model(layout: RunLayout, write: Callable[[Path], None]) -> Path:
    """The run's base_model folder, made once by `write(folder)`: written into a temporary folder inside the run
    directory, fsynced and renamed into place, so that base_model, once there, is whole and kept as it is. A
    temporary folder left by a crash is removed first."""
    final, tmp = layout.base_model_dir, layout.tmp_base_model_dir
    if final.is_dir():
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def resolve_model_path(cfg: Config, layout: RunLayout, template: str, train: list[Example]) -> str:
    """The model to start from: `model.path`, or the embedded model built into the run's base_model folder."""
    if cfg.model.path != EMBEDDED_MODEL:
        return cfg.model.path

    def build(out: Path) -> None:
        save_embedded_model(cfg.model, template, train, out, cfg.training.seed)

    return str(publish_base_model(layout, build))


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

    def export(out: Path) -> None:
        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return publish_base_model(layout, export)


def newest_valid_checkpoint(layout: RunLayout) -> Path | None:
    """Newest checkpoint whose manifest verifies. A broken one is moved aside (corrupt_step_N) with a message:
    training will write that step again, and a READY folder in the way would stop it there."""
    for _step, path in sorted(list_ready_checkpoints(layout.checkpoints_dir).items(), reverse=True):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointInvalid as exc:
            logger.warning(f"not resuming from {path}: {exc}; moved it aside to {move_aside_corrupt(path)}")
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
            f"learning rate at step {step} is {lr_at(step, cfg.training):.3e} "
            f"(it was {lr_at(step, old_tc):.3e} on the old schedule)"
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


class RankLog:
    """The trainer's events, logged by rank 0 only (every other rank would repeat each line)."""

    def __init__(self, d: Dist):
        self.enabled = d.is_main

    def info(self, message: str) -> None:
        if self.enabled:
            logger.info(message)

    def warning(self, message: str) -> None:
        if self.enabled:
            logger.warning(message)


@dataclasses.dataclass
class TrainingData:
    template: str
    examples: list[Example]
    order: DataOrder


@dataclasses.dataclass
class Throughput:
    """Tokens and steps since the last logged step: the logged rates cover that interval."""

    started: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: int = 0
    steps: int = 0

    def restart(self) -> None:
        self.started, self.tokens, self.steps = time.perf_counter(), 0, 0


@dataclasses.dataclass
class StepResult:
    """What one optimizer step leaves for logging (device tensors: reading them waits for the device)."""

    loss_sum: Any
    entropy_sum: Any
    grad_norm: torch.Tensor
    num_response_tokens: float
    log_now: bool


@dataclasses.dataclass
class Trainer:
    """Everything one training process holds, and where the loop is."""

    cfg: Config
    d: Dist
    layout: RunLayout
    log: RankLog
    data: TrainingData
    device: torch.device
    tokenizer: Any
    model: torch.nn.Module
    head: ResponseLogProbs
    varlen: bool
    optimizer: torch.optim.Optimizer
    master: MasterWeights | None
    trained: list[torch.Tensor]  # what the optimizer and clipping see
    checkpointer: AsyncCheckpointer
    tracker: Tracker | None
    resume_from: Path | None
    start_step: int
    step: int
    skipped_steps: list[int]  # due checkpoints not saved (the previous save still at work), resumes included
    last_saved: int  # the newest step whose save was started
    num_params: int  # a sharded parameter reports its full size
    throughput: Throughput = dataclasses.field(default_factory=Throughput)

    @property
    def tc(self):
        return self.cfg.training

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def saved_meta(self, at: int) -> dict[str, Any]:
        """trainer_state.json of the checkpoint of step `at`."""
        return {
            "step": at,
            "config_hash": self.cfg.hash(),
            "config": self.cfg.to_dict(),
            "checkpoints_skipped": self.skipped_steps,
        }


def train(cfg: Config) -> dict[str, Any]:
    """Train the run of `cfg`, resuming from its newest valid checkpoint. Only one trainer holds a run."""
    d = init_distributed()
    layout = RunLayout(cfg.run_dir)
    # The lock makes a new run directory atomically with the lock held, and removes it again after a failed start
    # that left nothing of value (shared/protocol/runlock.py); a refused trainer deletes nothing.
    with TrainerLock(layout) if d.is_main else contextlib.nullcontext():
        return _train(cfg, d, layout)


def _train(cfg: Config, d: Dist, layout: RunLayout) -> dict[str, Any]:
    """The plan: set up (nothing written before the data is read), resume, loop, finish."""
    log = RankLog(d)
    check_batch_sizes(cfg.training, d)
    data = load_training_data(cfg)
    resume_from, start_step = find_resume_point(cfg, layout, d, data, log)
    if start_step >= cfg.training.max_steps:
        log.info(
            f"{layout.run_dir}: already trained to step {start_step} (training.max_steps={cfg.training.max_steps}); "
            "nothing to do. Raise training.max_steps to train further."
        )
        shutdown(d)
        return {"step": start_step, "last_checkpoint": start_step}
    t = build_trainer(cfg, d, layout, log, data, resume_from, start_step)
    # Ctrl-C or SIGTERM (on any rank): every rank stops after the same step, finishes the pending save, exits 0.
    stop = StopFlag(d)
    if t.tc.publish_step0 and resume_from is None:  # the base model: every evaluation curve starts here
        t.checkpointer.save(0, t.model, t.optimizer, t.saved_meta(0))
    bar = progress_bar(t)
    try:
        run_loop(t, stop, bar)
        if t.step < t.tc.max_steps:
            finish_after_stop(t)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, wherever this rank was
        log.info(f"interrupted during step {t.step + 1}: finishing the pending checkpoint")
    finally:
        ignore_stop_signals()  # the pending checkpoint must be finished
        bar.close()
        waited = t.checkpointer.wait()
        if t.tracker:
            t.tracker.finish()
        shutdown(d)
    log.info(done_line(t, waited))
    return {"step": t.step, "last_checkpoint": t.checkpointer.last_published}


# ---------------------------------------------------------------------------------------------------- set up


def check_batch_sizes(tc, d: Dist) -> None:
    if tc.micro_batch_tokens and tc.batch_size % d.world:
        raise ConfigError(f"training.batch_size ({tc.batch_size}) must be a multiple of the {d.world} processes")
    if not tc.micro_batch_tokens and tc.batch_size % (tc.micro_batch_size * d.world):
        raise ConfigError(
            f"training.batch_size ({tc.batch_size}) must be a multiple of training.micro_batch_size "
            f"({tc.micro_batch_size}) x {d.world} processes"
        )


def load_training_data(cfg: Config) -> TrainingData:
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    template = load_prompt_template(cfg.prompt_template_path())
    examples = load_dataset(cfg.training.data)
    return TrainingData(template, examples, DataOrder(len(examples), cfg.training.seed))


def find_resume_point(
    cfg: Config, layout: RunLayout, d: Dist, data: TrainingData, log: RankLog
) -> tuple[Path | None, int]:
    """The newest valid checkpoint and its step (None, 0 for a new run), after clearing what a crash left."""
    newest = None
    if d.is_main:
        layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for leftover in remove_incomplete_checkpoints(layout.checkpoints_dir):
            log.info(f"removed incomplete checkpoint {leftover}")
        newest = newest_valid_checkpoint(layout)  # rank 0 verifies (hashes every file once)
        if newest is None:  # no checkpoint, or none valid: the embedded model built once, before other ranks look
            resolve_model_path(cfg, layout, data.template, data.examples)
    # The other ranks take rank 0's choice, after it has built base_model.
    resume_from = from_main(newest, d)
    return resume_from, check_resume(cfg, layout, resume_from, log.info) if resume_from else 0


def build_trainer(
    cfg: Config,
    d: Dist,
    layout: RunLayout,
    log: RankLog,
    data: TrainingData,
    resume_from: Path | None,
    start_step: int,
) -> Trainer:
    """The model, optimizer and checkpointer, restored from `resume_from` when given; the run's config written."""
    tc = cfg.training
    device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    tracker = Tracker(cfg, "train", "train_step", layout.run_dir) if d.is_main else None
    if d.is_main:
        atomic_write_bytes(layout.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    model_path = str(resume_from) if resume_from else resolve_model_path(cfg, layout, data.template, data.examples)
    tokenizer, model, head, varlen = load_model(cfg, model_path, device, d)
    optimizer, master = make_optimizer(tc, model, device, d)
    if resume_from:
        restore_state(resume_from, d, optimizer, master, log)
        log.info(f"resumed from {resume_from} (step {start_step})")
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
        max_unevaluated=tc.max_unevaluated,
    )
    skipped = read_trainer_meta(resume_from).get("checkpoints_skipped", []) if resume_from else []
    t = Trainer(
        cfg, d, layout, log, data, device, tokenizer, model, head, varlen, optimizer, master,
        master.params if master else list(model.parameters()), checkpointer, tracker, resume_from,
        start_step, step=start_step, skipped_steps=skipped, last_saved=start_step,
        num_params=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    log.info(describe(t, model_path))
    return t


def compute_dtypes(tc, device: torch.device, d: Dist) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, parameter dtype): sharded training keeps fp32 master parameters and computes in the
    compute dtype; one process trains in it (with fp32 masters in the optimizer, see make_optimizer)."""
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[tc.dtype]
    return dtype, torch.float32 if d.enabled else dtype


def load_model(cfg: Config, model_path: str, device: torch.device, d: Dist):
    """(tokenizer, model, its SFT head, whether packed rows use the varlen kernel), compiled and sharded as set."""
    tc = cfg.training
    dtype, param_dtype = compute_dtypes(tc, device, d)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=param_dtype, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code
    ).to(device)
    model.config.use_cache = False  # no KV cache while training
    model.train()
    varlen = use_packed_attention(model, device) if tc.micro_batch_tokens else False
    compiled = bool(tc.compile or (tc.compile is None and device.type == "cuda"))
    if compiled:
        for layer in model.model.layers:
            # The forward alone: FSDP's hooks around it stay eager (compiling `layer` would trace them too).
            layer.forward = torch.compile(layer.forward, dynamic=True)
    # The LM head in chunks, only at response tokens, where the model allows; its float32 math compiled too.
    head = ResponseLogProbs(model, compiled=compiled)
    if d.enabled:
        shard_model(head, model.model.layers, dtype, tc.fsdp_reshard_after_forward, tc.fsdp_layers_per_unit)
    return tokenizer, model, head, varlen


def make_optimizer(tc, model: torch.nn.Module, device: torch.device, d: Dist):
    """(AdamW, fp32 master weights or None). One process in bf16: the optimizer updates fp32 masters (sharded
    training has fp32 parameters already)."""
    param_dtype = next(model.parameters()).dtype
    master = MasterWeights(model) if tc.master_weights and not d.enabled and param_dtype != torch.float32 else None
    optimizer = torch.optim.AdamW(
        master.params if master else list(model.parameters()),
        lr=tc.learning_rate,
        betas=tuple(tc.adam_betas),
        weight_decay=tc.weight_decay,
        fused=device.type == "cuda",
    )
    return optimizer, master


def restore_state(resume_from: Path, d: Dist, optimizer, master: MasterWeights | None, log: RankLog) -> None:
    """The optimizer's state, the fp32 master weights and the random generators of the checkpoint."""
    state = load_trainer_state(resume_from, d)
    if d.enabled:
        load_local_optimizer_state(optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    if master and "master_weights" in state:
        master.load(state["master_weights"])
    elif master:
        log.info(f"resume: {resume_from} has no fp32 master weights; they start from its bf16 weights")
    restore_rng(state["rng"])


def describe(t: Trainer, model_path: str) -> str:
    """The setup line: model, dtypes, devices, data, batching, head."""
    tc = t.tc
    attention = "varlen flash" if t.varlen else "sdpa"
    batching = (
        f"packed micro-batches of <= {tc.micro_batch_tokens} tokens ({attention} attention)"
        if tc.micro_batch_tokens
        else f"padded micro-batches of {tc.micro_batch_size} examples"
    )
    dtype = compute_dtypes(tc, t.device, t.d)[0]
    head = "the LM head in chunks at response tokens" if t.head.chunked else "the model's own logits"
    return (
        f"model {model_path}: {t.num_params / 1e6:.2f}M parameters, {dtype}"
        f"{' (fp32 master weights)' if t.master else ''}, {t.device} x {t.d.world}; "
        f"{len(t.data.examples)} training examples; {batching}; {head}"
    )


def progress_bar(t: Trainer) -> tqdm:
    # disable=None: a bar on a terminal only (piped, as in `make demo`, it would garble the other service's lines)
    return tqdm(
        total=t.tc.max_steps,
        initial=t.start_step,
        desc="train",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=None if t.d.is_main else True,
    )


# ---------------------------------------------------------------------------------------------------- loop


def run_loop(t: Trainer, stop: StopFlag, bar: tqdm) -> None:
    """Optimizer steps until max_steps or a stop request; after each, the checkpoint and log policies."""
    profiler = profile_if_asked(t.d)
    while t.step < t.tc.max_steps and not stop.should_stop():
        result = train_step(t)
        t.step += 1
        t.throughput.steps += 1
        if t.step == t.start_step + 1:
            t.checkpointer.prepare(t.model, t.optimizer)  # host buffers for snapshots, allocated off the loop
        t.checkpointer.raise_if_failed()
        metrics = save_if_due(t)
        if result.log_now or metrics:
            log_metrics(t, result, metrics, bar)
        bar.update(1)
        if profiler is not None:
            profiler.step()


def step_examples(t: Trainer) -> tuple[list[str], list[str]]:
    """This rank's slice of the global batch of step t.step, as prompts and responses: the same examples in the
    same order for any world size."""
    tc, d = t.tc, t.d
    local_batch = tc.batch_size // d.world
    first = t.step * tc.batch_size + d.rank * local_batch
    batch = [t.data.examples[t.data.order[p]] for p in range(first, first + local_batch)]
    return [render_prompt(t.data.template, ex) for ex in batch], [ex.response for ex in batch]


def train_step(t: Trainer) -> StepResult:
    """One optimizer step at t.step: this rank's examples as forward passes, their backward, the update."""
    tc, d = t.tc, t.d
    for group in t.optimizer.param_groups:
        group["lr"] = lr_at(t.step, tc)
    micro, grad_accum_steps = make_micro_batches(*step_examples(t), t.tokenizer, tc, d, t.pad_id)
    # Per-token mean over the whole global batch: normalize by response tokens per example (or per rank).
    num_response_tokens = all_reduce(sum(int(m["response_mask"].sum()) for m in micro), d)
    normalize = max(1, num_response_tokens) / (d.world if tc.micro_batch_tokens else tc.batch_size)
    t.throughput.tokens += sum(num_real_tokens(m, t.pad_id) for m in micro)
    log_now = (t.step + 1) % tc.log_every == 0
    loss_sum, entropy_sum = 0.0, 0.0
    for mb in micro:
        loss, entropy = forward_backward(t, mb, grad_accum_steps, normalize, with_entropy=log_now)
        loss_sum, entropy_sum = loss_sum + loss, entropy_sum + entropy
    with torch.profiler.record_function("optimizer_step"):  # a span in profiles (benchmarks)
        grad_norm = torch.nn.utils.clip_grad_norm_(t.trained, tc.max_grad_norm)
        t.checkpointer.before_optimizer_step()
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        if t.master:
            t.master.sync()
    return StepResult(loss_sum, entropy_sum, grad_norm, num_response_tokens, log_now)


def forward_backward(t: Trainer, mb: dict, grad_accum_steps: int, normalize: float, with_entropy: bool):
    """One micro-batch's forward and backward pass (gradients accumulate): (its loss, the sum of its response
    tokens' entropies or 0.0), as device values."""
    forward = packed_forward_kwargs(mb, t.device, t.varlen) if t.tc.micro_batch_tokens else {}
    mb = {k: v.to(t.device, non_blocking=True) for k, v in mb.items() if isinstance(v, torch.Tensor)}
    out = t.head(mb["input_ids"], mb["labels"], mb["response_mask"], with_entropy=with_entropy, **forward)
    loss, _ = sft_microbatch_train_step(out["log_probs"], mb["response_mask"], grad_accum_steps, normalize)
    entropy = (out["token_entropy"] * mb["response_mask"]).sum() if with_entropy else 0.0
    return loss.detach(), entropy


def save_if_due(t: Trainer) -> dict[str, Any]:
    """The checkpoint policy: a save every eval_every steps and at the last; the checkpointer decides whether a
    busy save skips or waits. Returns the save's metrics ({} when none was due)."""
    tc, step = t.tc, t.step
    if step % tc.eval_every and step != tc.max_steps:
        return {}
    saved = t.checkpointer.save(step, t.model, t.optimizer, t.saved_meta(step), final=step == tc.max_steps)
    if "skipped" in saved:
        t.skipped_steps = [*t.skipped_steps, step]
        if saved["cause"] == "busy":  # skipped for space: the checkpointer logged why, with the bytes
            t.log.warning(
                f"step {step} not saved: the checkpointer is still {saved['skipped']} (a save takes longer than "
                f"training.eval_every={tc.eval_every} steps here); raise eval_every, write to a faster disk, or set "
                "training.checkpoint_when_busy=wait to keep every checkpoint and let the loop wait"
            )
        return {"train/checkpoints_skipped": len(t.skipped_steps)}
    t.last_saved = step
    waited_s = saved["waited_for_previous_s"]
    if tc.checkpoint_when_busy == "wait" and step != tc.max_steps and waited_s > 1.0:
        t.log.warning(
            f"the checkpoint of step {step} waited {waited_s:.1f}s for the previous save to finish: writing takes "
            f"longer than training.eval_every={tc.eval_every} steps here; raise eval_every, or write checkpoints "
            "to a faster disk"
        )
    return {"train/checkpoint_blocked_s": saved["blocked_s"], "train/checkpoint_waited_s": waited_s}


def log_metrics(t: Trainer, result: StepResult, metrics: dict[str, Any], bar: tqdm) -> None:
    """The log policy: global figures (sums over ranks) of the interval since the last logged step, to the tracker
    and the progress bar. This waits for the device: only on logging steps and steps that saved."""
    d = t.d
    loss_value = all_reduce(result.loss_sum, d) / d.world
    elapsed = time.perf_counter() - t.throughput.started
    tokens_per_s = all_reduce(t.throughput.tokens, d) / elapsed
    grad_norm = float(full_tensor(result.grad_norm))
    metrics.update(
        {
            "train_step": t.step,
            "train/loss": loss_value,
            "train/grad_norm": grad_norm,
            "train/lr": t.optimizer.param_groups[0]["lr"],
            "train/tokens_per_s": tokens_per_s,
            "train/step_s": elapsed / t.throughput.steps,
        }
    )
    if result.log_now:
        metrics["train/response_entropy"] = all_reduce(result.entropy_sum, d) / max(1, result.num_response_tokens)
    peak_flops = peak_bf16_flops(t.device)
    if peak_flops:
        metrics["train/mfu"] = 6 * t.num_params * tokens_per_s / (peak_flops * d.world)  # per GPU
        metrics["train/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if t.tracker:
        t.tracker.log(metrics)
    bar.set_postfix(
        loss=f"{loss_value:.4f}",
        gnorm=f"{grad_norm:.2f}",
        lr=f"{metrics['train/lr']:.2e}",
        tok_s=f"{tokens_per_s:.0f}",
        refresh=False,
    )
    t.throughput.restart()


# ---------------------------------------------------------------------------------------------------- finish


def finish_after_stop(t: Trainer) -> None:
    """The stop policy after Ctrl-C or SIGTERM: the pending save finishes (in `_train`), and the current step is
    saved too when the newest due checkpoint was skipped (resuming from the last save would lose more)."""
    t.log.info(f"stopped at step {t.step} (Ctrl-C or SIGTERM): finishing the pending checkpoint")
    if t.skipped_steps and t.skipped_steps[-1] > t.last_saved:
        t.log.info(f"saving step {t.step}: the newest due checkpoint (step {t.skipped_steps[-1]}) was not saved")
        ignore_stop_signals()  # a rank interrupted inside this collective save would leave the others in it
        t.checkpointer.save(t.step, t.model, t.optimizer, t.saved_meta(t.step), final=True)


def done_line(t: Trainer, waited_s: float) -> str:
    skipped = t.skipped_steps
    newest = f"steps {skipped}" if len(skipped) <= 10 else f"the newest: steps {skipped[-10:]}"
    return (
        f"done at step {t.step}; last checkpoint: step {t.checkpointer.last_published} (final save took "
        f"{waited_s:.2f}s more)" + (f"; {len(skipped)} not saved, the disk being behind: {newest}" if skipped else "")
    )
