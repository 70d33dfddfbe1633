"""Shared by the benchmarks: the Qwen2.5-Math-1.5B shape with random weights, synthetic data, results."""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The shape of Qwen2.5-Math-1.5B (as in the team's baseline script): speed does not depend on weight values.
QWEN15_CONFIG = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "pad_token_id": 151644,
}


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def report(name: str, **figures) -> dict:
    """Print the one-line result and append it to results.jsonl."""
    row = {"bench": name, "device": device_name(), "date": time.strftime("%Y-%m-%d"), **figures}
    print(json.dumps(row), flush=True)
    with open(out_dir() / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def full_vocab_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with `vocab_size` entries, so every id a random model samples decodes.
    Digits are one token each, so synthetic data has exact token counts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trainer.embedded import EOS, PAD, QWEN2_SPLIT_PATTERN

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for n in (2, 3):
        for combo in itertools.product(alphabet, repeat=n):
            if len(vocab) >= vocab_size - 2:
                break
            vocab.setdefault("".join(combo), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def make_qwen15_dir(path: Path) -> Path:
    """Random-weight Qwen2.5-Math-1.5B-shaped model + full-vocab tokenizer, saved as a HF folder."""
    if (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = full_vocab_tokenizer(QWEN15_CONFIG["vocab_size"])
    cfg = dict(
        QWEN15_CONFIG, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def digits_sft_jsonl(path: Path, num: int, prompt_tokens: int, response_tokens: int, seed: int = 0) -> Path:
    """SFT records whose prompt and response are exactly that many tokens (one digit = one token)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num):
            prompt = "".join(rng.choice("0123456789") for _ in range(prompt_tokens))
            response = "".join(rng.choice("0123456789") for _ in range(response_tokens))
            f.write(json.dumps({"prompt": prompt, "response": response, "ground_truth": "1"}) + "\n")
    return path


def write_config(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def run(
    cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, timeout=timeout
        )
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); log: {log}")
    return proc


KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attn", "varlen")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "splitk")),
    ("compiled (triton)", ("triton",)),
)
"""Kernel name fragments (lower case) of each kind; the first match wins, the rest is 'other elementwise/copies'."""
SPANS = ("lm_head", "lm_head_backward", "optimizer_step")
"""record_function spans of the trainer whose GPU time is counted apart (trainer/logprobs.py, trainer/train.py)."""


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other elementwise/copies"


def profile_breakdown(trace_path: Path) -> dict:
    """GPU time per profiled step by kind (ms), from a torch profiler chrome trace: the trainer's spans (LM head,
    its backward, the optimizer step) first, then the kernels outside them by name; 'host gaps' is the wall time
    of the profiled steps in which no kernel ran."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    steps = [  # the host's spans only (each step has a GPU-side span of the same name too)
        e
        for e in events
        if e.get("name", "").startswith("ProfilerStep#")
        and e.get("ph") == "X"
        and e.get("cat") != "gpu_user_annotation"
    ]
    kernels = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"),
        key=lambda e: e["ts"],
    )
    spans = [e for e in events if e.get("cat") == "gpu_user_annotation" and e.get("name") in SPANS]
    start, end = min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)
    totals: dict[str, float] = {}
    busy, covered_to = 0.0, start
    for k in kernels:
        if k["ts"] < start or k["ts"] > end:
            continue
        mid = k["ts"] + k["dur"] / 2
        span = next((s["name"] for s in spans if s["ts"] <= mid <= s["ts"] + s["dur"]), None)
        kind = span or kernel_kind(k["name"])
        totals[kind] = totals.get(kind, 0.0) + k["dur"]
        busy += max(0.0, k["ts"] + k["dur"] - max(k["ts"], covered_to))
        covered_to = max(covered_to, k["ts"] + k["dur"])
    num_steps = len(steps)
    out = {kind: round(us / 1000 / num_steps, 2) for kind, us in sorted(totals.items(), key=lambda kv: -kv[1])}
    out["gpu busy"] = round(busy / 1000 / num_steps, 2)
    out["host gaps (GPU idle)"] = round((end - start - busy) / 1000 / num_steps, 2)
    out["step wall"] = round((end - start) / 1000 / num_steps, 2)
    return out
