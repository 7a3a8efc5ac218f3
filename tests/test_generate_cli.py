"""`optpipe generate`: from a fresh process, without the model's code; token ids or text through the
model folder's tokenizer.json; --json schema; speculative decoding with --draft; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import optpipe
from optpipe.cli import main
from optpipe.program import load_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["<pad>", "<eos>", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "and"]


def cli(*args, check=True):
    """In-process (fast); `optpipe_cli` runs a fresh process."""
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if check:
        assert r.exit_code == 0, r.output
    return r


def optpipe_cli(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "optpipe", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A GPT-2 folder as transformers writes it, plus a word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(WORDS), n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1
    )
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def outs(hf_folder, tmp_path_factory):
    base = tmp_path_factory.mktemp("outs")
    cached, plain = base / "CACHED", base / "PLAIN"
    common = ["--input", "input_ids:int64[batch=1,seq=8]", "--mode", "eager"]
    cli("optimize", hf_folder, "--pipeline", "fuse-attention,dce,kv-cache{max-len=96}", "-o", cached, *common)
    cli("optimize", hf_folder, "--pipeline", "fuse-attention,dce", "-o", plain, *common)
    return cached, plain


def test_generate_ids_json_matches_the_program(outs):
    """From a fresh process, without the model's code."""
    cached, plain = outs
    r = optpipe_cli(
        "generate",
        cached,
        "--prompt-ids",
        "2,4,6",
        "--prompt-ids",
        "3,5",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    )
    doc = json.loads(r.stdout)
    assert set(doc) >= {"ids", "new_ids", "tokens_per_s", "text"}
    assert [len(x) for x in doc["new_ids"]] == [12, 12]
    assert doc["ids"][0][:3] == [2, 4, 6] and doc["ids"][1][:2] == [3, 5]
    program = load_program(cached / "program.pt2")
    assert doc["new_ids"] == optpipe.generate(program, [[2, 4, 6], [3, 5]], 12).new_ids
    # the plain program (no cache) recomputes and gives the same greedy tokens
    r2 = cli("generate", plain, "--prompt-ids", "2,4,6", "--max-new-tokens", "12", "--ignore-eos", "--json")
    assert json.loads(r2.stdout)["new_ids"][0] == doc["new_ids"][0]


def test_saved_step_program_takes_the_filled_length(outs):
    """program.pt2 keeps key_mask's length L dynamic (a plain torch.export.load runs it with any
    L < max-len): the generation loop passes only the filled slots, with the logits of a longer
    mask."""
    import optpipe  # noqa: F401 - registers optpipe's ops
    from optpipe.kv_step import empty_caches

    cached, _ = outs
    ep = torch.export.load(str(cached / "program.pt2"))
    key_mask = next(n for n in ep.graph.nodes if n.name == "key_mask")
    assert isinstance(key_mask.meta["val"].shape[1], torch.SymInt)
    kv = load_program(cached / "program.pt2").meta["kv_cache"]
    ids = torch.tensor([[2, 4, 6, 3, 5]])
    slots = torch.arange(5)
    logits = []
    for length in (5, 9, 95):
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[:, :5] = True
        with torch.no_grad():
            logits.append(ep.module()(ids, slots[None], slots, mask, *empty_caches(kv, 1))[0])
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0], logits[2], atol=1e-5, rtol=0)


def test_generate_text_through_the_tokenizer(outs):
    cached, _ = outs
    assert (cached / "tokenizer.json").exists()  # copied from the model folder at optimize time
    r = cli("generate", cached, "--prompt", "the cat sat on", "--max-new-tokens", "6", "--ignore-eos", "--json")
    doc = json.loads(r.stdout)
    assert doc["ids"][0][:4] == [2, 4, 6, 7]
    words = doc["text"][0].split()
    assert len(words) == 6 and set(words) <= set(WORDS)


def test_sampling_options_and_stop_token(outs):
    cached, _ = outs
    args = ["generate", cached, "--prompt-ids", "2,4", "--max-new-tokens", "10", "--json"]
    a = json.loads(cli(*args, "--temperature", "1.2", "--top-k", "5", "--top-p", "0.9", "--seed", "3").stdout)
    b = json.loads(cli(*args, "--temperature", "1.2", "--top-k", "5", "--top-p", "0.9", "--seed", "3").stdout)
    assert a["new_ids"] == b["new_ids"]
    free = json.loads(cli(*args, "--ignore-eos").stdout)["new_ids"][0]
    stop = free[2]
    stopped = json.loads(cli(*args, "--stop-token", stop).stdout)["new_ids"][0]
    assert stopped == free[: free.index(stop) + 1]


def test_speculative_with_a_draft(outs):
    cached, _ = outs
    r = cli(
        "generate",
        cached,
        "--prompt-ids",
        "2,4,6",
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--draft",
        cached,
        "--draft-tokens",
        "3",
        "--json",
    )
    doc = json.loads(r.stdout)
    alone = json.loads(
        cli("generate", cached, "--prompt-ids", "2,4,6", "--max-new-tokens", "16", "--ignore-eos", "--json").stdout
    )
    assert doc["new_ids"] == alone["new_ids"]
    assert doc["speculative"]["acceptance_rate"] == 1.0  # the draft is the target itself


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "4"], "give --prompt TEXT or --prompt-ids IDS"),
        (["--prompt-ids", "1,x"], "bad --prompt-ids"),
        (["--prompt-ids", "1,2", "--max-new-tokens", "500"], "exceed the cache (96 slots)"),
        (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt-ids", "1,2", "--draft", "{plain}"], "speculative decoding needs step programs"),
    ],
)
def test_bad_input_is_one_line(outs, args, message):
    cached, plain = outs
    r = cli("generate", cached, *[a.format(plain=plain) for a in args], check=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_prompt_text_without_a_tokenizer(tmp_path):
    out = tmp_path / "OUT"
    cli(
        "optimize",
        os.path.join(ROOT, "examples", "tiny_gpt.py") + ":build",
        "--pipeline",
        "fuse-attention,kv-cache",
        "-o",
        out,
        "--mode",
        "eager",
    )
    r = cli("generate", out, "--prompt", "hello", check=False)
    assert r.exit_code == 2 and "no tokenizer.json" in r.stderr and "--prompt-ids" in r.stderr
