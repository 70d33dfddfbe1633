"""`python -m trainer --config config/default.yaml [key=value ...]`: fine-tune and publish checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys

from shared.config import load_config
from shared.launch import physical_gpu_count, pin_gpus, run_main
from shared.logs import setup_logging
from shared.procfs import child_pids
from shared.protocol import RunLayout, TrainerLock


def launch_ranks(argv: list[str]) -> int:
    """Run torchrun in its own session, so that a terminal's Ctrl-C reaches this process only, and pass Ctrl-C or
    SIGTERM on to the ranks themselves: they stop together after a step and exit 0, and so does torchrun (whose
    agent, signalled itself, would tear the ranks down and end in a traceback)."""
    agent = subprocess.Popen(argv, start_new_session=True)

    def forward(signum, frame) -> None:
        for pid in child_pids(agent.pid):  # the rank processes torchrun's agent started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            return agent.wait()
        except KeyboardInterrupt:  # pragma: no cover - the handler above replaces the default one
            continue


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML config (default: config/default.yaml)")
    parser.add_argument("--debug", action="store_true", help="DEBUG lines, and tracebacks of errors")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.learning_rate=1e-5")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    setup_logging("trainer", debug=args.debug, run_dir=cfg.run_dir)
    pinned = pin_gpus(cfg.training.gpus, "training.gpus")
    if "WORLD_SIZE" not in os.environ:
        print(f"trainer: run {cfg.run_dir}; {pinned}")
        visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        if len(visible) > 1 and physical_gpu_count() > 0:
            # Several GPUs: one process per GPU under torchrun (FSDP2). On one node; for several nodes
            # run torchrun yourself (see README), which sets WORLD_SIZE and skips this.
            argv = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={len(visible)}",
                "-m",
                "trainer",
                *sys.argv[1:],
            ]
            print(f"trainer: launching {len(visible)} processes: {' '.join(argv[1:])}", flush=True)
            return launch_ranks(argv)

    from trainer.train import train

    # The run lock is taken here, before anything is written: on a new run, creating the run directory and taking
    # the lock are one step, and a trainer refused here deletes nothing (shared/protocol/runlock.py). Under
    # torchrun only rank 0 holds it; train() takes it again, which only nests.
    first_rank = int(os.environ.get("RANK", "0")) == 0
    with TrainerLock(RunLayout(cfg.run_dir)) if first_rank else contextlib.nullcontext():
        train(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank under torchrun leaves here, its work done and its process group destroyed: skip the interpreter's
        # teardown, where gloo's and the store's C++ threads were seen to abort the process ("terminate called
        # without an active exception", 1 run in ~6 of the two-process tests) after a clean finish.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    run_main(main, "trainer")
