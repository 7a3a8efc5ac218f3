"""A tiny nanoGPT-style GPT whose attention is written out by hand, and what fuse-attention does to it.

`build()` returns the model with nanoGPT's hand-written attention path
(`(q @ kᵀ) * 1/sqrt(d)`, `masked_fill` with a registered `tril` buffer, softmax, dropout, `@ v`):
the shape the `fuse-attention` pass must recognise. `build_flash()` is the same model (same weights)
calling `F.scaled_dot_product_attention(..., is_causal=True)`, what the pass should produce.

Run `python examples/tiny_gpt.py` to capture the model, fuse its attention, clean up and compare.
Both factories also work as `optpipe optimize examples/tiny_gpt.py:build ...`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True
    flash: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.flash = config.flash
        if not self.flash:
            # the causal mask, as nanoGPT keeps it: a buffer sliced to the sequence length
            self.register_buffer(
                "bias",
                torch.tril(torch.ones(config.block_size, config.block_size)).view(
                    1, 1, config.block_size, config.block_size
                ),
            )

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                "ln_f": nn.LayerNorm(config.n_embd, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in nanoGPT
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids):
        """Logits at every position (nanoGPT's training-time forward, without the loss)."""
        b, t = input_ids.size()
        pos = torch.arange(0, t, dtype=torch.long, device=input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def _example_inputs(config: GPTConfig, seq: int = 32) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, config.vocab_size, (1, seq), dtype=torch.int64, generator=gen),)


def lm_batches(steps: int, batch: int, seq: int = 32, vocab: int = 256, seed: int = 0) -> list[dict]:
    """`steps` random next-token batches {"input_ids", "labels"} of [batch, seq] (the parallel examples')."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def sgd_steps(gm: torch.fx.GraphModule, batches: list[dict], lr: float) -> list[float]:
    """Train `gm` in place with plain SGD, one step per batch of `batches` (next-token loss); its losses."""
    from optpipe.losses import task_loss

    for p in gm.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(gm.parameters(), lr=lr)
    losses = []
    for b in batches:
        opt.zero_grad()
        loss = task_loss(gm(b["input_ids"]), b["labels"], "clm")
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def check_against_one_process(gm: torch.fx.GraphModule, res: dict, batches: list[dict], lr: float, label: str) -> bool:
    """Train a copy of `gm` with SGD on `batches` in this process and print how the distributed run's
    result `res` ({"losses", "weights"}) compares: the losses, the largest weight difference and
    whether both are within 1e-5 ("same training: True")."""
    import copy

    gm = copy.deepcopy(gm)
    losses = sgd_steps(gm, batches, lr)
    worst = max((w - gm.get_parameter(n).detach()).abs().max().item() for n, w in res["weights"].items())
    print(f"{label} losses {[round(l, 6) for l in res['losses']]} vs one process {[round(l, 6) for l in losses]}")
    same = all(abs(a - b) <= 1e-5 for a, b in zip(res["losses"], losses)) and worst <= 1e-5
    print(f"max weight difference after {len(batches)} steps: {worst:.3g}; same training: {same}")
    return same


def build(**overrides):
    """The hand-written-attention GPT (eval mode) and its example inputs `(input_ids int64[1,32],)`."""
    config = GPTConfig(**overrides)
    torch.manual_seed(0)
    return GPT(config).eval(), _example_inputs(config)


def build_flash(**overrides):
    """Same weights as `build()`, with attention through `F.scaled_dot_product_attention`."""
    config = GPTConfig(**{**overrides, "flash": True})
    torch.manual_seed(0)
    return GPT(config).eval(), _example_inputs(config)


def main() -> None:
    from optpipe.attention_sites import find_attention_sites
    from optpipe.capture import capture
    from optpipe.registry import get_pass

    model, inputs = build()
    program = capture(model, inputs)
    before = program.run()
    for name in ("fuse-attention", "dce"):
        info = get_pass(name)
        result = info.fn(program, info.config_cls())
        program.gm.recompile()
        print(f"{name:15s} modified={result.modified} stats={result.stats}")
    after = program.run()
    with torch.no_grad():
        eager = model(*inputs)
    print(
        f"max |fused - eager| = {(after - eager).abs().max().item():.3g}, "
        f"max |fused - captured| = {(after - before).abs().max().item():.3g}"
    )
    for site in find_attention_sites(program.gm, program.example_inputs):
        print(
            f"  {site.module_path:22s} mask={site.mask:8s} heads={site.heads} "
            f"head_dim={site.head_dim} scale={site.scale:.4g}"
        )


if __name__ == "__main__":
    main()
