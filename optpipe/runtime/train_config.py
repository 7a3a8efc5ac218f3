"""What `optpipe train` does: `TrainConfig`, one frozen dataclass whose fields are the CLI's options.

    TrainConfig(objective="mlm", steps=500, lr=1e-4, trainable=("changed",))
    optpipe train OUT --data FILE --objective mlm --steps 500 --lr 1e-4 --trainable changed -o OUT2

Every field but `betas` and `eps` is an `optpipe train` option of the same name (`batch_size` is
`--batch-size`), built from the field by the CLI the way pass options come from pass configs. A
field's metadata holds what the option needs beyond its name, type and default:

    help     the option's help line ("" for none)
    min      the lower bound of an integer option
    choices  the values an option takes
    metavar  the value's name in `--help`
    cli      False for a field that is not an option

A bool field is a flag; a tuple of strings is given as one comma-separated value (`--trainable a,b`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import UsageError
from ..losses import OBJECTIVES
from .data import STRATEGIES
from .seq2seq_data import NOISES

TARGETS = ("cpu", "cuda", "onnxruntime", "tvm")
"""Where a program trains: torch on cpu / cuda, onnxruntime-training, TVM (Relax autodiff)."""


def _option(default, help: str = "", **cli):
    """A TrainConfig field with its CLI option's metadata (module docstring)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TrainConfig:
    """What `optpipe train` does; every field but `betas` and `eps` is a CLI option of the same name."""

    objective: str = _option("clm", choices=OBJECTIVES)
    steps: int = _option(100, "Optimizer steps.", min=1)
    batch_size: int = _option(8, "Global batch in sequences (over ranks and accumulation).", min=1)
    seq_len: int | None = _option(None, "Default: the program's example length.", min=2)
    """Tokens per sequence."""
    grad_accum: int = _option(1, min=1)
    lr: float = _option(3e-4, "Peak learning rate (warmup, then cosine).")
    min_lr: float | None = _option(None, "End of the cosine schedule (default lr/10).")
    warmup: int | None = _option(None, "Warmup steps (default 5% of --steps).", min=0)
    """Linear warmup steps."""
    weight_decay: float = _option(0.0)
    betas: tuple[float, float] = _option((0.9, 0.95), cli=False)
    """AdamW's betas (Python API only)."""
    eps: float = _option(1e-8, cli=False)
    """AdamW's eps (Python API only)."""
    clip: float | None = _option(1.0, "Gradient-norm clipping (0: off).")
    layer_decay: float | None = _option(None, "Layer-wise lr decay, e.g. 0.8.")
    """Layer i of L gets lr·decay^(L-i); embeddings decay^(L+1)."""
    trainable: tuple[str, ...] = _option(
        ("*",),
        "Parameters to train: comma-separated globs over names, or `changed` (what passes rewrote).",
        metavar="GLOBS",
    )
    """Globs over parameter names, or `changed`: the parameters of modules a pass rewrote or added."""
    distill_from: str | None = _option(None, "Teacher (e.g. the model before the lossy passes).", metavar="MODEL")
    temperature: float = _option(2.0, "Distillation temperature.")
    alpha: float = _option(0.0, "Weight of the task loss when distilling.")
    """The KL term gets 1-alpha."""
    hidden_weight: float = _option(1.0, "Weight of per-module hidden-state matching when distilling (0: logits only).")
    mask: str = _option("random", "MLM masking strategy.", choices=STRATEGIES)
    mask_rate: float = _option(0.15)
    sparse_prediction: str = _option(
        "auto",
        "Run the LM head only where the loss is (masked positions): auto (mlm on cpu/cuda, when it saves 2%+ "
        "of the FLOPs), on, off.",
        choices=("auto", "on", "off"),
    )
    noise: str = _option(
        "span", "seq2seq: T5 span corruption, BART denoising, or none (supervised pairs).", choices=NOISES
    )
    noise_rate: float | None = _option(None, "seq2seq: share of tokens noised (span 0.15, denoise 0.3).")
    mean_span: float = _option(3.0, "seq2seq --noise span: mean span length.")
    target_len: int | None = _option(None, "seq2seq: decoder length (default: what the noise needs).", min=1)
    source_key: str | None = _option(None, "seq2seq --noise none: JSONL field of the source text.", metavar="KEY")
    target_key: str | None = _option(None, "seq2seq --noise none: JSONL field of the target text.", metavar="KEY")
    val_fraction: float = _option(0.05)
    val_batches: int = _option(8, min=1)
    val_every: int | None = _option(None, "Default: a quarter of the run.", min=1)
    log_every: int = _option(10, min=1)
    checkpoint_every: int | None = _option(None, "Steps between checkpoints.", min=1)
    seed: int = _option(0)
    target: str = _option(
        "cpu", "Where to train: torch on cpu/cuda, onnxruntime-training, or TVM (Relax autodiff).", choices=TARGETS
    )
    compile: bool = _option(False, "torch.compile the program (cpu/cuda).")
    amp: bool = _option(False, "bf16 autocast (cuda).")
    text_key: str = _option("text", "JSONL field holding the text.")

    def __post_init__(self):
        def bad(what, hint):
            raise UsageError(f"train: {what}", hint)

        if self.objective not in OBJECTIVES:
            bad(f"unknown objective {self.objective!r}", f"one of {', '.join(OBJECTIVES)}")
        if self.target not in TARGETS:
            bad(f"cannot train on target {self.target!r}", f"one of {', '.join(TARGETS)}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(
                    f"{name} must be a positive integer, got {getattr(self, name)!r}",
                    f"e.g. --{name.replace('_', '-')} 1",
                )
        for name in ("seq_len", "checkpoint_every", "val_every", "warmup"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (0 if name == "warmup" else 1)):
                bad(f"{name} must be a positive integer, got {v!r}", f"e.g. --{name.replace('_', '-')} 100")
        if self.batch_size % self.grad_accum:
            bad(
                f"batch size {self.batch_size} is not divisible by grad-accum {self.grad_accum}",
                "make --batch-size a multiple of --grad-accum",
            )
        if not self.lr > 0:
            bad(f"lr must be > 0, got {self.lr}", "e.g. --lr 3e-4")
        if not 0 <= self.alpha <= 1:
            bad(f"alpha must be in [0, 1], got {self.alpha}", "e.g. --alpha 0.5")
        if self.noise_rate is not None and not 0 < self.noise_rate < 1:
            bad(f"noise rate must be in (0, 1), got {self.noise_rate}", "e.g. --noise-rate 0.15")
        if self.mean_span < 1:
            bad(f"mean span must be at least 1, got {self.mean_span}", "T5 uses --mean-span 3")
        if not 0 < self.mask_rate < 1:
            bad(f"mask rate must be in (0, 1), got {self.mask_rate}", "e.g. --mask-rate 0.15")
        if not 0 <= self.val_fraction < 1:
            bad(f"val fraction must be in [0, 1), got {self.val_fraction}", "e.g. --val-fraction 0.05")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            bad(f"layer decay must be in (0, 1], got {self.layer_decay}", "e.g. --layer-decay 0.8")
        if self.target == "onnxruntime":
            if self.clip:
                bad("--target onnxruntime has no gradient clipping", "pass --clip 0")
            if self.layer_decay is not None or self.weight_decay:
                bad(
                    "--target onnxruntime trains with one AdamW group (no layer decay, no weight decay groups)",
                    "drop --layer-decay / --weight-decay, or train on cpu",
                )
        if self.amp and self.target != "cuda":
            bad("--amp (bf16 autocast) needs --target cuda", "drop --amp on CPU")
        if isinstance(self.trainable, str):
            object.__setattr__(self, "trainable", tuple(p for p in self.trainable.split(",") if p))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The config `to_dict` gave (also after a JSON round trip, which turns tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @property
    def warmup_steps(self) -> int:
        return self.steps // 20 if self.warmup is None else self.warmup

    def lr_at(self, step: int) -> float:
        """Warmup then cosine to min_lr; `step` counts from 0."""
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * t))
