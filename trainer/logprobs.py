"""Per-token log-probs (and entropy) of the labels without materialising float32 logits for every token.

The LM head of a 151,936-entry vocabulary makes (tokens x vocab) logits the largest tensor of SFT: 8 x 1024
tokens give 2.5 GB in bf16 and 5 GB more in float32, kept for the backward pass. Here the head is applied to
`chunk_rows` hidden states at a time, only at the positions the loss reads (the response tokens), and the
backward pass recomputes each chunk's logits instead of storing them: memory O(chunk_rows x vocab).

Numerics: logits in the compute dtype (bf16 on GPU) from the matrix product, then float32 for logsumexp,
softmax and the gradient, as `cross_entropy(logits.float())` does. With `compiled`, those float32 passes are
torch.compile'd into one kernel per chunk and direction, reading the bf16 logits once (the same math).
"""

from __future__ import annotations

import torch

from trainer.sft import get_response_log_probs

DEFAULT_CHUNK_ROWS = 2048
"""Rows of logits alive at once: 2048 x 151,936 float32 = 1.2 GB."""


def _chunk_stats(logits: torch.Tensor, labels: torch.Tensor, with_entropy: bool):
    """(log p(label), log Z, entropy or None) per row of one chunk of logits, in float32."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(1, labels[:, None]).squeeze(1) - log_z
    if not with_entropy:
        return log_probs, log_z, None
    return log_probs, log_z, log_z - (torch.exp(logits - log_z[:, None]) * logits).sum(dim=-1)


def _chunk_grad(logits: torch.Tensor, labels: torch.Tensor, log_z: torch.Tensor, grad: torch.Tensor):
    """d (grad . log p(label)) / d logits = (onehot(label) - softmax(logits)) * grad, in the logits' dtype.
    Eager: in place where it can, a scatter for the one-hot."""
    grad_logits = torch.exp(logits.float() - log_z[:, None]).mul_(-grad[:, None])
    return grad_logits.scatter_add_(1, labels[:, None], grad[:, None]).to(logits.dtype)


def _chunk_grad_fusable(logits: torch.Tensor, labels: torch.Tensor, log_z: torch.Tensor, grad: torch.Tensor):
    """The same as _chunk_grad, written as one elementwise expression, which torch.compile makes a single pass
    (bf16 logits in, bf16 gradient out; eager, it would be slower)."""
    probs = torch.exp(logits.float() - log_z[:, None])
    is_label = torch.arange(logits.shape[1], device=logits.device)[None, :] == labels[:, None]
    return (torch.where(is_label, 1.0 - probs, -probs) * grad[:, None]).to(logits.dtype)


_compiled: dict = {}


def _elementwise(compiled: bool):
    """The chunk's float32 passes: eager, or compiled into one kernel each over the bf16 logits."""
    if not compiled:
        return _chunk_stats, _chunk_grad
    if not _compiled:
        # Rows dynamic from the first call: a chunk's row count changes (the last one is shorter), and a graph
        # compiled static first is compiled again. With the slices at offset 0 (`_rows`) only the entropy flag
        # gives a second graph, once (an H100, 30 steps of real lengths: 1 recompilation in all, where the
        # static head and rows filled in turn gave 7; BENCHMARKS.md, issue 23).
        _compiled["stats"] = torch.compile(_chunk_stats, dynamic=True)
        _compiled["grad"] = torch.compile(_chunk_grad_fusable, dynamic=True)
    return _compiled["stats"], _compiled["grad"]


def _rows(t: torch.Tensor, rows: slice, compiled: bool) -> torch.Tensor:
    """t[rows]; for the compiled math a copy (a few KB) at storage offset 0: torch.compile specialises a slice's
    offset (0 for the first chunk, not for the others) into two graphs."""
    return t[rows].clone() if compiled else t[rows]


class _ChunkedLinearLogProbs(torch.autograd.Function):
    """Autocast is off inside: both operands are cast to `compute_dtype` here, explicitly, in both passes."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_rows: int,
        with_entropy: bool,
        compute_dtype: torch.dtype,
        compiled: bool,
    ):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        log_probs = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        log_z = torch.empty_like(log_probs)
        entropy = torch.empty_like(log_probs) if with_entropy else torch.empty(0, device=h.device)
        stats, _ = _elementwise(compiled)
        with torch.autocast(h.device.type, enabled=False), torch.profiler.record_function("lm_head"):
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                log_probs[rows], log_z[rows], chunk_entropy = stats(
                    h[rows] @ w.T, _rows(labels, rows, compiled), with_entropy
                )
                if with_entropy:
                    entropy[rows] = chunk_entropy
        ctx.save_for_backward(h, weight, labels, log_z)
        ctx.chunk_rows, ctx.hidden_dtype, ctx.compiled = chunk_rows, hidden.dtype, compiled
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor, _grad_entropy: torch.Tensor):
        h, weight, labels, log_z = ctx.saved_tensors
        w = weight.to(h.dtype)
        grad_hidden = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        )
        _, logits_grad = _elementwise(ctx.compiled)
        with torch.autocast(h.device.type, enabled=False), torch.profiler.record_function("lm_head_backward"):
            for start in range(0, h.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                grad_logits = logits_grad(
                    h[rows] @ w.T, *(_rows(t, rows, ctx.compiled) for t in (labels, log_z, grad_log_probs))
                )
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ w
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h[rows]).float()
        return (
            None if grad_hidden is None else grad_hidden.to(ctx.hidden_dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compute_dtype: torch.dtype | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T)[label] per row (float32, differentiable in hidden and weight), and the
    entropy of each row's distribution (no gradient) when asked. hidden (N, D), weight (V, D), labels (N,).
    The matrix products run in `compute_dtype` (default: hidden's dtype); `compiled`: the float32 math of each
    chunk is one torch.compile'd kernel per direction instead of several eager passes (on an H200, 32 examples
    of real lengths a step: the head's 42 ms a step down to 24 ms; BENCHMARKS.md, issue 23)."""
    log_probs, entropy = _ChunkedLinearLogProbs.apply(
        hidden, weight, labels, chunk_rows, with_entropy, compute_dtype or hidden.dtype, compiled
    )
    return log_probs, entropy if with_entropy else None


def response_log_probs(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compute_dtype: torch.dtype | None = None,
    compiled: bool = False,
    **model_kwargs,
) -> dict[str, torch.Tensor]:
    """{log_probs, token_entropy?} shaped like `labels`, computed only where `response_mask` is true (zero
    elsewhere): the decoder runs once, the LM head only on response positions, in chunks."""
    hidden = model.model(input_ids=input_ids, **model_kwargs).last_hidden_state
    where = response_mask.reshape(-1).nonzero().squeeze(1)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
    log_probs, entropy = linear_log_probs(
        picked,
        model.lm_head.weight,
        labels.reshape(-1).index_select(0, where),
        with_entropy=with_entropy,
        chunk_rows=chunk_rows,
        compute_dtype=compute_dtype,
        compiled=compiled,
    )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(labels.numel(), dtype=torch.float32, device=hidden.device)
        return full.index_put((where,), values).view_as(labels)

    out = {"log_probs": scatter(log_probs)}
    if entropy is not None:
        out["token_entropy"] = scatter(entropy)
    return out


def supports_chunked_head(model) -> bool:
    """The model's head is a plain bias-free linear layer after `model.model` (Qwen2, Llama, Mistral...)."""
    head = getattr(model, "lm_head", None)
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and hasattr(model, "model")
        and getattr(model.config, "final_logit_softcapping", None) is None
        and getattr(model.config, "logit_scale", None) in (None, 1, 1.0)
    )


class ResponseLogProbs(torch.nn.Module):
    """A causal LM with its SFT head: `forward` gives {log_probs, token_entropy?} of the labels, through the
    chunked head where the model has a plain linear one (`supports_chunked_head`), else through its own logits.

    One module around the model so that FSDP2 can make it the root unit: the root's pre-forward hook gathers
    the parameters outside the decoder layers (embedding, final norm, LM head) before the decoder runs, and its
    post-backward reduces their gradients. The chunked head calls `model.model` and reads `lm_head.weight`
    itself, which would bypass those hooks if the model were the root."""

    def __init__(self, model: torch.nn.Module, compiled: bool = False):
        super().__init__()
        self.model = model
        self.chunked = supports_chunked_head(model)
        self.compiled = compiled  # the chunked head's float32 math through torch.compile

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        response_mask: torch.Tensor,
        with_entropy: bool = False,
        **model_kwargs,
    ) -> dict[str, torch.Tensor]:
        if self.chunked:
            return response_log_probs(
                self.model,
                input_ids,
                labels,
                response_mask,
                with_entropy=with_entropy,
                compiled=self.compiled,
                **model_kwargs,
            )
        return get_response_log_probs(self.model, input_ids, labels, return_token_entropy=with_entropy, **model_kwargs)
