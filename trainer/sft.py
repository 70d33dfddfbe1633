"""SFT building blocks, with the semantics of the CS336 assignment 5 reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tokenize_prompt_and_output(
    prompt_strs: list[str], output_strs: list[str], tokenizer, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize prompts and outputs separately, concatenate, right-pad with the pad token.

    Returns `input_ids` (without the last token), `labels` (without the first) and `response_mask`
    (True where `labels` holds an output token). `max_len` truncates prompt+output from the right.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    prompts = tokenizer(prompt_strs, add_special_tokens=False)["input_ids"]
    outputs = tokenizer(output_strs, add_special_tokens=False)["input_ids"]
    seqs, masks = [], []
    for p, o in zip(prompts, outputs, strict=True):
        ids = (p + o)[:max_len] if max_len else p + o
        seqs.append(ids)
        masks.append(([False] * len(p) + [True] * len(o))[: len(ids)])
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (ids, m) in enumerate(zip(seqs, masks, strict=True)):
        full[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask[:, 1:]}


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution over the last dimension: logsumexp(z) - sum softmax(z) z."""
    log_z = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return log_z - (probs * logits).sum(dim=-1)


def get_response_log_probs(
    model, input_ids: torch.Tensor, labels: torch.Tensor, return_token_entropy: bool = False, **model_kwargs
) -> dict[str, torch.Tensor]:
    """Per-token log p(label | prefix) under `model`, shape (batch, seq); optionally the entropy too.

    No attention mask is needed: padding is on the right, so under causal attention no real token
    ever attends to a pad token. `model_kwargs` go to the forward (e.g. position_ids of a packed row)."""
    logits = model(input_ids=input_ids, **model_kwargs).logits
    # Flattened (tokens, vocab) rows: the fused kernel. The (batch, vocab, seq) layout is ~2x slower.
    log_probs = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
    out = {"log_probs": log_probs}
    if return_token_entropy:
        with torch.no_grad():
            out["token_entropy"] = compute_entropy(logits.float())
    return out


def masked_normalize(
    tensor: torch.Tensor, mask: torch.Tensor, normalize_constant: float, dim: int | None = None
) -> torch.Tensor:
    """Sum of `tensor` where `mask` is true (over `dim`, or everything), divided by `normalize_constant`."""
    masked = tensor * mask.to(tensor.dtype)
    total = masked.sum() if dim is None else masked.sum(dim=dim)
    return total / normalize_constant


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL summed over the sequence / normalize_constant, averaged over the batch, divided by
    the accumulation steps; back-propagates it and returns it."""
    per_example = -masked_normalize(policy_log_probs, response_mask, normalize_constant, dim=-1)
    loss = per_example.mean() / gradient_accumulation_steps
    loss.backward()
    return loss, {"per_example_nll": per_example.detach(), "num_response_tokens": response_mask.sum().detach()}
