"""The SFT building blocks against hand-computed references."""

import math

import pytest
import torch

from trainer.sft import (
    compute_entropy,
    get_response_log_probs,
    masked_normalize,
    sft_microbatch_train_step,
    tokenize_prompt_and_output,
)


class CharTokenizer:
    """One token per character: 'a' -> 1, 'b' -> 2, ...; pad 0."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) - 96 for c in t] for t in texts]}


def test_tokenize_prompt_and_output():
    out = tokenize_prompt_and_output(["ab", "c"], ["cd", "d"], CharTokenizer())
    # full sequences: [1,2,3,4] and [3,4,0,0] (right-padded)
    assert out["input_ids"].tolist() == [[1, 2, 3], [3, 4, 0]]
    assert out["labels"].tolist() == [[2, 3, 4], [4, 0, 0]]
    assert out["response_mask"].tolist() == [[False, True, True], [True, False, False]]


def test_tokenize_truncates_from_the_right():
    out = tokenize_prompt_and_output(["abc"], ["defg"], CharTokenizer(), max_len=5)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert out["labels"].tolist() == [[2, 3, 4, 5]]
    assert out["response_mask"].tolist() == [[False, False, True, True]]


def test_compute_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e4, -1e4]])
    h = compute_entropy(logits)
    p = torch.tensor([0.75, 0.25])
    assert h[0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)  # stable for huge logits
    assert h[2].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.logits.expand(input_ids.shape[0], -1, -1)})()


def test_get_response_log_probs():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    model = FixedLogits(logits)
    out = get_response_log_probs(
        model, torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 2]]), return_token_entropy=True
    )
    assert out["log_probs"].tolist()[0] == pytest.approx([math.log(0.5), math.log(0.8)], abs=1e-6)
    assert out["token_entropy"][0, 0].item() == pytest.approx(
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), abs=1e-6
    )
    assert "token_entropy" not in get_response_log_probs(
        model, torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 2]])
    )


def test_masked_normalize():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, True, True]])
    assert masked_normalize(t, m, 2.0).item() == pytest.approx((1 + 3 + 5 + 6) / 2)
    assert masked_normalize(t, m, 2.0, dim=-1).tolist() == pytest.approx([2.0, 5.5])
    assert masked_normalize(t, m, 1.0, dim=0).tolist() == pytest.approx([1.0, 5.0, 9.0])


def test_sft_microbatch_train_step():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    loss, meta = sft_microbatch_train_step(log_probs, mask, gradient_accumulation_steps=2, normalize_constant=4.0)
    # per-example NLL / 4: [3/4, 11/4]; mean 7/4; / 2 accumulation steps
    assert loss.item() == pytest.approx(7 / 8)
    # d loss / d log_prob = -mask / (normalize * batch * accumulation)
    assert torch.allclose(log_probs.grad, -mask.float() / 16)
    assert meta["num_response_tokens"].item() == 4
