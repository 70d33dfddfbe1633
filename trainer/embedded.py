"""The embedded default model: a tiny Qwen2 and a BPE tokenizer, both built in code.

The tokenizer is a byte-level BPE trained on the prompt template and the generated training data,
with Qwen2's pre-tokenization (digits one per token). The template's fixed text around {question}
is one added token each, so the ~330-character r1_zero preamble costs two tokens and the demo
trains in minutes on a CPU. Both are saved like
any Hugging Face checkpoint (safetensors, config.json, tokenizer.json), so transformers and vLLM
load them as they load a downloaded model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from shared.config import ModelConfig
from shared.data import Example, render_prompt

EOS = "<|endoftext|>"
PAD = "<|pad|>"
HEAD_DIM = 64
QWEN2_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 - one regex, as in Qwen2's tokenizer.json


def build_tokenizer(corpus: list[str], vocab_size: int, fixed_texts: list[str]) -> PreTrainedTokenizerFast:
    """BPE with Qwen2's pre-tokenization (transformers 5 re-applies it when loading any qwen2 model,
    so training with anything else would not survive a save/load). `fixed_texts` (the template's
    fixed parts) become single added tokens: they are matched before pre-tokenization."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        max_token_length=64,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in fixed_texts if t])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="right")


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int, seed: int) -> Qwen2ForCausalLM:
    heads = cfg.embedded_hidden_size // HEAD_DIM
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.embedded_hidden_size,
        intermediate_size=4 * cfg.embedded_hidden_size,
        num_hidden_layers=cfg.embedded_num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def save_embedded_model(cfg: ModelConfig, template: str, train: list[Example], out_dir: Path, seed: int) -> None:
    """Build tokenizer + model and save them to `out_dir` (a plain Hugging Face model folder)."""
    corpus = [render_prompt(template, ex) + " " + (ex.response or ex.answer) for ex in train[:5000]]
    tokenizer = build_tokenizer(corpus, cfg.embedded_vocab_size, template.split("{question}"))
    # Round the embedding up to a multiple of 64 (kernel-friendly), as real models do.
    vocab = -(-len(tokenizer) // 64) * 64
    model = build_model(cfg, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
