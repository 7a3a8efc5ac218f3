"""`inspect`: ops, params, FLOPs, memory per module and attention sites (SDPA and hand-written)."""

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optpipe import capture
from optpipe.inspection import HAND_WRITTEN_FORM, SDPA_FORM, format_inspect, inspect_program
from tests.fixtures.tiny_models import TinyGPT, ids


class SdpaAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(SdpaAttention() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_sdpa_sites_with_heads_and_head_dim():
    model = Encoder()
    program = capture(model, (torch.randn(1, 8, 32),))
    code = program.gm.code
    d = inspect_program(program)
    assert program.gm.code == code  # inspect never rewrites the program
    sites = d["attention"]
    assert [s["module"] for s in sites] == ["layers.0", "layers.1"]
    for s in sites:
        assert (s["form"], s["mask"], s["heads"], s["kv_heads"], s["head_dim"]) == (SDPA_FORM, "causal", 4, 4, 8)
    assert d["params"] == sum(p.numel() for p in model.parameters())
    assert d["ops"]["aten.scaled_dot_product_attention"] == 2
    modules = {m["module"]: m for m in d["modules"]}
    assert modules["layers.0.qkv"]["flops"] == 2 * 8 * 32 * 96
    assert modules["layers"]["flops"] == d["flops"]  # everything with FLOPs lives under layers
    assert modules["layers.0"]["params"] == sum(p.numel() for p in model.layers[0].parameters())
    json.dumps(d)


def test_hand_written_attention_is_reported_as_fusable():
    pytest.importorskip("optpipe.passes.fuse_attention")
    program = capture(TinyGPT(dim=32, heads=2), (ids(),))
    d = inspect_program(program)
    sites = d["attention"]
    assert [s["module"] for s in sites] == ["h.0.attn", "h.1.attn"]
    for s in sites:
        assert (s["form"], s["mask"], s["heads"], s["head_dim"]) == (HAND_WRITTEN_FORM, "causal", 2, 16)
    # the program itself still has its hand-written attention
    assert "aten.scaled_dot_product_attention" not in d["ops"] and d["ops"]["aten.softmax"] == 2


def test_format_inspect_is_an_aligned_table():
    program = capture(Encoder(), (torch.randn(1, 8, 32),))
    text = format_inspect(inspect_program(program))
    assert "attention sites (2)" in text
    lines = text.splitlines()
    header = next(line for line in lines if "head-dim" in line)
    row = next(line for line in lines if line.strip().startswith("layers.0 "))
    h_spans = [m.span() for m in re.finditer(r"\S+", header)]
    r_spans = [m.span() for m in re.finditer(r"\S+", row)]
    assert len(h_spans) == len(r_spans) == 7
    assert [s[0] for s in h_spans[:3]] == [s[0] for s in r_spans[:3]]  # text: left-aligned
    assert [s[1] for s in h_spans[3:]] == [s[1] for s in r_spans[3:]]  # numbers: right-aligned
    assert "modules (" in text and "qkv" in text and "aten.linear" in text


def test_no_attention():
    program = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    d = inspect_program(program)
    assert d["attention"] == []
    assert "attention sites (0)" in format_inspect(d)
