"""`python -m evaluator`: evaluate a run's checkpoints as they are published.

python -m evaluator [--config C] [key=value ...]          watch the config's run (Ctrl-C to stop)
python -m evaluator --run runs/x [--once]                 a given run; --once: what is there, then exit
python -m evaluator --ckpt runs/x/checkpoints/step_N      one checkpoint (or any model folder), then exit
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from shared.config import load_config
from shared.launch import UsageError, pin_gpus, run_main
from shared.logs import setup_logging
from shared.protocol import RunLayout

log = logging.getLogger(__name__)


def _config_path(args) -> Path | None:
    """The given config, else the one the trainer saved in the run being evaluated, else the default."""
    if args.config:
        return Path(args.config)
    run_dir = Path(args.run) if args.run else (Path(args.ckpt).parent.parent if args.ckpt else None)
    if run_dir is not None and RunLayout(run_dir).config_path.is_file():
        return RunLayout(run_dir).config_path
    return None


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m evaluator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=None, help="YAML config (default: the run's saved config, else config/default.yaml)"
    )
    parser.add_argument(
        "--run", default=None, help="run directory to evaluate (default: the config's runs_dir/run_name)"
    )
    parser.add_argument("--ckpt", default=None, help="evaluate this one checkpoint or model folder and exit")
    parser.add_argument(
        "--out",
        default=None,
        help="with --ckpt: where to write results (default: the run's eval folder, or beside the folder)",
    )
    parser.add_argument(
        "--once", action="store_true", help="evaluate every checkpoint not yet evaluated, oldest first, then exit"
    )
    parser.add_argument("--force", action="store_true", help="evaluate again checkpoints that already have results")
    parser.add_argument("--debug", action="store_true", help="DEBUG lines, and tracebacks of errors")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluation.num_samples=500")
    args = parser.parse_args()
    if args.ckpt and Path(args.ckpt).is_symlink():  # runs/x/best: the checkpoint it names, inside its run
        args.ckpt = str(Path(args.ckpt).parent / os.readlink(args.ckpt))
    if args.ckpt and args.run:
        raise UsageError("give --ckpt or --run, not both")
    return args


def main() -> int:
    args = _parse_args()
    cfg = load_config(_config_path(args), args.overrides)
    if args.ckpt and not Path(args.ckpt).is_dir():
        raise UsageError(f"--ckpt {args.ckpt}: no such directory")
    run_dir = Path(args.run) if args.run else cfg.run_dir
    setup_logging("evaluator", debug=args.debug, run_dir=Path(args.ckpt).parent.parent if args.ckpt else run_dir)
    what = f"checkpoint {args.ckpt}" if args.ckpt else f"run {run_dir}"
    log.info("evaluator: %s; %s", what, pin_gpus(cfg.evaluation.gpus, "evaluation.gpus"))

    from evaluator.backends import make_backend
    from evaluator.evaluation import Evaluator
    from evaluator.folder import evaluate_folder, results_dir_for
    from evaluator.serving import check_run_dir, serve_run
    from evaluator.stopping import Stop, install_stop_handlers
    from shared.tracking import Tracker

    install_stop_handlers()
    if args.ckpt:
        out_dir = results_dir_for(cfg, Path(args.ckpt), args.out)
    else:  # watching may start before the trainer made the run; evaluating what is there may not
        layout = check_run_dir(run_dir) if args.once else RunLayout(run_dir)
        out_dir = layout.eval_dir(cfg.evaluation.name)
    out_dir_is_new = not out_dir.exists()
    tracker = evaluator = None
    try:
        backend = make_backend(cfg.evaluation, cfg.model.trust_remote_code)
        tracker = Tracker(cfg, "eval", "train_step", out_dir)
        evaluator = Evaluator(cfg, backend, tracker)
        if args.ckpt:
            try:
                evaluate_folder(cfg, Path(args.ckpt), evaluator, out_dir, args.force)
            except BaseException:  # a failure or a stop (Ctrl-C): nothing half-made stays
                # Nothing of a failed evaluation stays in a results folder it created, unless that folder is a run's
                # own evaluation folder, which a watcher starting meanwhile may share.
                if out_dir_is_new and out_dir != RunLayout(Path(args.ckpt).parent.parent).eval_dir(cfg.evaluation.name):
                    tracker.finish()
                    shutil.rmtree(out_dir, ignore_errors=True)
                raise
            return 0
        return serve_run(cfg, layout, evaluator, once=args.once, force=args.force)
    except Stop:
        log.info("evaluator: stopped")
        return 0
    finally:
        if evaluator is not None:
            evaluator.close()
        if tracker is not None:
            tracker.finish()


if __name__ == "__main__":
    run_main(main, "evaluator")
