"""Sequence-to-sequence pre-training: a small T5 with span corruption, or a small BART with
denoising, on Python's own documentation (`pydoc_data`), with `optpipe train --objective seq2seq`.

    python examples/seq2seq.py                      # T5, --noise span, 200 steps
    python examples/seq2seq.py --model bart         # BART, --noise denoise
    python examples/seq2seq.py --steps 20           # a smoke run
    python examples/seq2seq.py --target onnxruntime --target tvm [--floor] [--lr 3e-4]
                                                    # the same run on each target beside torch's:
                                                    # max |loss difference| per step, val losses
                                                    # (--floor: torch against itself, summed in
                                                    # another order)

With `--target`, every run (torch's included) trains without gradient clipping (onnxruntime has
none) and logs the loss of every step, so the curves compare step by step. The comparison runs at
lr 3e-4 (the plain run at 3e-3): from about 5e-4 up, 200 float32 steps of this model are chaotic,
and torch parts from itself, summed in another order, by 5e-4 (lr 5e-4) to 2.6e-3 (lr 3e-3), so
no target could follow it within 1e-3 there; `--floor` measures that at any `--lr`.

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

COMPARE_LR = 3e-4
"""The learning rate of `compare` (see the module docstring)."""
VOCAB = 384  # bytes (0-255), eos 256, pad 257, mask 258; T5's sentinels count down from 383


def t5(seq: int = 64, width: int = 64, layers: int = 2, feed_forward: str = "relu"):
    """A small T5ForConditionalGeneration (random init) and example inputs. `feed_forward`: T5's
    ReLU MLP, or T5 v1.1's "gated-gelu"."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=width, d_ff=2 * width, d_kv=16, num_layers=layers, num_heads=4,
        dropout_rate=0.0, pad_token_id=257, eos_token_id=256, decoder_start_token_id=257,
        feed_forward_proj=feed_forward,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval(), _inputs(seq, seq // 4)


def t5_gated(seq: int = 64, width: int = 64, layers: int = 2):
    """`t5()` with T5 v1.1's gated-GELU feed-forward."""
    return t5(seq, width, layers, feed_forward="gated-gelu")


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


def run(
    workdir: str, *, model: str = "t5", steps: int = 200, seq: int = 64, seed: int = 0, target: str = "cpu", **train
) -> dict:
    """Train on `target`, and return the validation loss before and after (the same held-out
    batches; both computed by torch) and the per-step losses when `train` asks for them
    (`log_every=1`). `train`: more TrainConfig options (e.g. `clip=None`)."""
    import optpipe
    from optpipe.runtime.data import pydoc_corpus
    from optpipe.runtime.training import evaluate

    corpus = os.path.join(workdir, "pydoc.txt")
    if not os.path.exists(corpus):
        pydoc_corpus(corpus)
    factory = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"seq2seq.py:{model.replace('-', '_')}")
    noise = "denoise" if model == "bart" else "span"
    options = {"objective": "seq2seq", "noise": noise, "seq_len": seq, "batch_size": 8, "seed": seed}
    out = os.path.join(workdir, f"{model}-{target}" + ("-accum" if train.get("grad_accum", 1) > 1 else ""))
    train = {"lr": 3e-3, "warmup": 10, "log_every": 50, **train}
    res = optpipe.train(factory, corpus, out, steps=steps, progress=False, target=target, **options, **train)
    losses = [m["loss"] for m in res.metrics if "loss" in m]
    res = res.to_dict()
    ev = {k: options[k] for k in ("objective", "noise", "seq_len", "batch_size", "seed")}
    before = evaluate(factory, corpus, **ev)["val_loss"]
    after = evaluate(out, corpus, **ev)["val_loss"]
    return {
        "model": model, "noise": noise, "target": target, "val_loss_before": before, "val_loss_after": after,
        "losses": losses, **res,
    }  # fmt: skip


def compare(
    workdir: str,
    targets: list[str],
    *,
    model: str = "t5",
    steps: int = 200,
    seq: int = 64,
    floor: bool = False,
    lr: float = COMPARE_LR,
    seed: int = 0,
) -> list[dict]:
    """The run on torch (cpu) and on each of `targets`, unclipped, every step logged; each target's
    row carries `max_loss_diff`, the largest |loss - torch's loss| over the steps, and `apart_from`,
    the first step where it exceeds 1e-4 (None: never). `floor`: also
    torch again with two micro-batches a step (the same math summed in another order): how far
    float32 rounding alone takes the curve apart (AdamW turns rounding-level differences of
    near-zero gradients into lr-sized steps, and ReLU units flip on them)."""
    common = {"model": model, "steps": steps, "seq": seq, "clip": None, "log_every": 1, "lr": lr, "seed": seed}
    rows = [run(workdir, target="cpu", **common)]
    runs = [(t, {}) for t in targets] + ([("cpu", {"grad_accum": 2})] if floor else [])
    for target, extra in runs:
        r = run(workdir, target=target, **common, **extra)
        r["target"] += " --grad-accum 2" if extra else ""
        pairs = list(zip(rows[0]["losses"], r["losses"]))
        if len(pairs) != steps:
            raise RuntimeError(f"{target}: {len(r['losses'])} logged losses, torch {len(rows[0]['losses'])}")
        diffs = [abs(a - b) for a, b in pairs]
        r["max_loss_diff"] = max(diffs)
        r["apart_from"] = next((i + 1 for i, d in enumerate(diffs) if d > 1e-4), None)  # first step > 1e-4
        rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("t5", "t5-gated", "bart"), default="t5")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--workdir", help="keep the OUT folder here (default: a temporary folder)")
    ap.add_argument(
        "--target",
        action="append",
        choices=("onnxruntime", "tvm"),
        help="also train on this target and compare its losses with torch's (repeatable)",
    )
    ap.add_argument("--floor", action="store_true", help="with --target: also torch with --grad-accum 2")
    ap.add_argument("--lr", type=float, help=f"learning rate (default 3e-3; {COMPARE_LR:g} with --target)")
    ap.add_argument("--seed", type=int, default=0, help="the data's seed (masking, order, validation split)")
    args = ap.parse_args(argv)
    lr = {"lr": args.lr} if args.lr else {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        if args.target:
            rows = compare(
                workdir, args.target, model=args.model, steps=args.steps, seq=args.seq, floor=args.floor,
                seed=args.seed, **lr,
            )  # fmt: skip
        else:
            rows = [run(workdir, model=args.model, steps=args.steps, seq=args.seq, seed=args.seed, **lr)]
    for r in rows:
        diff = (
            f", max |loss - torch loss| {r['max_loss_diff']:.2e} (first step above 1e-4: {r['apart_from']})"
            if "max_loss_diff" in r
            else ""
        )
        print(
            f"{r['model']} --objective seq2seq --noise {r['noise']} --target {r['target']}, {r['steps']} steps "
            f"at lr {args.lr or (COMPARE_LR if args.target else 3e-3):g}: "
            f"validation loss {r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f}{diff}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
