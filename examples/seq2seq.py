"""Sequence-to-sequence pre-training: a small T5 with span corruption, or a small BART with
denoising, on Python's own documentation (`pydoc_data`), with `optpipe train --objective seq2seq`.

    python examples/seq2seq.py                      # T5, --noise span, 200 steps
    python examples/seq2seq.py --model bart         # BART, --noise denoise
    python examples/seq2seq.py --steps 20           # a smoke run

The models are random-init `transformers` configs over optpipe's byte tokenizer (256 bytes + eos,
pad, mask), with room at the top of the vocabulary for T5's sentinels. `t5()` and `bart()` are also
MODEL factories: `optpipe train examples/seq2seq.py:t5 --objective seq2seq --data corpus.txt ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 384  # bytes (0-255), eos 256, pad 257, mask 258; T5's sentinels count down from 383


def t5(seq: int = 64, width: int = 64, layers: int = 2):
    """A small T5ForConditionalGeneration (random init) and example inputs."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=width, d_ff=2 * width, d_kv=16, num_layers=layers, num_heads=4,
        dropout_rate=0.0, pad_token_id=257, eos_token_id=256, decoder_start_token_id=257,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval(), _inputs(seq, seq // 4)


def bart(seq: int = 64, width: int = 64, layers: int = 2):
    """A small BartForConditionalGeneration (random init) and example inputs."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB, d_model=width, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width, dropout=0.0,
        max_position_embeddings=max(128, 2 * seq), pad_token_id=257, eos_token_id=256, bos_token_id=256,
        decoder_start_token_id=256, forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval(), _inputs(seq, seq)


def _inputs(seq: int, target: int) -> dict:
    ids = torch.randint(0, 256, (2, seq))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": torch.randint(0, 256, (2, target)),
    }


def run(workdir: str, *, model: str = "t5", steps: int = 200, seq: int = 64, seed: int = 0) -> dict:
    """Train, and return the validation loss before and after (the same held-out batches)."""
    import optpipe
    from optpipe.runtime.data import pydoc_corpus
    from optpipe.runtime.training import evaluate

    corpus = os.path.join(workdir, "pydoc.txt")
    pydoc_corpus(corpus)
    factory = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"seq2seq.py:{model}")
    noise = "span" if model == "t5" else "denoise"
    options = {"objective": "seq2seq", "noise": noise, "seq_len": seq, "batch_size": 8, "seed": seed}
    out = os.path.join(workdir, model)
    res = optpipe.train(factory, corpus, out, steps=steps, lr=3e-3, warmup=10, log_every=50, progress=False, **options)
    res = res.to_dict()
    ev = {k: options[k] for k in ("objective", "noise", "seq_len", "batch_size", "seed")}
    before = evaluate(factory, corpus, **ev)["val_loss"]
    after = evaluate(out, corpus, **ev)["val_loss"]
    return {"model": model, "noise": noise, "val_loss_before": before, "val_loss_after": after, **res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("t5", "bart"), default="t5")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--workdir", help="keep the OUT folder here (default: a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        r = run(workdir, model=args.model, steps=args.steps, seq=args.seq)
    print(
        f"{r['model']} --objective seq2seq --noise {r['noise']}, {r['steps']} steps: validation loss "
        f"{r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
