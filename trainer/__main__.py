"""`python -m trainer --config config/default.yaml [key=value ...]`: fine-tune and publish checkpoints."""

from __future__ import annotations

import argparse
import os
import sys

from shared.config import load_config
from shared.launch import physical_gpu_count, pin_gpus, run_main
from shared.protocol import CheckpointInvalid, CheckpointWriteError, RunInUse


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML config (default: config/default.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.learning_rate=1e-5")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    pinned = pin_gpus(cfg.training.gpus, "training.gpus")
    if "WORLD_SIZE" not in os.environ:
        print(f"trainer: run {cfg.run_dir}; {pinned}")
        visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        if len(visible) > 1 and physical_gpu_count() > 0:
            # Several GPUs: one process per GPU under torchrun (FSDP2). On one node; for several nodes
            # run torchrun yourself (see README), which sets WORLD_SIZE and skips this.
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(visible)}", "-m", "trainer", *sys.argv[1:]]
            print(f"trainer: launching {len(visible)} processes: {' '.join(argv[1:])}", flush=True)
            os.execv(sys.executable, argv)

    from trainer.train import train

    train(cfg)
    return 0


if __name__ == "__main__":
    run_main(main, (ValueError, OSError, CheckpointWriteError, CheckpointInvalid, RunInUse))
