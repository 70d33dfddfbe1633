"""Facts about Hugging Face model objects that both services need (no torch import here)."""

from __future__ import annotations


def tied_weight_names(model) -> set[str]:
    """Parameter names that transformers re-ties on load (e.g. lm_head.weight to the embeddings), so
    checkpoints store them once. transformers 4 lists them; 5 maps each to its source."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied.keys() if isinstance(tied, dict) else tied)
