"""One log format for both services: `HH:MM:SS service LEVEL message`, one line per event.

`setup_logging` configures the root logger once per process (calling it again replaces what it installed):
- INFO and DEBUG lines go to stdout, WARNING and above to stderr, so that a service's normal output and its
  problems can be told apart, and a one-line error stays alone on stderr;
- the project's own loggers (`trainer`, `evaluator`, `shared`, `demo`, `bench`, `__main__`) log from INFO, or from DEBUG
  with `debug=True`; other libraries' loggers from WARNING (their DEBUG would drown ours);
- with a run directory, WARNING and above are also appended to `<run>/logs/<service>.log` (with the date), but only
  once the directory is a run (it has config.yaml or checkpoints/): a mistyped path is not made into a folder;
- values of secret-looking environment variables (W&B's API key...) are masked in every line, terminal or file.
Under torchrun each rank names itself (`trainer:1`); their lines go to the same file (appends of one line).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from shared.protocol.layout import RunLayout

PROJECT_LOGGERS = ("trainer", "evaluator", "shared", "demo", "bench", "__main__")
_SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_MIN_SECRET_CHARS = 8  # shorter values ("1", "true") would mask ordinary words
_MASK = "***"
_FORMAT = "%(asctime)s {name} %(levelname)s %(message)s"


def _secrets() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)  # a longer secret containing a shorter one is masked whole


class _MaskingFormatter(logging.Formatter):
    """The format, with every secret value masked (also inside tracebacks)."""

    def __init__(self, fmt: str, datefmt: str) -> None:
        super().__init__(fmt, datefmt)
        self._secrets = _secrets()

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for secret in self._secrets:
            line = line.replace(secret, _MASK)
        return line


class _RunFileHandler(logging.Handler):
    """Appends to `<run>/logs/<service>.log`, opened at the first record once `run_dir` is a run folder."""

    def __init__(self, run_dir: Path, service: str) -> None:
        super().__init__(logging.WARNING)
        self.layout = RunLayout(Path(run_dir))
        self.path = self.layout.logs_dir / f"{service}.log"  # one file for every rank of a service

    def emit(self, record: logging.LogRecord) -> None:
        if not (self.layout.config_path.is_file() or self.layout.checkpoints_dir.is_dir()):
            return  # not (yet) a run: the terminal has the line
        try:
            line = self.format(record)
            self.path.parent.mkdir(exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except Exception:  # noqa: BLE001 - logging must never end the service: report the failure as logging does
            self.handleError(record)


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def service_name(service: str) -> str:
    """`service`, or `service:<rank>` in a process of a several-process (torchrun) job."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"{service}:{os.environ.get('RANK', '0')}" if world_size > 1 else service


class _ConsoleHandler(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as they are at each record (a test's capture, a redirection)."""

    def __init__(self, stream_name: str) -> None:
        super().__init__()
        self.stream_name = stream_name

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


def _console_handler(stream_name: str, formatter: logging.Formatter, below: int | None) -> logging.Handler:
    handler = _ConsoleHandler(stream_name)
    handler.setFormatter(formatter)
    if below is None:
        handler.setLevel(logging.WARNING)
    else:
        handler.addFilter(_Below(below))
    return handler


def setup_logging(service: str, *, debug: bool = False, run_dir: Path | None = None) -> None:
    """Configure this process's logging for `service` ("trainer", "evaluator"); see the module's docstring."""
    name = service_name(service).replace("%", "%%")
    terminal = _MaskingFormatter(_FORMAT.format(name=name), "%H:%M:%S")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_math_sft", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers = [_console_handler("stdout", terminal, below=logging.WARNING), _console_handler("stderr", terminal, None)]
    if run_dir is not None:  # the same line with the date: a file outlives the day
        file_handler = _RunFileHandler(run_dir, service)
        file_handler.setFormatter(_MaskingFormatter(_FORMAT.format(name=name), "%Y-%m-%d %H:%M:%S"))
        handlers.append(file_handler)
    for handler in handlers:
        handler._math_sft = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for logger_name in PROJECT_LOGGERS:
        logging.getLogger(logger_name).setLevel(logging.DEBUG if debug else logging.INFO)
    logging.captureWarnings(True)  # warnings.warn(...) lines in the same format (logger "py.warnings")


def debug_requested(argv: list[str] | None = None) -> bool:
    """`--debug` on the command line or MATH_SFT_DEBUG=1 in the environment."""
    return "--debug" in (sys.argv if argv is None else argv) or os.environ.get("MATH_SFT_DEBUG") == "1"
