"""Typed run configuration shared by the trainer and the evaluator.

One YAML file describes a whole run (model, data, training, evaluation, logging), so
`make train CONFIG=x.yaml` and `make eval CONFIG=x.yaml` agree on the run directory and
on the data without passing anything between them. Every field has a docstring (the
string literal under it); `load_config` validates types and values and names the key of
anything wrong. This module must not import torch or vllm: the evaluator's watcher, the
Makefile helpers and the tests import it on machines where neither is usable.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shared.errors import UserError
from shared.protocol.layout import (
    AVERAGE_DIRNAME,
    AVERAGE_RESULTS_PREFIX,
    REPORT_NAME,
    SNAPSHOTS_DIRNAME,
    SUPERSEDED_DIRNAME,
    WANDB_DIRNAME,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config" / "default.yaml"

EMBEDDED_MODEL = "embedded:tiny-qwen2"
"""`model.path` value that builds the tiny Qwen2 model and tokenizer in code."""

EMBEDDED_DATA = "embedded:arithmetic"
"""`*.data.path` value that generates arithmetic word problems in code."""


RESERVED_NAMES = (WANDB_DIRNAME, REPORT_NAME, SNAPSHOTS_DIRNAME, SUPERSEDED_DIRNAME, AVERAGE_DIRNAME)
"""Folders of an evaluation's results that are no set (W&B's files, the report, the evaluator's snapshots of what
it evaluates, results of an earlier evaluation config, the window of averaged checkpoints; average_last_<k>/,
their results, is reserved too): shared/protocol/layout.py names them."""


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the file and key."""


@dataclass
class DatasetConfig:
    path: str = EMBEDDED_DATA
    """A JSONL file, `embedded:arithmetic`, or `hf:<name>` (needs the network)."""
    format: Literal["auto", "sft", "math", "gsm8k"] = "auto"
    """Record layout: sft {prompt, response}, math {problem, solution, answer?}, gsm8k {question, answer}; auto detects
    it from the first record."""
    split: str = "train"
    """Split for `embedded:` and `hf:` sources (embedded: train or test); ignored for files."""
    num_examples: int | None = None
    """Generated examples for `embedded:` sources, or a cap on the records read from files; null = all (embedded: 20000
    train / 500 test)."""

    def validate(self, key: str) -> None:
        if not self.path:
            raise ConfigError(f"{key}.path: must not be empty")
        _positive_or_null(key, self, "num_examples")


@dataclass
class ModelConfig:
    path: str = EMBEDDED_MODEL
    """Local Hugging Face model folder, a hub name (needs the network), or `embedded:tiny-qwen2`."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off by default: it executes arbitrary Python."""
    embedded_hidden_size: int = 128
    """Hidden size of the embedded tiny model (only for `embedded:tiny-qwen2`)."""
    embedded_num_layers: int = 2
    """Transformer layers of the embedded tiny model."""
    embedded_vocab_size: int = 512
    """BPE vocabulary size of the embedded tokenizer, trained in code on the prompt and generated data."""

    def validate(self, key: str) -> None:
        if not self.path:
            raise ConfigError(f"{key}.path: must not be empty")
        if self.embedded_hidden_size % 64:
            raise ConfigError(
                f"{key}.embedded_hidden_size: must be a multiple of 64 (head size), got {self.embedded_hidden_size}"
            )
        if self.embedded_num_layers < 1:
            raise ConfigError(f"{key}.embedded_num_layers: must be >= 1, got {self.embedded_num_layers}")
        if self.embedded_vocab_size < 300:
            raise ConfigError(
                f"{key}.embedded_vocab_size: must be >= 300 (256 bytes + specials), got {self.embedded_vocab_size}"
            )


@dataclass
class KeepBestConfig:
    k: int = 1
    """How many of the best checkpoints to keep."""
    metric: str = "accuracy"
    """Metric of the evaluator's results to rank by, higher is better: accuracy, pass@K, maj@K, format_rate..."""
    set: str | None = None
    """Evaluation set whose metric ranks; null = the first of evaluation.sets (or the one set)."""

    def validate(self, key: str) -> None:
        _positive(key, self, "k")
        if not self.metric:
            raise ConfigError(f"{key}.metric: must not be empty")


@dataclass
class TrainingConfig:
    gpus: list[int] = field(default_factory=lambda: [0])
    """GPU indices for the trainer (sets CUDA_VISIBLE_DEVICES unless the user set it). Ignored on a machine with no
    GPU."""
    data: DatasetConfig = field(default_factory=DatasetConfig)
    """Training set: prompt/response pairs."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    batch_size: int = 32
    """Examples per optimizer step (global batch)."""
    micro_batch_size: int = 32
    """Examples per forward/backward pass when not packing; batch_size / micro_batch_size = accumulation steps."""
    micro_batch_tokens: int | None = None
    """Padding-free packing: each forward pass takes whole examples, in data order, concatenated up to this many
    tokens (>= max_seq_len), in as few passes as that allows, evened out; attention never crosses examples.
    null = padded micro-batches of micro_batch_size.
    The global batch stays batch_size examples, with the same order and loss."""
    master_weights: bool = True
    """With bfloat16 on one process: AdamW updates fp32 master copies of the weights, and the model computes with
    them rounded to bf16 (without, most updates at lr 2e-5 round away). +6 bytes per parameter (1.5B: +14 GB)."""
    compile: bool | None = None
    """torch.compile each decoder layer (dynamic shapes); null = on with CUDA, where it was measured faster
    (BENCHMARKS.md: 1.25x on 8 x 1024 tokens, H200, on and off in one call), off on the CPU (slow to compile)."""
    fsdp_reshard_after_forward: bool = False
    """Several GPUs (FSDP2): true frees each decoder layer's gathered bf16 weights after its forward and gathers
    them again for its backward, saving 2 bytes per parameter on every GPU (1.5B: 3 GB). false (the default)
    keeps them until the backward: one all-gather less per layer and step, measured faster on 2 x H100
    (85.8 % against 80.0 % per-GPU scaling, BENCHMARKS.md). Turn it on for models that do not fit otherwise."""
    fsdp_layers_per_unit: int = 7
    """Several GPUs (FSDP2): consecutive decoder layers gathered and reduced together, as one unit. More per unit:
    fewer, larger collectives and fewer FSDP hooks on the host, whose cost per unit is fixed and left the GPUs
    waiting; with fsdp_reshard_after_forward, more memory (up to two units' weights gathered at once). Measured
    on 2 x H200, 1.5B (BENCHMARKS.md), per-GPU scaling: 85.6 % with 1, 87.6 % with 2, 90.2 % with 4, 91.7 % with 7."""
    max_seq_len: int = 1024
    """Prompt + response tokens kept per example; longer examples are truncated from the right."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at learning_rate * min_lr_ratio."""
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (global L2 norm)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Parameter and compute dtype: auto = bfloat16 on GPU, float32 on CPU."""
    seed: int = 0
    """Seed for model init (embedded model), data order and dropout."""
    eval_every: int = 500
    """Publish a checkpoint every this many steps (and at the last step)."""
    checkpoint_when_busy: Literal["skip", "wait"] = "skip"
    """A checkpoint due while the previous save is still at work (the disk slower than eval_every steps): skip =
    that step is not saved, with a warning naming it and train/checkpoints_skipped counting them, and the loop is
    not held for the disk; wait = every due checkpoint is saved and the loop waits for the disk. The max_steps
    step is always saved, and so is the step a stop (Ctrl-C, SIGTERM) ends at when the newest due save was
    skipped."""
    keep_last: int | None = None
    """Newest checkpoints always kept on disk; older ones are deleted unless kept by keep_best or
    max_unevaluated. null = keep every checkpoint (no retention)."""
    max_unevaluated: int = 2
    """With keep_last: besides the newest keep_last (and keep_best's), keep at most this many of the newest
    checkpoints that some evaluation (evaluation.name, and every eval/<name>/ ledger of the run) has not finished;
    older unevaluated ones are deleted, logged and recorded `deleted` in those evaluations' ledgers. Bounds the
    disk a slow or hung evaluator costs: at most keep_last + max_unevaluated (+ keep_best's k) checkpoints. 0 =
    keep none for evaluators."""
    keep_best: KeepBestConfig | None = None
    """Also keep the k best checkpoints by the evaluation's results (evaluation.name), e.g. {k: 2, metric:
    accuracy, set: math500}; runs/<run>/best links to the best. null = off."""
    publish_step0: bool = True
    """Publish the initial weights as checkpoint step 0, so every evaluation curve starts at the base model."""
    log_every: int = 1
    """Print and log training metrics every this many steps."""
    num_threads: int | None = None
    """CPU threads for torch (null = torch's default). Only matters on CPU."""

    def validate(self, key: str) -> None:
        _positive(
            key,
            self,
            "max_steps",
            "batch_size",
            "micro_batch_size",
            "max_seq_len",
            "eval_every",
            "log_every",
            "fsdp_layers_per_unit",
        )
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{key}.batch_size ({self.batch_size}) must be a multiple of "
                f"{key}.micro_batch_size ({self.micro_batch_size})"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"{key}.learning_rate: must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{key}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"{key}.warmup_steps: must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}"
            )
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"{key}.adam_betas: must be two numbers in [0, 1), got {self.adam_betas}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"{key}.max_grad_norm: must be > 0, got {self.max_grad_norm}")
        _positive_or_null(key, self, "keep_last", "num_threads", "micro_batch_tokens")
        if self.max_unevaluated < 0:
            raise ConfigError(f"{key}.max_unevaluated: must be >= 0, got {self.max_unevaluated}")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.max_seq_len:
            raise ConfigError(
                f"{key}.micro_batch_tokens ({self.micro_batch_tokens}) must be >= {key}.max_seq_len "
                f"({self.max_seq_len}): an example is never split"
            )
        _gpu_list(key, "gpus", self.gpus)
        self.data.validate(f"{key}.data")
        if self.keep_best is not None:
            self.keep_best.validate(f"{key}.keep_best")


def reported_budgets(max_tokens: int, chosen: list[int] | None) -> list[int]:
    """The token budgets b of accuracy_at_budget/<b> for a set: `chosen` (evaluation.token_budgets) up to
    max_tokens, else the powers of two below max_tokens from 256 (from max_tokens / 8 when that is smaller),
    and max_tokens itself."""
    if chosen is None:
        start = min(256, max(1, max_tokens // 8))
        chosen = [2**i for i in range(max_tokens.bit_length()) if start <= 2**i]
    return sorted({b for b in chosen if b < max_tokens} | {max_tokens})


@dataclass
class AverageConfig:
    last: int | None = None
    """Also evaluate the element-wise mean of the weights of the last k published checkpoints (k >= 2) as a
    checkpoint of its own; null = no averaged checkpoint."""

    def validate(self, key: str) -> None:
        if self.last is not None and self.last < 2:
            raise ConfigError(f"{key}.last: an average needs at least 2 checkpoints, got {self.last}")


def reported_ks(n: int) -> list[int]:
    """The k of pass@k and maj@k reported for n samples per problem: 1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


RANKABLE_METRICS = ("accuracy", "answer_accuracy", "format_rate", "accuracy_completed")
"""Metrics where higher is better that training.keep_best may rank by, besides pass@k, maj@k and accuracy_by/."""


SET_KEYS = (
    "data",
    "num_samples",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "breakdown_fields",
    "select_fraction",
)
"""Keys of `evaluation` that an entry of `evaluation.sets` may set for itself; the others are shared."""

IMPLICIT_SET = "main"
"""Name of the one evaluation set of a config without `evaluation.sets`."""


@dataclass
class EvalSetConfig:
    """One evaluation set: its data and sampling (`evaluation.sets.<name>`, over the section's values)."""

    name: str
    """Name of the set: results in eval/<evaluation.name>/<set>/, W&B keys eval/<set>/..."""
    data: DatasetConfig
    """The problems."""
    num_samples: int | None
    """Fixed, seeded subset of the problems; null = all."""
    n: int
    """Samples per problem: accuracy is their mean, pass@k and maj@k are reported for k = 1, 2, 4, ..., n."""
    temperature: float
    """Sampling temperature (0 = greedy)."""
    top_p: float
    """Nucleus sampling threshold."""
    max_tokens: int
    """Most tokens generated per response; hitting it counts as truncated."""
    stop: list[str]
    """Stop strings; the matched stop string is kept in the response."""
    breakdown_fields: list[str] | None
    """Fields of the records to break accuracy down by; null = each field the records carry with 2 to 50
    distinct values, fewer than the problems (MATH: subject, level)."""
    select_fraction: float | None = None
    """Share of the problems (a seeded split by problem, the same at every step) on which best/keep_best choose:
    the report gives the chosen step's score on the rest, held out. null = no split (best is chosen on the set
    it is reported on)."""

    def validate(self, key: str) -> None:
        _positive(key, self, "n", "max_tokens")
        if self.select_fraction is not None and not 0 < self.select_fraction < 1:
            raise ConfigError(f"{key}.select_fraction: must be in (0, 1) or null, got {self.select_fraction}")
        _positive_or_null(key, self, "num_samples")
        if self.temperature < 0:
            raise ConfigError(f"{key}.temperature: must be >= 0, got {self.temperature}")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError(f"{key}.n: {self.n} samples at temperature 0 are {self.n} copies of one; set n: 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{key}.top_p: must be in (0, 1], got {self.top_p}")
        self.data.validate(f"{key}.data")


@dataclass
class EvaluationConfig:
    name: str = "default"
    """Name of this evaluation; results go to runs/<run>/eval/<name>/, so several evaluations of one run can coexist."""
    gpus: list[int] = field(default_factory=lambda: [1])
    """GPU indices for the evaluator (sets CUDA_VISIBLE_DEVICES unless the user set it). Ignored on a machine with no
    GPU."""
    data: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="test"))
    """Evaluation set (held out from training)."""
    num_samples: int | None = 100
    """Fixed, seeded subset of the evaluation set used for every checkpoint; null = all."""
    n: int = 1
    """Samples per problem (pass@k and maj@k for k = 1, 2, 4, ..., n)."""
    breakdown_fields: list[str] | None = None
    """Fields of the records to break accuracy down by; null = each field with 2 to 50 distinct values."""
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Several evaluation sets by name, e.g. {math500: {data: {path: x.jsonl}, n: 4}, aime24: {...}}: each may
    set data, num_samples, n, temperature, top_p, max_tokens, stop, breakdown_fields; a key it leaves out takes
    this section's value (data: key by key). Empty = one set named `main` from this section's keys. One engine
    and one weight reload per checkpoint serve every set."""
    seed: int = 0
    """Seed for the subsets and for sampling: request j of problem i of set s is sampled with a seed derived
    from (seed, s, i, j), so an evaluator restarted on the same checkpoint gives the same samples."""
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """Generation engine: vllm where a GPU and vLLM are present (auto), else transformers (hf)."""
    vllm_engine_process: Literal["child", "in-process"] = "child"
    """child: vLLM's engine core runs in a child process (faster; falls back to in-process, with a warning,
    when it does not start within engine_start_timeout_s)."""
    engine_start_timeout_s: float = 300.0
    """Longest wait for a vLLM engine core in a child process to start before falling back to in-process."""
    generate_timeout_s: float = 600.0
    """A generate call with no progress for this long (no token step with hf, no finished request with vllm) is
    taken for hung: the engine is killed, the step goes back to pending and the next load builds a new engine.
    600 s is far above a healthy gap (a vLLM request of 4,096 tokens at 512 sequences takes about a minute on an
    H200) yet bounds a wedged engine (a stuck collective) to minutes; raise it for very long responses."""
    vllm_max_num_seqs: int = 512
    """Most sequences vLLM decodes at once; its CUDA graphs are captured up to this batch size. vLLM 0.26's
    defaults let 1,024 run but capture graphs only up to 512, and a batch past 512 ran without them: two sets
    (640 requests) in one call ran at 0.71x of the same requests split in two calls (H200, BENCHMARKS.md)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_tokens: int = 1024
    """Most tokens generated per response; hitting it counts as truncated."""
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    """Stop strings; the matched stop string is kept in the response."""
    hf_batch_size: int = 64
    """Prompts per transformers generate() call (hf backend)."""
    gpu_memory_utilization: float = 0.85
    """Fraction of the evaluator GPU's memory vLLM may use."""
    max_model_len: int | None = None
    """vLLM context length; null = prompt + max_tokens rounded up, capped at the model's."""
    grader_timeout_s: float = 5.0
    """Wall-clock bound on grading one response; a timeout counts as wrong."""
    num_grader_workers: int | None = None
    """Processes that grade in parallel; null = one per core, at most 16."""
    observer: Literal["auto", "inotify", "polling"] = "auto"
    """How new checkpoints are noticed: auto = the OS's native watcher, polling on failure. Use polling on network
    filesystems."""
    rescan_s: float = 30.0
    """Rescan the checkpoint folder this often whatever the watcher says (covers lost events)."""
    backfill: bool = False
    """Evaluate checkpoints passed over for a newer one, newest first, whenever nothing newer waits."""
    select_fraction: float | None = None
    """Share of each set's problems on which best/keep_best choose (a set may set its own); null = no split."""
    ci_num_resamples: int = 1000
    """Bootstrap replicates behind every 95 % interval (accuracy, pass@k, maj@k); 0 = no intervals."""
    token_budgets: list[int] | None = None
    """Token budgets b of accuracy_at_budget/<b> (up to each set's max_tokens, which is always one); null =
    powers of two from 256 (or max_tokens / 8) below max_tokens."""
    average: AverageConfig | None = None
    """e.g. {last: 3}: also evaluate the average of the last 3 published checkpoints' weights (avg_last_3)."""
    num_logged_samples: int = 8
    """Sample generations logged to W&B per checkpoint and set."""
    num_threads: int | None = None
    """CPU threads for torch in the evaluator (null = torch's default). Only matters on CPU."""
    heartbeat_timeout_s: float = 900.0
    """An evaluator whose presence record has not changed for this long (by the reader's own monotonic clock;
    it changes only when its work advances) is taken for dead, frozen or hung, and another evaluator may take its
    claim. Must exceed generate_timeout_s and engine_start_timeout_s, the longest phases without progress; the
    cost of a dead evaluator's claim waiting this long is only a later re-evaluation, so the margin is generous."""
    max_attempts: int = 3
    """Attempts at evaluating one step before it is marked failed. A transient failure (an engine crash or hang,
    out of memory, grader workers that cannot start, an evaluator that died) gives the step back, the attempt and
    its reason recorded in the ledger; a checkpoint that fails verification is failed at once (it would again)."""

    def eval_sets(self) -> list[EvalSetConfig]:
        """The sets to evaluate, each key resolved (a set's own value, else this section's)."""
        shared = {k: getattr(self, k) for k in SET_KEYS}
        shared["data"] = dataclasses.asdict(self.data)
        if not self.sets:
            return [_build(EvalSetConfig, {"name": IMPLICIT_SET, **shared}, "evaluation")]
        resolved = []
        for name, own in self.sets.items():
            key = f"evaluation.sets.{name}"
            if not isinstance(own, dict):
                raise ConfigError(f"{key}: expected a mapping of set keys ({', '.join(SET_KEYS)}), got {own!r}")
            for k in own:
                if k not in SET_KEYS:
                    close = difflib.get_close_matches(str(k), SET_KEYS, n=1, cutoff=0.6)
                    hint = f"; did you mean '{close[0]}'?" if close else f"; a set may set {', '.join(SET_KEYS)}"
                    raise ConfigError(f"unknown key '{key}.{k}'{hint}")
            merged = {**shared, **own, "name": name}
            if isinstance(own.get("data"), dict):
                merged["data"] = {**shared["data"], **own["data"]}
            resolved.append(_build(EvalSetConfig, merged, key))
        return resolved

    def validate(self, key: str) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"{key}.name: must be a plain folder name, got {self.name!r}")
        _positive(
            key,
            self,
            "hf_batch_size",
            "rescan_s",
            "grader_timeout_s",
            "heartbeat_timeout_s",
            "engine_start_timeout_s",
            "generate_timeout_s",
            "vllm_max_num_seqs",
            "max_attempts",
        )
        silent = max(("generate_timeout_s", "engine_start_timeout_s"), key=lambda name: getattr(self, name))
        if self.heartbeat_timeout_s <= getattr(self, silent):
            raise ConfigError(
                f"{key}.heartbeat_timeout_s: must exceed {key}.{silent} ({getattr(self, silent):g} s), the longest "
                f"phase without progress; got {self.heartbeat_timeout_s:g} (a working evaluator would look dead)"
            )
        _positive_or_null(key, self, "num_threads", "num_grader_workers")
        if self.ci_num_resamples != 0 and self.ci_num_resamples < 100:
            raise ConfigError(
                f"{key}.ci_num_resamples: must be 0 (no intervals) or >= 100, got {self.ci_num_resamples}"
            )
        if self.token_budgets is not None and (not self.token_budgets or min(self.token_budgets) < 1):
            raise ConfigError(f"{key}.token_budgets: must be a non-empty list of token counts >= 1, or null")
        if self.average is not None:
            self.average.validate(f"{key}.average")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{key}.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        _gpu_list(key, "gpus", self.gpus)
        for name in self.sets:
            reserved_prefix = name.startswith((".", "step_", AVERAGE_RESULTS_PREFIX))
            if not name or "/" in name or reserved_prefix or name in RESERVED_NAMES:
                raise ConfigError(
                    f"{key}.sets: a set name must be a plain folder name, not {', '.join(RESERVED_NAMES)}, step_* "
                    f"or {AVERAGE_RESULTS_PREFIX}*; got {name!r}"
                )
        for s in self.eval_sets():
            s.validate(f"{key}.sets.{s.name}" if self.sets else key)


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = online when W&B credentials exist, else offline (files under the run directory)."""
    project: str = "math-sft"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); null = your default."""
    group: str | None = None
    """W&B group joining the trainer's and evaluator's runs; null = the run name."""

    def validate(self, key: str) -> None:
        if not self.project:
            raise ConfigError(f"{key}.project: must not be empty")


@dataclass
class Config:
    run_name: str = "demo"
    """Name of the run; everything it writes lives in <runs_dir>/<run_name>/."""
    runs_dir: str = "runs"
    """Folder holding run directories (relative paths are relative to the working directory)."""
    prompt_template: str = "prompts/r1_zero.prompt"
    """Prompt template file with a {question} placeholder (relative to the repository when not found as given)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Trainer settings."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Evaluator settings."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""

    def validate(self) -> None:
        if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
            raise ConfigError(f"run_name: must be a plain folder name, got {self.run_name!r}")
        self.model.validate("model")
        self.training.validate("training")
        self.evaluation.validate("evaluation")
        self.wandb.validate("wandb")
        best = self.training.keep_best
        sets = {s.name: s for s in self.evaluation.eval_sets()}
        if best is not None and best.set is not None and best.set not in sets:
            raise ConfigError(f"training.keep_best.set: no evaluation set {best.set!r}; the sets: {', '.join(sets)}")
        if best is not None:
            n = sets[self.best_set()].n
            k = re.fullmatch(r"(?:pass|maj)@(\d+)", best.metric)
            known = best.metric in RANKABLE_METRICS or best.metric.startswith("accuracy_by/")
            if not (known or (k and int(k.group(1)) in reported_ks(n))):
                choices = ", ".join([*RANKABLE_METRICS, *(f"pass@{k}" for k in reported_ks(n))])
                raise ConfigError(
                    f"training.keep_best.metric: {best.metric!r} is not reported for set {self.best_set()!r} "
                    f"(n={n}); rank by one of {choices}, maj@k, or accuracy_by/<field>/<value>"
                )

    def best_set(self) -> str:
        """The evaluation set that ranks checkpoints for training.keep_best."""
        best = self.training.keep_best
        return best.set if best and best.set else self.evaluation.eval_sets()[0].name

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable hash of the resolved config (recorded in manifests and results)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def prompt_template_path(self) -> Path:
        path = Path(self.prompt_template)
        if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
            path = REPO_ROOT / path
        return path


def _positive(key: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{key}.{name}: must be > 0, got {value}")


def _positive_or_null(key: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ConfigError(f"{key}.{name}: must be >= 1 or null, got {value}")


def _gpu_list(key: str, name: str, gpus: list[int]) -> None:
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(f"{key}.{name}: must be a non-empty list of distinct GPU indices >= 0, got {gpus}")


# --------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            hint = (
                f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?"
                if close
                else f"; known keys: {', '.join(names)}"
            )
            raise ConfigError(f"unknown key '{key}'{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["training.learning_rate=1e-5", "wandb.mode=disabled"]` -> [(key, value)] with YAML-typed values."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. training.learning_rate=1e-5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML: {exc}") from None
        parsed.append((key.strip(), value))
    return parsed


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (default: config/default.yaml), apply dotted overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        _set_dotted(data, key, value)
    try:
        cfg = _build(Config, data)
        cfg.validate()
    except ConfigError as exc:
        # Blame what the user typed: the override whose key the message names, else the file.
        message = str(exc)
        for (key, _), item in zip(parsed, overrides or [], strict=False):
            if message.startswith((f"{key}:", f"{key}[", f"{key}.")) or f"'{key}'" in message or f"'{key}." in message:
                raise ConfigError(f"override '{item}': {message}") from None
        raise ConfigError(f"{path}: {message}") from None
    return cfg


# --------------------------------------------------------------------------------------
# Resuming a run with another config

RESUME_MAY_CHANGE = frozenset(
    {
        "training.max_steps",
        "training.eval_every",
        "training.checkpoint_when_busy",
        "training.keep_last",
        "training.max_unevaluated",
        "training.keep_best",
        "training.publish_step0",
        "training.log_every",
        "training.num_threads",
        "training.gpus",
        "training.micro_batch_size",
        "model.trust_remote_code",
        "training.micro_batch_tokens",
        "training.master_weights",
        "training.compile",
        "training.fsdp_reshard_after_forward",
        "training.fsdp_layers_per_unit",
    }
)
"""Keys that only extend or re-organise a run (how far, how often to save and log, how the same global
batch is split into passes, how it is computed): they may change on resume, and each change is printed.
Every other `model.`, `training.` or `prompt_template` key changes what the past steps meant (data, order,
schedule, model) and may not."""

_RESUME_IGNORED_PREFIXES = ("evaluation.", "wandb.", "run_name", "runs_dir")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def resume_config_changes(saved: dict[str, Any], current: dict[str, Any], where: str) -> list[str]:
    """The allowed changes between the config a checkpoint was trained with and the current one, as
    'key: old -> new' lines; ConfigError listing every disallowed change at once."""
    old, new = _flatten(saved), _flatten(current)
    allowed, refused = [], []
    for key in sorted(set(old) | set(new)):
        if key.startswith(_RESUME_IGNORED_PREFIXES) or old.get(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        may_change = key in RESUME_MAY_CHANGE or key.rsplit(".", 1)[0] in RESUME_MAY_CHANGE  # keep_best.k...
        (allowed if may_change else refused).append(line)
    if refused:
        raise ConfigError(
            f"cannot resume {where} with a changed {', '.join(refused)} (this changes what the trained steps "
            "meant); restore the old value(s), or start a new run with another run_name"
        )
    return allowed
