"""Layout: every path of a run directory, and nothing else decides one (each folder's name is defined here once).

    runs/<run>/
      config.yaml                        resolved config of the trainer's latest start
      .trainer.lock (+ .trainer.json)    held by the one trainer of this run (an OS lock: gone when it dies)
      base_model/                        with no local model folder: the embedded model the trainer built, or a
                                         hub model's config and tokenizer (written in .tmp_base_model/, renamed)
      logs/<service>.log                 the services' warnings and errors
      train_log.jsonl                    the trainer's logged rows (eval/<eval_name>/eval_log.jsonl: the evaluator's)
      checkpoints/
        .tmp_step_00000500/              being written; never read by anyone
        step_00000500/                   model files (safetensors, config, tokenizer) + trainer_state/
          READY                          JSON manifest, written last: the only signal a checkpoint is complete
        corrupt_step_00000500/           a published checkpoint that failed verification, moved aside on resume
      .best.lock                         serialises retention and the pointing of `best` (bounded waits)
      presence/<owner-id>.json           one per evaluator process: its presence (duplicate work only; retention
                                         never reads it)
      best -> checkpoints/step_00000500  with training.keep_best: the best checkpoint by the evaluation's
                                         results (a symlink, replaced atomically)
      eval/<eval_name>/
        ledger.json (+ .lock)            per step: running | done | skipped | pending | failed | deleted
        <set>/step_00000500.samples.jsonl   one line per sample (problem, sample index, response, rewards...)
        <set>/step_00000500.json         that set's metrics
        step_00000500.json               every set's metrics under "sets" (written last, atomically: it
                                         implies the files above exist)
        wandb/  report.png, report.html  W&B's files; the report (evaluator/report.py)
        snapshots/                       the evaluator's snapshots of the checkpoints it evaluates (snapshot.py)
        superseded/<config id>/          results of an earlier evaluation config, moved aside (recording.py)
        average/  average_last_<k>/      averaged checkpoints' window and model; their results (averaging.py)

Invariants:
- Temporary names start with `.tmp_`; only their writer creates them, and readers ignore them.
- A step's folder name is `step_` and eight digits; anything else under checkpoints/ is no step.
- No evaluation set is named like a folder of eval/<eval_name>/ that is no set's (shared.config.RESERVED_NAMES).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

READY = "READY"
TMP_PREFIX = ".tmp_"
CORRUPT_PREFIX = "corrupt_"
TRAINER_STATE_DIR = "trainer_state"
CHECKPOINTS_DIRNAME = "checkpoints"
BASE_MODEL_DIRNAME = "base_model"
LOGS_DIRNAME = "logs"
EVAL_DIRNAME = "eval"

# Folders (and the report's file stem) of an evaluation folder, eval/<eval_name>/, that are no set's.
WANDB_DIRNAME = "wandb"
"""W&B's files, beside the JSONL log of the same rows (the trainer's in the run folder)."""
REPORT_NAME = "report"
SNAPSHOTS_DIRNAME = "snapshots"
SUPERSEDED_DIRNAME = "superseded"
AVERAGE_DIRNAME = "average"
AVERAGE_RESULTS_PREFIX = "average_last_"
"""average_last_<k>/: the results of the average of the last k checkpoints, laid out as an evaluation folder."""
_STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    run_dir: Path

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIRNAME

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / LOGS_DIRNAME

    @property
    def train_log_file(self) -> Path:
        return rows_log_file(self.run_dir, "train")

    @property
    def evals_dir(self) -> Path:
        """eval/: one folder per evaluation name."""
        return self.run_dir / EVAL_DIRNAME

    @property
    def presence_dir(self) -> Path:
        return self.run_dir / "presence"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best"

    @property
    def trainer_lock_path(self) -> Path:
        return self.run_dir / ".trainer.lock"

    @property
    def trainer_info_path(self) -> Path:
        """Who holds the trainer lock (pid, host, start time), for the refusal message."""
        return self.run_dir / ".trainer.json"

    @property
    def best_lock_path(self) -> Path:
        """Held by retention and by whoever points `best` (ranking.update_best), so the two never interleave."""
        return self.run_dir / ".best.lock"

    @property
    def base_model_dir(self) -> Path:
        """The model files the run starts from where it has no local folder of them (the embedded model the
        trainer built, or a hub model's config and tokenizer), so every process loads the same ones."""
        return self.run_dir / BASE_MODEL_DIRNAME

    @property
    def tmp_base_model_dir(self) -> Path:
        """Where base_model is written before it is renamed into place."""
        return self.run_dir / (TMP_PREFIX + BASE_MODEL_DIRNAME)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dirname(step)

    def tmp_checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / (TMP_PREFIX + step_dirname(step))

    def eval_dir(self, name: str) -> Path:
        return self.evals_dir / name

    def result_path(self, eval_name: str, step: int) -> Path:
        return result_file(self.eval_dir(eval_name), step)


# Result files of an evaluation folder (a run's eval/<name>/, or --out's): the layout above.


def result_file(eval_dir: Path, step: int, set_name: str | None = None) -> Path:
    """step_N.json, every set's metrics; with `set_name`, <set>/step_N.json, that set's."""
    return (eval_dir / set_name if set_name else eval_dir) / f"{step_dirname(step)}.json"


def samples_file(eval_dir: Path, set_name: str, step: int) -> Path:
    return eval_dir / set_name / f"{step_dirname(step)}.samples.jsonl"


def rows_log_file(out_dir: Path, job_type: str) -> Path:
    """<job_type>_log.jsonl: the rows a service logged (the trainer's in the run folder, the evaluator's in
    its evaluation folder), the same rows W&B gets."""
    return out_dir / f"{job_type}_log.jsonl"


def result_steps(eval_dir: Path, set_name: str | None = None) -> dict[int, Path]:
    """{step: its result file} of the steps with one (every set's, or `set_name`'s), in step order."""
    folder = eval_dir / set_name if set_name else eval_dir
    found = {parse_step(path.stem): path for path in folder.glob("step_*.json")}
    return {step: found[step] for step in sorted(s for s in found if s is not None)}
