"""`python -m trainer --config config/default.yaml [key=value ...]`: fine-tune and publish checkpoints."""

from __future__ import annotations

import argparse

from shared.config import ConfigError, load_config
from shared.data import DataError
from shared.launch import pin_gpus, run_main


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML config (default: config/default.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.learning_rate=1e-5")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    print(f"trainer: run {cfg.run_dir}; {pin_gpus(cfg.training.gpus, 'training.gpus')}")

    from trainer.checkpoint import CheckpointWriteError
    from trainer.train import train

    try:
        train(cfg)
    except CheckpointWriteError as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    run_main(main, (ConfigError, DataError, OSError))
