"""Checkpoint writing and verification speed against the disk's raw write speed.

    python -m bench.bench_checkpoint [--dir /tmp/ckpt_bench] [--gb 3.1]

- raw: large sequential writes of the same number of bytes, then fsync (what the disk takes);
- ours: the trainer's writer (safetensors serialised by hand from host buffers, hashed while written, one pass);
- before: `safetensors.torch.save_file`, then SHA-256 of the file read back (the writer before manifest v2);
- verify v2: every 64 MiB chunk hashed in parallel threads; verify v1: one SHA-256 per file (threads per file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from bench.common import report


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from shared.protocol import build_manifest, file_sha256, verify_checkpoint
    from trainer.checkpoint import _write_safetensors

    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/ckpt_bench")
    parser.add_argument("--gb", type=float, default=3.1, help="size of the weights (Qwen2.5-Math-1.5B in bf16: 3.1)")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    numel = int(args.gb * 2**30 / 2 / 8)
    weights = {f"layer{i}.weight": torch.randn(numel, dtype=torch.float32).to(torch.bfloat16) for i in range(8)}
    total = sum(t.numel() * t.element_size() for t in weights.values())

    block = os.urandom(64 << 20)

    def raw() -> None:
        with open(root / "raw.bin", "wb") as f:
            for _ in range(total // len(block)):
                f.write(block)
            os.fsync(f.fileno())

    raw_s = _timed(raw)
    (root / "raw.bin").unlink()

    ours_dir = root / "ours"
    ours_dir.mkdir()

    def ours() -> None:
        hashed = _write_safetensors(weights, ours_dir)
        with open(ours_dir / "model.safetensors", "rb") as f:
            os.fsync(f.fileno())
        (ours_dir / "READY").write_text(json.dumps(build_manifest(ours_dir, 1, "bench", hashed)))

    ours_s = _timed(ours)
    before_dir = root / "before"
    before_dir.mkdir()

    def before() -> None:
        save_file(weights, before_dir / "model.safetensors", metadata={"format": "pt"})
        with open(before_dir / "model.safetensors", "rb") as f:
            os.fsync(f.fileno())
        file_sha256(before_dir / "model.safetensors")

    before_s = _timed(before)
    raw_s = min(raw_s, _timed(raw))  # the disk's best of two: its speed varies with what it was doing before
    (root / "raw.bin").unlink()
    verify_v2_s = _timed(lambda: verify_checkpoint(ours_dir))
    verify_v1_s = _timed(lambda: file_sha256(before_dir / "model.safetensors"))
    gb = total / 1e9
    report(
        "checkpoint_write",
        bytes=total,
        raw_gb_s=round(gb / raw_s, 2),
        ours_gb_s=round(gb / ours_s, 2),
        ours_fraction_of_raw=round(raw_s / ours_s, 2),
        before_gb_s=round(gb / before_s, 2),
        cpus=os.cpu_count(),
        command="python -m bench.bench_checkpoint",
    )
    report(
        "checkpoint_verify",
        bytes=total,
        v2_chunks_parallel_s=round(verify_v2_s, 3),
        v2_gb_s=round(gb / verify_v2_s, 2),
        v1_one_hash_s=round(verify_v1_s, 3),
        v1_gb_s=round(gb / verify_v1_s, 2),
        cpus=os.cpu_count(),
        note="file pages are in the page cache: memory speed, as the evaluator reads a just-written checkpoint",
        command="python -m bench.bench_checkpoint",
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
