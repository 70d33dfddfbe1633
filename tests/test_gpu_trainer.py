"""The trainer's CUDA paths on a real GPU (opt-in: `pytest -m gpu`): torch's varlen flash attention over packed
rows, the chunked LM head in bf16, torch.compile and fp32 master weights, against the padded reference."""

import json

import pytest

from conftest import TINY, run_service

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    return torch


def test_varlen_packed_log_probs_match_padded_in_bf16(cuda, trained_run):
    torch = cuda
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.config import load_config
    from shared.data import load_dataset, load_prompt_template, render_prompt
    from trainer.logprobs import response_log_probs
    from trainer.packing import (
        group_by_budget,
        packed_forward_kwargs,
        packed_microbatch,
        tokenize_examples,
        use_packed_attention,
    )
    from trainer.sft import get_response_log_probs, tokenize_prompt_and_output

    cfg = load_config(trained_run / "config.yaml")
    data = load_dataset(cfg.training.data)[:16]
    template = load_prompt_template(cfg.prompt_template_path())
    prompts, responses = [render_prompt(template, ex) for ex in data], [ex.response for ex in data]
    path = trained_run / "checkpoints" / "step_00000006"
    device = torch.device("cuda")
    tokenizer = AutoTokenizer.from_pretrained(path)
    padded_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    packed_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    packed_model.config.use_cache = padded_model.config.use_cache = False
    assert use_packed_attention(packed_model, device)  # the varlen kernel is there

    padded = tokenize_prompt_and_output(prompts, responses, tokenizer, max_len=128)
    with torch.no_grad():
        ref = get_response_log_probs(padded_model, padded["input_ids"].to(device), padded["labels"].to(device))[
            "log_probs"
        ].cpu()
    examples = tokenize_examples(prompts, responses, tokenizer, 128)
    rows = [
        packed_microbatch([examples[i] for i in g]) for g in group_by_budget([len(e) - 1 for e, _ in examples], 400)
    ]
    assert any(len(r["cu_seq_lens"]) > 2 for r in rows)
    i, worst = 0, 0.0
    for row in rows:
        with torch.no_grad():
            out = response_log_probs(
                packed_model,
                row["input_ids"].to(device),
                row["labels"].to(device),
                row["response_mask"].to(device),
                **packed_forward_kwargs(row, device, True),
            )
        lp = out["log_probs"].cpu()
        for a, b in zip(row["cu_seq_lens"][:-1].tolist(), row["cu_seq_lens"][1:].tolist(), strict=False):
            mask = padded["response_mask"][i, : b - a]
            worst = max(worst, float((lp[0, a:b][mask] - ref[i, : b - a][mask]).abs().max()))
            i += 1
    print(f"largest |packed - padded| log-prob difference in bf16: {worst:.4f}")
    assert worst < 0.1  # bf16 rounding; attention crossing examples gives differences of whole nats


def test_cuda_defaults_train_like_the_padded_reference(cuda, tmp_path, make_config):
    """Packing + varlen + compile + master weights against padded eager bf16 without masters: the same losses
    to bf16 accuracy over a few steps (a wrong mask or a broken master update would diverge at once)."""
    common = {
        "training": {
            **TINY["training"],
            "max_steps": 8,
            "dtype": "bfloat16",
            "learning_rate": 1e-3,
            "num_threads": None,
        }
    }
    fast = make_config(
        {**common, "run_name": "fast", "training": {**common["training"], "micro_batch_tokens": 512}}, name="fast.yaml"
    )
    plain = make_config(
        {**common, "run_name": "plain", "training": {**common["training"], "compile": False, "master_weights": False}},
        name="plain.yaml",
    )
    env = {"CUDA_VISIBLE_DEVICES": "0"}
    out = run_service("trainer", "--config", fast, env_extra=env).stdout
    assert "fp32 master weights" in out and "varlen flash attention" in out
    run_service("trainer", "--config", plain, env_extra=env)
    losses = {
        name: {
            r["train_step"]: r["train/loss"]
            for r in map(json.loads, (tmp_path / "runs" / name / "train_log.jsonl").read_text().splitlines())
        }
        for name in ("fast", "plain")
    }
    for step in (1, 2, 3):
        assert losses["fast"][step] == pytest.approx(losses["plain"][step], rel=0.02), (step, losses)
