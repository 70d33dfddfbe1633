"""Padding-free micro-batches: whole examples concatenated in one row, up to a token budget.

Invariants:
- An example is never split: a micro-batch holds whole examples, in the order of the data, within
  `max_tokens` (an example longer than the budget goes alone).
- A step's examples make as few rows as filling each row in turn makes, and those rows are as even as that
  count allows (the longest as short as it can be): no short remainder row. Under torch.compile each new range
  of row lengths recompiled the decoder layers mid-run (inductor guards on the row length); even rows keep a
  run's rows in one range (BENCHMARKS.md, issue 23: 7 recompilations in 30 steps before, 1 after).
- Each example keeps its own next-token pairs (inputs = tokens[:-1], labels = tokens[1:]), so no label is
  ever predicted across an example boundary; `position_ids` restart at 0 for each example and
  `cu_seq_lens` (cumulative lengths, int32, starting at 0) tell the attention where examples begin, so
  attention never crosses examples either.
- Which examples a step trains on, and the loss normalisation over the global batch, do not depend on
  packing: only how the step's examples are grouped into forward passes does.
"""

from __future__ import annotations

import inspect
import itertools

import torch

VARLEN_ATTENTION = "torch_varlen"
"""The attention implementation registered with transformers for packed rows on CUDA."""


def tokenize_examples(prompts: list[str], outputs: list[str], tokenizer, max_len: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + output truncated to max_len, number of prompt tokens kept) per example."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(outputs, add_special_tokens=False)["input_ids"]
    return [((p + o)[:max_len], min(len(p), max_len)) for p, o in zip(prompt_ids, output_ids, strict=True)]


def group_by_budget(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of consecutive examples in rows of at most max_tokens (one alone if longer): as many rows as
    filling them in turn makes, under the smallest cap per row that keeps that count (a binary search)."""
    if not lengths:
        return []
    num_rows = len(_fill_rows(lengths, max_tokens))
    low, high = min(max_tokens, -(-sum(lengths) // num_rows)), max_tokens  # `high` always makes num_rows rows
    while low < high:
        cap = (low + high) // 2
        if len(_fill_rows(lengths, cap)) <= num_rows:
            high = cap
        else:
            low = cap + 1
    return _fill_rows(lengths, high)


def _fill_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of consecutive examples, each row filled in turn up to max_tokens (one alone if longer)."""
    groups: list[list[int]] = []
    used = max_tokens
    for i, n in enumerate(lengths):
        if used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def packed_microbatch(examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """One row holding `examples` (from tokenize_examples): input_ids, labels, response_mask, position_ids of
    shape (1, T) and cu_seq_lens (num_examples + 1,) with max_seq_len, T = sum of (length - 1)."""
    inputs, labels, mask, positions, bounds = [], [], [], [], [0]
    for ids, num_prompt in examples:
        n = len(ids) - 1
        inputs += ids[:-1]
        labels += ids[1:]
        # label j is token j + 1: a response token when j + 1 >= num_prompt
        mask += [j + 1 >= num_prompt for j in range(n)]
        positions += range(n)
        bounds.append(bounds[-1] + n)
    row = {
        "input_ids": torch.tensor([inputs], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "response_mask": torch.tensor([mask], dtype=torch.bool),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
    }
    row["max_seq_len"] = int(max(b - a for a, b in itertools.pairwise(bounds)))
    return row


def _torch_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention over a packed row with torch's variable-length flash kernel (no flash-attn package).
    query (1, Hq, T, D), key/value (1, Hkv, T, D): grouped-query heads are taken as they are."""
    from torch.nn.attention.varlen import varlen_attn

    if query.shape[0] != 1 or "cu_seq_lens_q" not in kwargs:
        raise ValueError(
            "torch_varlen attention takes one packed row with cu_seq_lens_q/max_length_q (see trainer/packing.py)"
        )
    gqa = (
        {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    )  # torch >= 2.12 asks
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    packed = [t.transpose(1, 2)[0] for t in (query, key, value)]  # (T, H, D)
    out = varlen_attn(*packed, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0), **gqa)  # (-1, 0): causal
    return out[None], None


def varlen_attention_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401 - torch >= 2.10
    except ImportError:
        return False
    return True


def use_packed_attention(model, device: torch.device) -> bool:
    """Switch `model` to attention that never crosses examples of a packed row. CUDA with torch's varlen kernel:
    that kernel (True: the forward needs `packed_forward_kwargs(..., varlen=True)`). Elsewhere: sdpa, for which
    transformers builds the block-diagonal causal mask from the restarting position_ids (needs use_cache off)."""
    if varlen_attention_available(device):
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN_ATTENTION, _torch_varlen_attention)
        model.set_attn_implementation(VARLEN_ATTENTION)
        return True
    model.set_attn_implementation("sdpa")
    model.config.use_cache = False  # with a cache transformers skips the packed mask: attention would cross examples
    return False


def packed_forward_kwargs(mb: dict, device: torch.device, varlen: bool) -> dict:
    """Keyword arguments of the model's forward for a packed micro-batch."""
    kwargs = {"position_ids": mb["position_ids"].to(device, non_blocking=True)}
    if varlen:
        cu = mb["cu_seq_lens"].to(device, non_blocking=True)
        kwargs.update(
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mb["max_seq_len"], max_length_k=mb["max_seq_len"]
        )
    return kwargs
