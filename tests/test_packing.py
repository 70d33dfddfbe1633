"""Padding-free packing, the chunked LM head and fp32 master weights, against the reference computations."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_service
from shared.config import load_config
from shared.data import load_dataset, load_prompt_template, render_prompt
from trainer.logprobs import linear_log_probs, response_log_probs
from trainer.master import MasterWeights
from trainer.packing import (
    group_by_budget,
    packed_forward_kwargs,
    packed_microbatch,
    tokenize_examples,
    use_packed_attention,
)
from trainer.sft import get_response_log_probs, sft_microbatch_train_step, tokenize_prompt_and_output


def test_groups_keep_order_never_split_and_respect_the_budget():
    lengths = [5, 3, 4, 9, 2, 2, 1, 12, 3]
    groups = group_by_budget(lengths, 10)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # every example once, in order
    # filled in turn: [0, 1] [2] [3] [4, 5, 6] [7] [8]; the same 6 rows evened out: the longest is 7, not 8
    assert groups == [[0], [1, 2], [3], [4, 5, 6], [7], [8]]  # 12 > 10 goes alone, never split
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups if len(g) > 1)


def test_rows_are_as_many_as_filling_makes_and_even_with_no_short_remainder():
    # filling in turn makes a full row and a remainder of 1: [9] [1]; the same two rows, even: [6] [4]
    assert group_by_budget([3, 3, 3, 1], 9) == [[0, 1], [2, 3]]
    # a step of 32 examples of real SFT lengths (370 tokens each, one of 1,000) into 8,192-token rows
    lengths = [370] * 20 + [1000] + [370] * 11
    groups = group_by_budget(lengths, 8192)
    rows = [sum(lengths[i] for i in g) for g in groups]
    assert len(groups) == 2 and max(rows) <= 8192 and min(rows) >= sum(lengths) / 2 - 1000
    assert [i for g in groups for i in g] == list(range(32)) and group_by_budget([], 8192) == []


def test_packed_row_keeps_each_examples_own_pairs():
    row = packed_microbatch([([1, 2, 3, 4], 2), ([5, 6, 7], 1)])
    assert row["input_ids"].tolist() == [[1, 2, 3, 5, 6]] and row["labels"].tolist() == [[2, 3, 4, 6, 7]]
    assert row["response_mask"].tolist() == [[False, True, True, True, True]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert (
        row["cu_seq_lens"].tolist() == [0, 3, 5] and row["cu_seq_lens"].dtype == torch.int32 and row["max_seq_len"] == 3
    )


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiling: ~30 s cold
def test_chunked_log_probs_gradients_and_entropy_match_full_logits(compiled):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    labels = torch.randint(0, 101, (37,))
    upstream = torch.randn(37)
    log_probs, entropy = linear_log_probs(hidden, weight, labels, with_entropy=True, chunk_rows=8, compiled=compiled)
    (log_probs * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden.double() @ weight.double().T
    reference = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    (reference * upstream.double()).sum().backward()
    assert torch.allclose(log_probs.double(), reference, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5) and torch.allclose(grads[1], weight.grad, atol=1e-5)
    probs = torch.softmax(logits, -1)
    assert torch.allclose(entropy.double(), -(probs * probs.log()).sum(-1), atol=1e-5)


def test_the_compiled_head_compiles_one_graph_a_direction_whatever_the_row_count():
    """Row counts whose last chunk differs, forward and backward: one graph for the log-probs, one for the
    gradient, from the first call on (a recompilation costs seconds on a GPU, mid-run; BENCHMARKS.md, issue 23)."""
    from torch._dynamo.utils import counters

    import trainer.logprobs

    torch._dynamo.reset()
    trainer.logprobs._compiled.clear()
    counters.clear()
    torch.manual_seed(0)
    for num_rows in (37, 29, 45, 21):
        hidden = torch.randn(num_rows, 16, requires_grad=True)
        weight = torch.randn(101, 16, requires_grad=True)
        log_probs, _ = linear_log_probs(hidden, weight, torch.randint(0, 101, (num_rows,)), chunk_rows=8, compiled=True)
        log_probs.sum().backward()
    assert counters["stats"]["unique_graphs"] == 2 and counters["frames"]["total"] == 2, dict(counters["frames"])


def test_the_fusable_gradient_of_the_compiled_head_is_the_eager_one():
    """The expression torch.compile fuses on CUDA (trainer.logprobs._chunk_grad_fusable), run eagerly: the same
    gradient of the logits as the eager head's, in the logits' dtype, on a chunk whose labels repeat."""
    from trainer.logprobs import _chunk_grad, _chunk_grad_fusable

    torch.manual_seed(1)
    logits = torch.randn(9, 50)
    labels = torch.tensor([3, 3, 0, 49, 7, 7, 7, 1, 2])
    log_z, grad = torch.logsumexp(logits, -1), torch.randn(9)
    reference = (torch.nn.functional.one_hot(labels, 50) - torch.softmax(logits.double(), -1)) * grad[:, None].double()
    fused = _chunk_grad_fusable(logits, labels, log_z, grad)
    assert fused.dtype == logits.dtype
    assert torch.allclose(fused.double(), reference, atol=1e-6)
    assert torch.allclose(_chunk_grad(logits, labels, log_z, grad).double(), reference, atol=1e-6)
    bf16 = _chunk_grad_fusable(logits.bfloat16(), labels, log_z, grad)
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.double(), reference, atol=2e-2)


@pytest.fixture(scope="module")
def tiny(trained_run):
    cfg = load_config(trained_run / "config.yaml")
    data = load_dataset(cfg.training.data)[:6]
    template = load_prompt_template(cfg.prompt_template_path())
    prompts, responses = [render_prompt(template, ex) for ex in data], [ex.response for ex in data]
    return trained_run / "checkpoints" / "step_00000002", prompts, responses


def _model(path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def test_packed_and_padded_give_the_same_log_probs_loss_and_gradients(tiny):
    """fp32 on the CPU: the sdpa fallback with the packed mask, and the chunked head, against the padded
    reference (full logits): per-example log-probs within 1e-5, the same loss, the same gradients."""
    path, prompts, responses = tiny
    tokenizer = AutoTokenizer.from_pretrained(path)
    padded_model, packed_model = _model(path), _model(path)

    padded = tokenize_prompt_and_output(prompts, responses, tokenizer, max_len=128)
    ref = get_response_log_probs(padded_model, padded["input_ids"], padded["labels"])["log_probs"]
    total = int(padded["response_mask"].sum())
    ref_loss, _ = sft_microbatch_train_step(ref, padded["response_mask"], 1, total / len(prompts))

    examples = tokenize_examples(prompts, responses, tokenizer, 128)
    rows = [
        packed_microbatch([examples[i] for i in g]) for g in group_by_budget([len(e) - 1 for e, _ in examples], 200)
    ]
    assert len(rows) > 1 and any(len(r["cu_seq_lens"]) > 2 for r in rows)  # several rows, several examples in a row
    varlen = use_packed_attention(packed_model, torch.device("cpu"))
    packed_loss, i = 0.0, 0
    for row in rows:
        out = response_log_probs(
            packed_model,
            row["input_ids"],
            row["labels"],
            row["response_mask"],
            **packed_forward_kwargs(row, torch.device("cpu"), varlen),
        )
        for a, b in zip(row["cu_seq_lens"][:-1].tolist(), row["cu_seq_lens"][1:].tolist(), strict=False):
            n = b - a
            mask = padded["response_mask"][i, :n]
            assert torch.equal(row["response_mask"][0, a:b], mask)
            assert torch.allclose(out["log_probs"][0, a:b][mask], ref[i, :n][mask], atol=1e-5)
            i += 1
        loss, _ = sft_microbatch_train_step(out["log_probs"], row["response_mask"], 1, total)
        packed_loss += loss.item()
    assert packed_loss == pytest.approx(ref_loss.item(), abs=1e-6)
    for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters(), strict=False):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name


def test_training_packed_gives_the_losses_of_padded(trained_run, tmp_path, make_config):
    run_service("trainer", "--config", make_config({"training": {"micro_batch_tokens": 256}}))
    packed = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "train_log.jsonl").read_text().splitlines()]
    padded = {r["train_step"]: r for r in map(json.loads, (trained_run / "train_log.jsonl").read_text().splitlines())}
    assert [r["train_step"] for r in packed] == sorted(padded)
    for row in packed:
        assert row["train/loss"] == pytest.approx(padded[row["train_step"]]["train/loss"], abs=1e-5)
        assert row["train/grad_norm"] == pytest.approx(padded[row["train_step"]]["train/grad_norm"], rel=1e-4)


def test_master_weights_keep_updates_that_bf16_rounds_away():
    layer = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(layer.weight)
    plain = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(plain.weight)
    master = MasterWeights(layer)
    opts = [
        torch.optim.AdamW(master.params, lr=1e-3, weight_decay=0.0),
        torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.0),
    ]
    x = torch.ones(2, 4, dtype=torch.bfloat16)
    for _ in range(3):  # each step moves a weight by ~1e-3, under half of bf16's step at 1.0 (2^-8)
        for model, opt in ((layer, opts[0]), (plain, opts[1])):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        master.sync()
    assert torch.all(plain.weight == 1.0)  # plain bf16 AdamW: every update rounded away
    assert torch.allclose(master.params[0], torch.full((4, 4), 1 - 3e-3), atol=1e-5)  # the masters moved
    assert torch.all(layer.weight < 1.0)  # and the model follows its masters once the change shows in bf16
    assert layer.weight.grad is None and master.params[0].grad is None


def test_bf16_with_master_weights_resumes_exactly(tmp_path, make_config):
    """CPU bf16: 2 steps + resume + 4 == 6 steps, bit for bit, master weights included."""
    updates = {"training": {"dtype": "bfloat16", "micro_batch_tokens": 256}}
    run_service("trainer", "--config", make_config({**updates, "run_name": "straight"}, name="a.yaml"))
    run_service(
        "trainer",
        "--config",
        make_config(
            {**updates, "run_name": "resumed", "training": {**updates["training"], "max_steps": 2}}, name="b.yaml"
        ),
    )
    out = run_service("trainer", "--config", make_config({**updates, "run_name": "resumed"}, name="c.yaml")).stdout
    assert "fp32 master weights" in out and "resumed from" in out
    runs = tmp_path / "runs"

    def state(run):
        return torch.load(
            runs / run / "checkpoints" / "step_00000006" / "trainer_state" / "state.pt", weights_only=True
        )

    a, b = state("straight"), state("resumed")
    assert a["master_weights"][0].dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a["master_weights"], b["master_weights"], strict=False))
    for name in ("straight", "resumed"):
        assert (runs / name / "checkpoints" / "step_00000006" / "model.safetensors").exists()
    assert (runs / "straight" / "checkpoints" / "step_00000006" / "model.safetensors").read_bytes() == (
        runs / "resumed" / "checkpoints" / "step_00000006" / "model.safetensors"
    ).read_bytes()
