"""Every CUDA path of optpipe, run on the GPU and compared with its CPU result, with a speed table.

    python benchmarks/gpu_check.py                      # all checks on cuda (make gpu-check)
    python benchmarks/gpu_check.py --only cuda-eager,int8-dynamic
    python benchmarks/gpu_check.py --device cpu         # dry run: the same checks, CPU against CPU
    python benchmarks/gpu_check.py --list

Each check is a small function that builds a tiny model (examples/tiny_gpt.py, or a tiny encoder
with a padding mask), runs one optpipe path on the CPU and on the GPU, compares the two with a
tolerance that suits the path (fp32-close for eager, looser for torch.compile, TVM and FlexAttention,
SQNR for int8, 2:4 in fp16 and bf16 autocast), and times both sides (warm-up, then the median of a
few calls, `torch.cuda.synchronize()` around each). Checks run one by one inside try/except, each
under its own time limit (SIGALRM; subprocesses get a timeout), and the whole run stops starting
new checks past `--budget-s` (default 420 s, so `make gpu-check` ends in under 8 minutes).

Output: a markdown table `check | status | parity | cpu ms | gpu ms | speedup | s` where status is
ok, MISMATCH, ERROR or skipped (with the reason); parity is max-abs (and the relative error judged)
or SQNR; the times are one forward (forward + backward for the attention checks, one optimizer step
for the training and parallel ones: from tokens/s, or the ranks' own step times) on each side, and
`s` is the check's wall time, compilation included. Tiny models: the speedups say that a path runs,
not what it gains at scale. `--json FILE` also writes the rows. Exit code 1 on any MISMATCH or
ERROR, else 0. `--device cpu` runs every check with the CPU on both sides: it tests the plumbing
(models, passes, comparisons, launches on gloo) on a machine without a GPU.
Without a CUDA device (and without `--device cpu`) it prints one line,
"gpu-check: no CUDA device; skipped" (plus "(torch X is a CPU-only build)" where that is why), and
exits 0.

The parallel checks go through the runtime's torchrun launcher with NCCL: data parallel through the
CLI (`optpipe train --target cuda --nproc 2`; with one GPU, one torchrun rank of `optpipe train
--target cuda`: NCCL starts, DDP does not wrap a world of one), pipeline and tensor parallelism
through `optpipe.runtime.parallel` with `partition{...,devices=[cuda:0,cuda:1]}` (the CLI's
`--stages` / `--tensor-parallel` train on CPU only). Pipeline parallelism with one GPU runs both
stages on one rank (`ranks=1`); tensor parallelism needs two GPUs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

QUICK = os.path.join(ROOT, "examples", "heal.py") + ":build_quick"  # byte-level GPT, context 32
NO_CUDA_LINE = "gpu-check: no CUDA device; skipped"


# -- the harness -------------------------------------------------------------------------------------------
class Skip(Exception):
    """A check that cannot run here (reason in the message): reported as skipped, not a failure."""


class CheckTimeout(BaseException):
    """A check's time limit passed (SIGALRM). A BaseException, like KeyboardInterrupt, so that code
    which turns every Exception into its own error (the pipeline's PassError) lets it through."""


@dataclasses.dataclass
class Outcome:
    ok: bool
    parity: str
    cpu_ms: float | None = None
    gpu_ms: float | None = None
    note: str = ""


@dataclasses.dataclass
class Row:
    name: str
    status: str
    parity: str = ""
    cpu_ms: float | None = None
    gpu_ms: float | None = None
    note: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("MISMATCH", "ERROR")


CHECKS: dict[str, tuple[Callable, float, str]] = {}
"""name -> (function(ctx) -> Outcome, time limit in seconds, what it covers)."""


def check(name: str, limit: float, what: str):
    def register(fn):
        CHECKS[name] = (fn, limit, what)
        return fn

    return register


class Ctx:
    """What the checks share: the device under test, sizes, a scratch folder and cached models."""

    def __init__(self, device: str, tmp: str, batch: int, seq: int, iters: int, warmup: int):
        self.device = torch.device(device)
        self.dry = self.device.type == "cpu"
        self.tmp, self.batch, self.seq, self.iters, self.warmup = tmp, batch, seq, iters, warmup
        self.gpus = torch.cuda.device_count() if not self.dry else 0
        self.attn_seq = 256
        self.deadline = math.inf
        """When the running check's time limit passes (time.monotonic()): subprocesses stop there."""
        self._cache: dict = {}

    def cached(self, key, build: Callable):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def folder(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        os.makedirs(path, exist_ok=True)
        return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of `fn()` in ms over `iters` calls after `warmup` calls, synchronized."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def max_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (ref.detach().double().cpu() - out.detach().double().cpu()).abs().max().item()


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |ref - out| / max |ref| (scale-free, so logits and small gradients share a tolerance)."""
    return max_abs(ref, out) / max(ref.detach().double().abs().max().item(), 1e-12)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double().cpu(), out.detach().double().cpu()
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def worst_rel(refs: dict[str, torch.Tensor], outs: dict[str, torch.Tensor]) -> tuple[str, float, float]:
    """(name, relative error, max-abs) of the worst-matching tensor of two {name: tensor} dicts. The
    error is scaled by the tensor's max |ref|, but by no less than 1% of the largest one of its kind
    (the part of the name before ":"), so a near-zero gradient's rounding noise is not a mismatch."""
    missing = sorted(set(refs) ^ set(outs))
    if missing:
        raise RuntimeError(f"different tensors on the two sides: {missing[:4]}")
    peak = {n: refs[n].detach().double().abs().max().item() for n in refs}
    kind_peak: dict[str, float] = {}
    for n, v in peak.items():
        kind = n.split(":")[0]
        kind_peak[kind] = max(kind_peak.get(kind, 0.0), v)
    errors = {n: max_abs(refs[n], outs[n]) for n in refs}
    rel = {n: errors[n] / max(peak[n], 0.01 * kind_peak[n.split(":")[0]], 1e-12) for n in refs}
    worst = max(rel, key=rel.get)
    return worst, rel[worst], errors[worst]


def fmt(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.2e}" if abs(x) < 0.01 or abs(x) >= 1e4 else f"{x:.3g}"


def _alarm(signum, frame):
    raise CheckTimeout()


def run_check(name: str, ctx: Ctx, limit: float) -> Row:
    """Run one check under a time limit; whatever goes wrong becomes the row's status."""
    fn = CHECKS[name][0]
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(limit)))
    try:
        out = fn(ctx)
        row = Row(name, "ok" if out.ok else "MISMATCH", out.parity, out.cpu_ms, out.gpu_ms, out.note)
    except Skip as e:
        row = Row(name, "skipped", note=str(e))
    except CheckTimeout:
        row = Row(name, "ERROR", note=f"timed out after {int(limit)} s")
    except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
        text = str(e).strip().splitlines()
        row = Row(name, "ERROR", note=f"{type(e).__name__}: {text[0] if text else ''}"[:300])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    row.seconds = time.perf_counter() - start
    return row


def table(rows: list[Row], ctx: Ctx) -> str:
    side = "gpu" if not ctx.dry else "cpu (dry run)"
    lines = [
        f"| check | status | parity | cpu ms | {side} ms | speedup | s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        status = r.status + (f": {r.note}" if r.note else "")
        speed = f"{r.cpu_ms / r.gpu_ms:.2f}x" if r.cpu_ms and r.gpu_ms else ""
        cpu = f"{r.cpu_ms:.2f}" if r.cpu_ms is not None else ""
        gpu = f"{r.gpu_ms:.2f}" if r.gpu_ms is not None else ""
        lines.append(
            f"| {r.name} | {status.replace('|', '/')} | {r.parity} | {cpu} | {gpu} | {speed} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


# -- models and the two sides ------------------------------------------------------------------------------
class TinyEncoder(torch.nn.Module):
    """A bidirectional encoder whose attention takes a key padding mask (`attention_mask` [B, S],
    1 = token): what linformer needs and what exercises FlexAttention's padding path."""

    def __init__(self, vocab: int = 256, dim: int = 128, heads: int = 4, layers: int = 2, max_len: int = 256):
        super().__init__()
        self.heads = heads
        self.emb, self.pos = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(max_len, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "ln1": torch.nn.LayerNorm(dim),
                    "qkv": torch.nn.Linear(dim, 3 * dim),
                    "proj": torch.nn.Linear(dim, dim),
                    "ln2": torch.nn.LayerNorm(dim),
                    "fc": torch.nn.Linear(dim, 4 * dim),
                    "out": torch.nn.Linear(4 * dim, dim),
                }
            )
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        x = self.emb(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        mask = attention_mask[:, None, None, :].bool()
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).split(x.shape[-1], dim=-1)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk["out"](torch.nn.functional.gelu(blk["fc"](blk["ln2"](x))))
        return self.head(x)


def gpt_program(ctx: Ctx, seq: int | None = None, layers: int = 2):
    """The tiny GPT of examples/tiny_gpt.py (128 wide) with its attention through SDPA (`build_flash`:
    what fuse-attention makes of the hand-written one, so these checks do not depend on that pass),
    captured at [batch, seq]."""
    seq = seq or ctx.seq

    def build():
        import optpipe
        from examples import tiny_gpt

        model, _ = tiny_gpt.build_flash(block_size=max(64, seq), n_layer=layers, n_embd=128, n_head=4)
        ids = torch.randint(0, 256, (ctx.batch, seq), generator=torch.Generator().manual_seed(0))
        return optpipe.capture(model, (ids,))

    return ctx.cached(("gpt", seq, layers), build)


def encoder_program(ctx: Ctx, seq: int):
    def build():
        import optpipe

        torch.manual_seed(0)
        model = TinyEncoder(max_len=seq).eval()
        ids = torch.randint(0, 256, (ctx.batch, seq), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(ctx.batch, seq, dtype=torch.int64)
        mask[1:, seq - seq // 4 :] = 0  # every row but the first ends in padding
        return optpipe.capture(model, (ids, mask))

    return ctx.cached(("encoder", seq), build)


def on_device(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """A copy of `gm` on `device` (the cuda target's own device rewrite), leaving `gm` alone."""
    from optpipe.targets.torch_backend import retarget_device

    return retarget_device(deepcopy(gm), device)


def deepcopy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    with warnings.catch_warnings():  # deep-copying pytree specs trips a torch deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm)


def moved(inputs: tuple, device: torch.device) -> tuple:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def first_tensor(out) -> torch.Tensor:
    """The first tensor of a program's output (a tensor, or nested tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out
    for item in items:
        try:
            return first_tensor(item)
        except (TypeError, StopIteration):
            continue
    raise TypeError(f"no tensor in the output ({type(out).__name__})")


def forward(ctx: Ctx, fn: Callable, inputs: tuple, device: torch.device) -> tuple[torch.Tensor, float]:
    """(output on the CPU, median ms) of `fn(*inputs)` without gradients."""
    with torch.no_grad():
        out = first_tensor(fn(*inputs)).float().cpu()
        ms = time_ms(lambda: fn(*inputs), device, ctx.iters, ctx.warmup)
    return out, ms


def forward_backward(ctx: Ctx, gm, inputs: tuple, device: torch.device) -> tuple[dict, float]:
    """{"output", "grad:<param>"...} on the CPU after one forward and backward of a fixed loss, and
    the median ms of forward+backward."""
    params = dict(gm.named_parameters())
    for p in params.values():
        p.requires_grad_(True)

    def step():
        for p in params.values():
            p.grad = None
        out = first_tensor(gm(*inputs))
        out.float().square().mean().backward()
        return out

    out = step()
    result = {"output": out.detach().float().cpu()}
    result.update({f"grad:{n}": p.grad.float().cpu() for n, p in params.items() if p.grad is not None})
    return result, time_ms(step, device, ctx.iters, ctx.warmup)


# -- the cuda target, TVM ----------------------------------------------------------------------------------
def _torch_target(ctx: Ctx, mode: str, rtol: float) -> Outcome:
    from optpipe.registry import get_target

    program = gpt_program(ctx)
    ref, cpu_ms = forward(ctx, program.gm, program.example_inputs, torch.device("cpu"))
    tgt = get_target("cpu" if ctx.dry else "cuda")
    tgt.available()
    compiled = tgt.compile(dataclasses.replace(program, gm=deepcopy(program.gm)), mode=mode)
    if compiled.info.get("mode") != mode:
        raise RuntimeError(f"the target ran in {compiled.info.get('mode')} mode: {compiled.info.get('reason')}")
    out, gpu_ms = forward(ctx, compiled, tgt.prepare_inputs(program.example_inputs), ctx.device)
    err = rel_err(ref, out)
    return Outcome(err <= rtol, f"max-abs {fmt(max_abs(ref, out))} (rel {fmt(err)} <= {rtol:g})", cpu_ms, gpu_ms)


@check("cuda-eager", 60, "target cuda, mode=eager: the program's logits vs eager CPU (fp32)")
def check_cuda_eager(ctx: Ctx) -> Outcome:
    return _torch_target(ctx, "eager", 1e-4)


@check("cuda-compile", 120, "target cuda, mode=compile (inductor): logits vs eager CPU")
def check_cuda_compile(ctx: Ctx) -> Outcome:
    return _torch_target(ctx, "compile", 1e-3)


@check("tvm-cuda", 180, "target tvm-cuda (Relax, dlight schedules): logits vs eager CPU")
def check_tvm_cuda(ctx: Ctx) -> Outcome:
    from optpipe.errors import UsageError
    from optpipe.registry import get_target

    program = gpt_program(ctx)
    ref, cpu_ms = forward(ctx, program.gm, program.example_inputs, torch.device("cpu"))
    try:
        import tvm
    except ImportError:
        raise Skip("TVM is not installed") from None
    if not ctx.dry and not tvm.runtime.enabled("cuda"):
        raise Skip(f"this TVM build ({tvm.__version__}) has no CUDA runtime: tvm-cuda needs a CUDA-enabled build")
    try:
        tgt = get_target("tvm" if ctx.dry else "tvm-cuda")
        tgt.available()
    except UsageError as e:
        raise Skip(str(e).splitlines()[0]) from None
    compiled = tgt.compile(program)
    out, gpu_ms = forward(ctx, compiled, tgt.prepare_inputs(program.example_inputs), ctx.device)
    err = rel_err(ref, out)
    return Outcome(err <= 1e-3, f"max-abs {fmt(max_abs(ref, out))} (rel {fmt(err)} <= 0.001)", cpu_ms, gpu_ms)


# -- attention kinds (FlexAttention for the sparse ones), forward and backward ----------------------------
ATTENTION = {
    # check name: (kind, options, model, what runs on CUDA)
    "attn-sliding-window": ("sliding-window", "window=64", "gpt", "FlexAttention"),
    "attn-block-sparse": ("block-sparse", "block=64,global-tokens=16", "gpt", "FlexAttention"),
    "attn-random": ("random", "block=64,random=1", "gpt", "FlexAttention"),
    "attn-strided": ("strided", "stride=32", "gpt", "FlexAttention"),
    "attn-sliding-window-padded": ("sliding-window", "window=64", "encoder", "FlexAttention, key padding"),
    "attn-linear": ("linear", "", "gpt", "chunked kernel attention"),
    "attn-performer": ("performer", "features=64", "gpt", "FAVOR+ kernel attention"),
    "attn-linformer": ("linformer", "k=32", "encoder", "projected dense attention, key padding"),
}


def _attention(ctx: Ctx, name: str) -> Outcome:
    import optpipe

    kind, options, model, _ = ATTENTION[name]
    seq = ctx.attn_seq
    base = gpt_program(ctx, seq) if model == "gpt" else encoder_program(ctx, seq)
    opts = ",".join(o for o in (f"kind={kind}", options, f"max-len={seq}" if kind == "linformer" else "") if o)
    text = ("fuse-attention," if model == "encoder" else "") + f"attention{{{opts}}}"
    program, records = optpipe.Pipeline.parse(text).run(base, verify=False)
    stats = records[-1].stats
    if not stats.get("rewritten"):
        reasons = [s.get("reason") for s in records[-1].details.get("sites", []) if s.get("reason")]
        raise RuntimeError(f"{text}: no attention site rewritten {stats} {reasons[:1]}")
    ref, cpu_ms = forward_backward(ctx, program.gm, program.example_inputs, torch.device("cpu"))
    gm = on_device(program.gm, ctx.device)
    out, gpu_ms = forward_backward(ctx, gm, moved(program.example_inputs, ctx.device), ctx.device)
    worst, err, mabs = worst_rel(ref, out)
    rtol = 5e-3
    parity = f"fwd+bwd worst {worst} max-abs {fmt(mabs)} (rel {fmt(err)} <= {rtol:g}); {stats['rewritten']} sites"
    return Outcome(err <= rtol, parity, cpu_ms, gpu_ms)


def _register_attention(name: str) -> None:
    kind, options, model, path = ATTENTION[name]
    check(name, 90, f"attention{{kind={kind}}} on the {model} ({path}), forward + backward vs CPU")(
        lambda ctx: _attention(ctx, name)
    )


# -- int8 (torch._int_mm) and 2:4 semi-structured sparsity ------------------------------------------------
def _int8_weights_use_int_mm(gm, rows: int, scheme: str) -> str | None:
    """None when every int8 weight of `gm` goes through torch._int_mm for `rows` activation rows,
    else the name of one that does not."""
    from optpipe.passes import quantize_ops

    kernel = quantize_ops.int8_dynamic_kernel if scheme == "int8-dynamic" else quantize_ops.int8_static_kernel
    weights = {n: t for n, t in gm.state_dict().items() if t.dtype == torch.int8 and t.dim() == 2}
    if not weights:
        return "<no int8 weight in the program>"
    for name, w in weights.items():
        x = torch.zeros(rows, w.shape[1], device=w.device)
        if kernel(x, w) != "int_mm":
            return f"{name} ({kernel(x, w)})"
    return None


def _quantize(ctx: Ctx, scheme: str) -> Outcome:
    import optpipe

    base = gpt_program(ctx)
    fp32, _ = forward(ctx, base.gm, base.example_inputs, torch.device("cpu"))
    program, _ = optpipe.Pipeline.parse(f"quantize{{scheme={scheme}}}").run(base, verify=False)
    ref, cpu_ms = forward(ctx, program.gm, program.example_inputs, torch.device("cpu"))
    gm = on_device(program.gm, ctx.device)
    out, gpu_ms = forward(ctx, gm, moved(program.example_inputs, ctx.device), ctx.device)
    between, cpu_q, gpu_q = sqnr_db(ref, out), sqnr_db(fp32, ref), sqnr_db(fp32, out)
    ok = between >= 25 and gpu_q >= cpu_q - 3
    note = ""
    if not ctx.dry:
        bad = _int8_weights_use_int_mm(gm, ctx.batch * ctx.seq, scheme)
        if bad:
            ok, note = False, f"not on torch._int_mm: {bad}"
    parity = f"SQNR vs cpu {fmt(between)} dB (>= 25); vs fp32: cpu {fmt(cpu_q)}, gpu {fmt(gpu_q)} dB"
    return Outcome(ok, parity, cpu_ms, gpu_ms, note)


@check("int8-dynamic", 60, "quantize{scheme=int8-dynamic}: torch._int_mm on CUDA vs the CPU kernel (SQNR)")
def check_int8_dynamic(ctx: Ctx) -> Outcome:
    return _quantize(ctx, "int8-dynamic")


@check("int8-static", 60, "quantize{scheme=int8-static}: torch._int_mm on CUDA vs the CPU kernel (SQNR)")
def check_int8_static(ctx: Ctx) -> Outcome:
    return _quantize(ctx, "int8-static")


@check("sparse-2:4", 60, "prune{method=2:4} on a CUDA fp16 program (semi-structured weights) vs CPU fp32 masked")
def check_sparse_24(ctx: Ctx) -> Outcome:
    from torch.sparse import SparseSemiStructuredTensor

    import optpipe

    base = gpt_program(ctx)
    program, _ = optpipe.Pipeline.parse("prune{method=2:4}").run(base, verify=False)
    ref, cpu_ms = forward(ctx, program.gm, program.example_inputs, torch.device("cpu"))
    gm = on_device(base.gm, ctx.device)
    gm = gm if ctx.dry else gm.half()  # sparse tensor cores take fp16/bf16
    inputs = moved(base.example_inputs, ctx.device)
    on_gpu, _ = optpipe.Pipeline.parse("prune{method=2:4}").run(
        dataclasses.replace(base, gm=gm, example_inputs=inputs), verify=False
    )
    semi = sum(isinstance(p, SparseSemiStructuredTensor) for p in on_gpu.gm.parameters())
    out, gpu_ms = forward(ctx, on_gpu.gm, inputs, ctx.device)
    db = sqnr_db(ref, out)
    ok = db >= 30 and (ctx.dry or semi > 0)
    note = "" if ctx.dry or semi else "no weight became semi-structured"
    return Outcome(ok, f"SQNR vs cpu fp32 {fmt(db)} dB (>= 30); {semi} semi-structured weights", cpu_ms, gpu_ms, note)


for _name in ATTENTION:
    _register_attention(_name)


# -- training: cuda and --amp ------------------------------------------------------------------------------
TRAIN = {"steps": 6, "batch_size": 8, "lr": 3e-3, "log_every": 1, "val_batches": 1, "seed": 0}
QUICK_SEQ = 32  # examples/heal.py:build_quick's context


def corpus(ctx: Ctx) -> str:
    def build():
        from optpipe.runtime.data import pydoc_corpus

        path = os.path.join(ctx.folder("data"), "pydoc.txt")
        pydoc_corpus(path)
        return path

    return ctx.cached("corpus", build)


def losses_of(metrics: list[dict]) -> list[float]:
    return [float(r["loss"]) for r in metrics if "loss" in r]


def step_ms(tokens_per_s: float) -> float | None:
    return 1000 * TRAIN["batch_size"] * QUICK_SEQ / tokens_per_s if tokens_per_s else None


def cpu_training(ctx: Ctx):
    """The reference run: `optpipe train` of the byte-level quick GPT on --target cpu."""
    import optpipe

    out = os.path.join(ctx.tmp, "train-cpu")
    return ctx.cached("train-cpu", lambda: optpipe.train(QUICK, corpus(ctx), out, progress=False, force=True, **TRAIN))


def compare_curves(ref: list[float], got: list[float], tol: Callable[[float], float]) -> tuple[bool, str]:
    if len(ref) != len(got) or not ref:
        return False, f"{len(got)} logged losses, the CPU run logged {len(ref)}"
    diffs = [abs(a - b) for a, b in zip(ref, got)]
    ok = all(math.isfinite(b) and d <= tol(a) for a, b, d in zip(ref, got, diffs))
    return (
        ok,
        f"loss curve max abs diff {fmt(max(diffs))} over {len(ref)} steps; last {got[-1]:.4f} vs cpu {ref[-1]:.4f}",
    )


def _train(ctx: Ctx, amp: bool, tol: Callable[[float], float]) -> Outcome:
    import optpipe

    ref = cpu_training(ctx)
    out = os.path.join(ctx.tmp, "train-amp" if amp else "train-cuda")
    target = "cpu" if ctx.dry else "cuda"
    res = optpipe.train(
        QUICK, corpus(ctx), out, target=target, amp=amp and not ctx.dry, progress=False, force=True, **TRAIN
    )
    ok, parity = compare_curves(losses_of(ref.metrics), losses_of(res.metrics), tol)
    note = "dry run: no autocast on cpu" if amp and ctx.dry else ""
    return Outcome(ok, parity, step_ms(ref.tokens_per_s), step_ms(res.tokens_per_s), note)


@check("train-cuda", 90, "optpipe train --target cuda (fp32 AdamW, 6 steps): loss curve vs --target cpu")
def check_train_cuda(ctx: Ctx) -> Outcome:
    return _train(ctx, False, lambda ref: 2e-3 + 1e-3 * abs(ref))


@check("train-amp", 90, "optpipe train --target cuda --amp (bf16 autocast): loss curve vs fp32 cpu")
def check_train_amp(ctx: Ctx) -> Outcome:
    return _train(ctx, True, lambda ref: 0.02 + 0.02 * abs(ref))


# -- NCCL ranks: data, pipeline and tensor parallelism -----------------------------------------------------
def run_command(ctx: Ctx, cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group, bounded by the check's time limit; the whole group (torchrun
    and its ranks) is killed when the limit passes or the check is interrupted."""
    timeout = max(1.0, ctx.deadline - time.monotonic() - 3)
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=ROOT,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()] or ["no message"]
        raise RuntimeError(f"exit {proc.returncode}: {lines[-1]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _train_command(ctx: Ctx, out: str, target: str, nproc: int) -> list[str]:
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]
    args = ["train", QUICK, "--data", corpus(ctx), "--target", target, *options, "--force", "-o", out, "--json"]
    if nproc > 1:
        return [sys.executable, "-m", "optpipe", *args, "--nproc", str(nproc)]
    # one torchrun rank: the CLI trains as rank 0 of a world of 1 (process group on NCCL, no DDP wrap)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "optpipe", *args]


@check("dp-nccl", 120, "optpipe train --target cuda --nproc 2 (torchrun, NCCL, DDP): loss curve vs one CPU process")
def check_data_parallel(ctx: Ctx) -> Outcome:
    ref = cpu_training(ctx)
    out = os.path.join(ctx.tmp, "train-dp")
    nproc, note = 2, ""
    if ctx.dry:
        target, note = "cpu", "dry run: gloo"
    else:
        target = "cuda"
        if ctx.gpus < 2:
            nproc, note = 1, "1 GPU: one NCCL rank, no DDP (2 ranks need 2 GPUs)"
    proc = run_command(ctx, _train_command(ctx, out, target, nproc), {"OPTPIPE_TRAIN_TARGET": target})
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    docs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    tokens_per_s = docs[-1].get("tokens_per_s") if docs else None
    ok, parity = compare_curves(losses_of(ref.metrics), losses_of(metrics), lambda r: 2e-3 + 1e-3 * abs(r))
    return Outcome(ok, parity, step_ms(ref.tokens_per_s), step_ms(tokens_per_s), note)


def one_process(gm, batches: list[dict], lr: float) -> tuple[list[float], dict, float]:
    """(losses, final weights, ms per step) of plain SGD on a copy of `gm` in this process (CPU)."""
    from examples.tiny_gpt import sgd_steps

    gm = deepcopy(gm)
    start = time.perf_counter()
    losses = sgd_steps(gm, batches, lr)
    ms = (time.perf_counter() - start) * 1000 / len(batches)
    return losses, {n: p.detach().clone() for n, p in gm.named_parameters()}, ms


def _parallel(ctx: Ctx, strategy: str) -> Outcome:
    import optpipe
    from examples import tiny_gpt
    from optpipe.runtime import parallel

    program = gpt_program(ctx, seq=64, layers=4)
    batches, lr = tiny_gpt.lm_batches(3, 8, seq=64), 0.05
    ranks, note = 2, "dry run: gloo" if ctx.dry else ""
    devices = ["cpu", "cpu"] if ctx.dry else ["cuda:0", "cuda:1"]
    if not ctx.dry and ctx.gpus < 2:
        if strategy == "tensor":
            raise Skip("needs 2 GPUs")
        devices, ranks, note = ["cuda:0", "cuda:0"], 1, "1 GPU: both stages on one NCCL rank"
    spec = "stages=2,microbatches=4" if strategy == "pipeline" else "strategy=tensor,ways=2"
    part, _ = optpipe.Pipeline.parse(f"partition{{{spec},devices=[{','.join(devices)}]}}").run(program, verify=False)
    if strategy == "pipeline":
        res = parallel.pipeline_train(part, batches, microbatches=4, ranks=ranks, lr=lr, optimizer="sgd", timeout=60)
    else:
        res = parallel.tensor_train(part, batches, ways=2, lr=lr, optimizer="sgd", timeout=60)
    losses, weights, cpu_ms = one_process(program.gm, batches, lr)
    common = {n: w for n, w in weights.items() if n in res["weights"]}
    if not common:
        raise RuntimeError("the parallel run returned no weight the program has")
    worst, err, _ = worst_rel(common, {n: res["weights"][n] for n in common})
    dloss = max(abs(a - b) for a, b in zip(losses, res["losses"]))
    tol = 1e-5 if ctx.dry else 1e-4
    ok = len(res["losses"]) == len(losses) and dloss <= tol and err <= (1e-4 if ctx.dry else 1e-3)
    seconds = res.get("seconds")
    gpu_ms = 1000 * statistics.mean(seconds) if isinstance(seconds, list) and seconds else None
    parity = f"losses max abs diff {fmt(dloss)} (<= {tol:g}); weights worst {worst} rel {fmt(err)}"
    return Outcome(ok, parity, cpu_ms, gpu_ms, note)


@check("pipeline-nccl", 120, "pipeline_train, 2 stages on cuda (NCCL, 1F1B): losses and weights vs one CPU process")
def check_pipeline_parallel(ctx: Ctx) -> Outcome:
    return _parallel(ctx, "pipeline")


@check("tensor-nccl", 120, "tensor_train, 2-way tensor parallel on cuda (NCCL, DTensor): vs one CPU process")
def check_tensor_parallel(ctx: Ctx) -> Outcome:
    return _parallel(ctx, "tensor")


ORDER = (  # cheap first, so that a run cut short by --budget-s has covered the most paths
    "cuda-eager",
    "int8-dynamic",
    "int8-static",
    "sparse-2:4",
    "train-cuda",
    "train-amp",
    "dp-nccl",
    "pipeline-nccl",
    "tensor-nccl",
    "cuda-compile",
    *ATTENTION,  # a FlexAttention compile (forward and backward) per sparse kind
    "tvm-cuda",  # last: the longest build, and it needs a TVM built with CUDA
)
for _name in ORDER:
    CHECKS[_name] = CHECKS.pop(_name)


# -- main --------------------------------------------------------------------------------------------------
def selected(only: str | None) -> list[str]:
    if not only:
        return list(CHECKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"gpu-check: unknown check(s) {', '.join(unknown)}; --list shows them")
    return names


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated checks to run (default: all; --list shows them)")
    ap.add_argument("--list", action="store_true", help="list the checks and what each covers")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: dry run, CPU against CPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no check starts after this many seconds")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--attn-seq", type=int, default=256, help="sequence length of the attention checks")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per side (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return ap.parse_args(argv)


def run_all(args, names: list[str], tmp: str) -> tuple[list[Row], Ctx]:
    ctx = Ctx(args.device, tmp, args.batch, args.seq, args.iters, args.warmup)
    ctx.attn_seq = args.attn_seq
    start, rows = time.monotonic(), []
    for name in names:
        remaining = args.budget_s - (time.monotonic() - start)
        if remaining < 10:
            rows.append(Row(name, "skipped", note=f"over the --budget-s {args.budget_s:g} s time budget"))
            continue
        limit = min(CHECKS[name][1], remaining)
        ctx.deadline = time.monotonic() + limit
        r = run_check(name, ctx, limit)
        if r.note.startswith("timed out") and limit < CHECKS[name][1]:  # cut by the run's budget, not its own
            r.status, r.note = "skipped", f"the --budget-s {args.budget_s:g} s time budget ran out after {int(limit)} s"
        rows.append(r)
        print(f"gpu-check: {name}: {r.status} {r.note} ({r.seconds:.1f} s)".rstrip(), file=sys.stderr, flush=True)
    return rows, ctx


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, (_, limit, what) in CHECKS.items():
            print(f"{name:28s} {what} (limit {limit:g} s)")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        # a CPU-only build on a GPU machine (constraints.txt pins one) must not pass for "no GPU"
        cpu_build = f" (torch {torch.__version__} is a CPU-only build)" if torch.version.cuda is None else ""
        print(NO_CUDA_LINE + cpu_build)
        return 0
    names = selected(args.only)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "dry run on cpu"
    print(f"gpu-check: torch {torch.__version__}, {where}, {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows, ctx = run_all(args, names, tmp)
    print(table(rows, ctx))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    failed = [r.name for r in rows if r.failed]
    if failed:
        print(f"gpu-check: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
