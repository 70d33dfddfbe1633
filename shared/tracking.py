"""Weights & Biases logging shared by both services, plus a local JSONL copy of every logged row.

Mode `auto` logs online only when credentials exist (WANDB_API_KEY or a netrc entry); otherwise
offline into <run>/wandb, to be uploaded later with `wandb sync`. The API key is never written
anywhere by us: the resolved config holds no secret, and W&B reads the key from the environment.
"""

from __future__ import annotations

import json
import netrc
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shared.config import Config
from shared.errors import UserError
from shared.protocol.layout import WANDB_DIRNAME, rows_log_file

WANDB_FLUSH_INTERVAL_S = 0.25
"""How often W&B's service writes logged rows to its file (its default, 15 s, loses that much on a kill)."""


class TrackingError(UserError, ValueError):
    """W&B cannot start with this config (no network, a bad key or entity...): the message says how to go on."""


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    return mode


class Tracker:
    """One W&B run (or none) and a JSONL log. `x_axis` names the step metric other metrics plot against."""

    def __init__(self, cfg: Config, job_type: str, x_axis: str, out_dir: Path):
        """Logs go to `out_dir`/<job_type>_log.jsonl and, W&B's files, to `out_dir`/wandb."""
        self.x_axis = x_axis
        created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = rows_log_file(out_dir, job_type)
        self.wandb_dir = out_dir / WANDB_DIRNAME
        self.mode = resolve_mode(cfg.wandb.mode)
        self.run = None
        if self.mode != "disabled":
            import wandb

            try:
                self.run = self._init(wandb, cfg, job_type, out_dir, x_axis, self.mode)
            except Exception as exc:  # noqa: BLE001 - W&B raises many types; all mean "cannot log there"
                if created:  # leave no half-made folder behind
                    shutil.rmtree(created[-1], ignore_errors=True)
                raise TrackingError(
                    f"W&B ({self.mode}) could not start: {exc}; set wandb.mode=offline or disabled"
                ) from None

    @staticmethod
    def _init(wandb, cfg: Config, job_type: str, out_dir: Path, x_axis: str, mode: str):
        # One W&B run per process, in the run's group: two evaluators of one evaluation may run at once, and W&B
        # takes one writer per run. Exactly-once across processes comes from the ledger and `logged_rows`.
        run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=cfg.wandb.group or cfg.run_name,
            job_type=job_type,
            name=f"{cfg.run_name}-{job_type}",
            dir=str(out_dir),  # W&B writes into out_dir/wandb
            mode=mode,
            config=cfg.to_dict(),
            settings=wandb.Settings(
                silent=True, console="off", x_transaction_log_flush_interval=WANDB_FLUSH_INTERVAL_S
            ),
        )
        run.define_metric(x_axis)
        run.define_metric("*", step_metric=x_axis)
        return run

    def wait_durable(self) -> None:
        """Give W&B's service the time to write what was logged to its own file (it writes every
        WANDB_FLUSH_INTERVAL_S and drops what it has not written if this process is killed). A wait, not a proof:
        after a crash, `logged_rows` is what tells whether a row made it."""
        if self.run is not None:
            time.sleep(WANDB_FLUSH_INTERVAL_S * 2)

    def logged_rows(self) -> list[dict[str, Any]] | None:
        """The history rows W&B has written to its own files under this tracker's folder (every restart's run
        directory), or None when they cannot be read (W&B off, or a file format this reader does not know)."""
        if self.run is None:
            return None
        try:
            return read_wandb_rows(self.wandb_dir)
        except Exception:  # noqa: BLE001 - an unknown format: the caller falls back to logging again
            return None

    def log(self, metrics: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        if self.run is not None:
            self.run.log(metrics)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], x_value: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows), self.x_axis: x_value})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_wandb_rows(wandb_dir: Path) -> list[dict[str, Any]]:
    """History rows of every W&B run under `wandb_dir` (each restart's run directory), file by file."""
    return [row for path in sorted(Path(wandb_dir).rglob("*.wandb")) for row in read_wandb_history(path)]


def read_wandb_history(path: Path) -> list[dict[str, Any]]:
    """History rows of one W&B transaction log (`run-<id>.wandb`): LevelDB-style 32 KiB blocks of records,
    each a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf Record. A file
    cut short by a kill yields the rows before the cut."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows = path.read_bytes(), 7, b"", []  # 7: the file's own header
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (2, 3):
            buf = chunk if kind == 2 else buf + chunk
            continue
        if kind not in (1, 4):
            break
        record = pb.Record()
        record.ParseFromString(buf + chunk if kind == 4 else chunk)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows
