"""The quantized operators that the `quantize` pass inserts, with their CPU kernels.

    optpipe.linear_int8_dynamic(x, weight[N,K] int8, weight_scale[N], bias?)      int8 x int8 matmul
    optpipe.linear_int8_static(x, weight[N,K] int8, weight_scale[N], act_qparams[2], act_smooth[K]?, bias?)
    optpipe.linear_int8_weight(x, weight[N,K] int8, weight_scale[N], bias?)       weight-only int8
    optpipe.linear_int4_weight(x, weight[N,K/2] uint8, qparams[N,K/g,2], bias?, group)
    optpipe.embedding_int8(weight[V,D] int8, weight_scale[V], indices)           int8 rows, per-row scale

Weights: int8 symmetric per output channel (`w ≈ q · scale[n]`, q in [-127, 127]); int4
asymmetric per group of `group` input channels (`w ≈ (u - zero[n, g]) · scale[n, g]`, g = k // group,
u in [0, 15], two per byte, the even k in the low nibble; scale and zero stored as qparams[n, g, :]).

int8-dynamic activations (per token): each token row is divided by its own max |x| (so every row
lies in [-1, 1]), then quantized with FIXED parameters — uint8, scale 1/127, zero point 128 (levels
1..255: symmetric int8 stored as uint8, the same numbers as the CUDA kernel's symmetric int8 with
scale max|x|/127) — multiplied by the int8 weight with int32 accumulation, and rescaled by
row max / 127 · weight scale. No statistic is taken across rows, so a token's output depends on that
token alone: a one-token decode step over a kv-cache quantizes it exactly as the full-sequence run
does, and a batched request does not depend on what it is batched with. (A per-tensor dynamic range
over the normalized rows — what DynamicQuantizeLinear or oneDNN's dynamic linear would compute —
is NOT per token: it moves with the other rows of the call.) Constant quantization parameters let
the static u8 x s8 kernels (oneDNN's qlinear, ORT's QuantizeLinear + MatMulInteger) serve the scheme.
Measured on this CPU (1 thread, 1024x384x1536, with oneDNN's dynamic linear, which the static kernel
replaced): fp32 linear 25 ms, oneDNN int8 2.7 ms + 1.3 ms of normalization, `torch._int_mm` 14 ms +
quantize/dequantize 40 ms, `aten._weight_int8pack_mm` 800 ms (no fast path here).

int8-static activations: one calibrated per-tensor uint8 (scale, zero point) per linear input
(act_qparams = [scale, zero point], fp32), xq = clamp(round(x / scale) + zero, 0, 255) as ONNX
QuantizeLinear, int32 accumulation, rescaled by scale · weight scale. No reduction over x at run
time: on this CPU (1 thread, 1024x384x1536) 1.5 ms vs 3.1 ms for int8-dynamic and 9.8 ms fp32.
With SmoothQuant smoothing (act_smooth[K], chosen by the pass) x is divided by it first, and the
weight was multiplied by it before quantization.

Kernels: both int8 activation ops quantize x (int8-dynamic: x / row max) with
`torch.quantize_per_tensor` and run oneDNN's `onednn.qlinear_pointwise` (u8 x s8, fp32 output, weight
scales in its epilogue) on weights prepacked once for oneDNN (cached per weight tensor, so the saved
program stores plain int8 buffers only). On CUDA both run `torch._int_mm` (int8 x int8 -> int32;
int8-dynamic symmetric per token, int8-static with the zero point folded in through the weight's row
sums) when there are more than 16 rows and K, N are multiples of 8. Other devices/dtypes/shapes, or a
torch without oneDNN, run the decomposition. The weight-only ops dequantize on the fly in plain torch
(their point is memory, not CPU speed: torch's int4/int8 packed CPU kernels were 30-100x slower than
fp32 here). Every op's decomposition is plain ATen (no amax, no bit shifts: TVM's importer lacks them)
and is what ONNX Runtime and TVM lower; for ONNX Runtime, `linear_int8_dynamic` has a native lowering
to Div (per token) + QuantizeLinear (constant scale and zero point) + MatMulInteger,
`linear_int8_static` to QuantizeLinear + MatMulInteger and `linear_int4_weight` to ORT's
`com.microsoft::MatMulNBits` (block-wise int4; ORT 1.19's CPU kernel takes bits=4 only, so
int8-weight keeps its decomposition there).

Autograd: the activations and the bias get gradients (straight through the dequantized weight), so
a quantized model can still be fine-tuned around its frozen int8/int4 weights (adapters, biases).

On an x86 CPU without VNNI (AVX2 only), u8 x s8 int8 GEMMs (oneDNN's, and MLAS's behind ORT's
MatMulInteger) sum products pairwise in saturating int16 (vpmaddubsw): 22-25 dB against exact int8
math. There the CPU kernels fall back to the exact reference, and both int8 ORT lowerings run u8 x u8
around zero point 128, which MLAS sums exactly (HAS_EXACT_INT8_DOT).
"""

from __future__ import annotations

import functools
import platform
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F

from optpipe.ops import defer_lowerings, define_op, register_lowering

ROW_EPS = 1e-12
"""Floor of a token's max |x| (an all-zero row stays zero instead of dividing by zero)."""
ACT_SCALE = 1 / 127
ACT_ZERO = 128
"""int8-dynamic's fixed uint8 quantizer of x / max|x| (in [-1, 1]): levels 1..255, symmetric around 128."""
INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


# -- weight quantization (used by the pass; plain torch) -------------------------------------------------
def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N,K], scale fp32 [N]) with weight ≈ q * scale[:, None], symmetric, q in [-127, 127]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4_grouped(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [N,K/2], qparams fp32 [N,K/group,2] = (scale, zero point)): asymmetric int4
    per group of input channels, w ≈ (u - zero) * scale with u in [0, 15].

    Asymmetric, with the range shrunk per group to the clip (of `INT4_CLIPS`) of least squared
    error: on MiniLM (group 32) sentence-embedding cosine 0.975, vs 0.958 for symmetric abs-max."""
    w = weight.detach().float()
    n, k = w.shape
    grouped = w.reshape(n, k // group, group)
    lo0, hi0 = grouped.amin(-1, keepdim=True).clamp(max=0), grouped.amax(-1, keepdim=True).clamp(min=0)
    best = None
    for clip in INT4_CLIPS:
        scale = ((hi0 - lo0) * clip / 15).clamp(min=torch.finfo(torch.float32).tiny)
        zero = torch.round(-lo0 * clip / scale).clamp(0, 15)
        u = (torch.round(grouped / scale) + zero).clamp(0, 15)
        err = ((u - zero) * scale - grouped).pow(2).sum(-1, keepdim=True)
        if best is None:
            best = [err, u, scale, zero]
        else:
            better = err < best[0]
            best = [torch.where(better, new, old) for new, old in zip((err, u, scale, zero), best)]
    _, u, scale, zero = best
    q = u.reshape(n, k).to(torch.int32)
    packed = q[:, 0::2] + q[:, 1::2] * 16
    qparams = torch.cat([scale, zero], dim=-1)
    return packed.to(torch.uint8).contiguous(), qparams.contiguous()


def dequantize_int4(packed: torch.Tensor, qparams: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] weights from int4 nibbles; arithmetic instead of shifts so every target takes it."""
    p = packed.to(torch.int32)
    high = torch.div(p, 16, rounding_mode="floor")
    low = p - high * 16
    n = packed.shape[0]
    u = torch.stack([low, high], dim=-1).reshape(n, qparams.shape[1], group).to(dtype)  # [N, K/g, g]
    qp = qparams.to(dtype)
    return ((u - qp[..., 1:]) * qp[..., :1]).reshape(n, -1)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype) * scale.to(dtype)[:, None]


def _add_bias(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y * scale (+ bias), one fused pass where there is a bias."""
    return y * scale if bias is None else torch.addcmul(bias.to(y.dtype), y, scale)


# -- int8-dynamic ----------------------------------------------------------------------------------------
def _row_max(x: torch.Tensor) -> torch.Tensor:
    # max over |x| rather than amax: TVM's importer takes aten.max.dim, not aten.amax
    return x.abs().max(dim=-1, keepdim=True).values.clamp(min=ROW_EPS)


def int8_dynamic_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The decomposition: per-token normalization, uint8 activations with the fixed (scale 1/127,
    zero point 128) as ONNX QuantizeLinear, an integer-valued matmul in x's dtype (exact up to fp32
    rounding of the int32 sums). Row by row: nothing is reduced across tokens."""
    row = _row_max(x)
    centered = torch.round(x / row / ACT_SCALE).clamp(-ACT_ZERO, 255 - ACT_ZERO)  # xq - zero point
    acc = F.linear(centered, weight.to(x.dtype))
    return _add_bias(acc * (row * ACT_SCALE), weight_scale.to(x.dtype), bias)


class _PrepackCache:
    """oneDNN-prepacked weights per int8 weight tensor, dropped when the tensor dies and rebuilt
    when it is modified in place (its version counter moves)."""

    def __init__(self, prepack) -> None:
        self._prepack = prepack
        self._entries: dict[int, tuple[weakref.ref, tuple, object]] = {}
        self._lock = threading.Lock()

    def get(self, weight: torch.Tensor, scale: torch.Tensor):
        key = id(weight)
        state = (weight._version, scale._version, scale.data_ptr(), weight.data_ptr())
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == state:
            return entry[2]
        packed = self._prepack(weight, scale)
        with self._lock:
            self._entries[key] = (weakref.ref(weight, lambda _ref, k=key: self._drop(k, _ref)), state, packed)
        return packed

    def _drop(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            if key in self._entries and self._entries[key][0] is ref:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


def _prepack(weight: torch.Tensor, scale: torch.Tensor):
    return torch.ops.onednn.qlinear_prepack(weight, None)


PREPACKED = _PrepackCache(_prepack)


def _exact_int8_dot_products() -> bool:
    """Whether this CPU sums u8 x s8 products exactly in oneDNN: with VNNI (or AMX) it does. Without
    (AVX2-only x86), oneDNN goes through vpmaddubsw, whose pairwise int16 sums saturate: 25 dB
    against exact int8 math instead of > 60, so the exact reference kernel runs instead."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: trust the build
        return True
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


HAS_EXACT_INT8_DOT = _exact_int8_dot_products()
HAS_ONEDNN = (
    "onednn" in torch.backends.quantized.supported_engines
    and hasattr(torch.ops.onednn, "qlinear_pointwise")
    and HAS_EXACT_INT8_DOT
)


def _uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.int8


def _int_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._int_mm's cuBLAS int8 GEMM wants more than 16 rows and K, N multiples of 8."""
    rows = x.numel() // max(x.shape[-1], 1)
    return rows > 16 and x.shape[-1] % 8 == 0 and weight.shape[0] % 8 == 0


def int8_dynamic_int_mm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The CUDA kernel: symmetric int8 per token (scale max|x|/127), `torch._int_mm` int8 x int8 ->
    int32, rescaled per token and per output channel. Device-agnostic (also runs, slowly, on CPU)."""
    x2 = x.reshape(-1, x.shape[-1])
    row = x2.abs().amax(-1, keepdim=True).clamp(min=ROW_EPS) / 127
    xq = torch.round(x2 / row).clamp_(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, weight.t())
    y = acc.to(x.dtype).mul_(row.to(x.dtype)).mul_(weight_scale.to(x.dtype))
    y = y if bias is None else y.add_(bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def int8_dynamic_kernel(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which kernel `linear_int8_dynamic` runs: "int_mm" (CUDA), "onednn" (CPU) or "reference"."""
    if x.is_cuda and weight.dtype == torch.int8 and _int_mm_fits(x, weight):
        return "int_mm"
    return "onednn" if _uses_onednn(x, weight) else "reference"


def linear_int8_dynamic_impl(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    kernel = int8_dynamic_kernel(x, weight)
    if kernel == "int_mm":
        return int8_dynamic_int_mm(x, weight, weight_scale, bias)
    if kernel == "reference":
        return int8_dynamic_reference(x, weight, weight_scale, bias)
    # max |x| per row from two reductions: x.abs() would allocate an x-sized temporary per call
    row = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_(min=ROW_EPS)
    y = onednn_linear(x / row, ACT_SCALE, ACT_ZERO, weight, weight_scale, None)
    # in place: a fresh [M, N] output per call costs page faults that outweigh the arithmetic
    y.mul_(row)
    return y if bias is None else y.add_(bias)


def onednn_linear(
    x: torch.Tensor,
    act_scale: float,
    zero: int,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x quantized per tensor with (act_scale, zero) to uint8, then oneDNN u8 x s8 with fp32 output:
    per-channel weight scales and the bias applied in its epilogue."""
    with warnings.catch_warnings():  # quantized tensor constructors are deprecated, the kernels are not
        warnings.simplefilter("ignore")
        xq = torch.quantize_per_tensor(x.contiguous(), act_scale, zero, torch.quint8).int_repr()
    return torch.ops.onednn.qlinear_pointwise(
        xq,
        act_scale,
        zero,
        PREPACKED.get(weight, weight_scale),
        weight_scale,
        _zeros(weight.shape[0]),
        bias,
        1.0,
        0,
        x.dtype,
        "none",
        [],
        "",
    )


@functools.lru_cache(maxsize=256)
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def _linear_fake(x, weight, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _save_weights(ctx, inputs, output) -> None:
    x, weight, weight_scale, bias = inputs[:4]
    ctx.save_for_backward(weight, weight_scale)
    ctx.group = inputs[4] if len(inputs) > 4 else 0
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _straight_through(ctx, grad: torch.Tensor):
    """dL/dx = grad @ dequant(W); dL/dbias = sum of grad; the quantized weights get none."""
    weight, weight_scale = ctx.saved_tensors
    if ctx.group:
        dense = dequantize_int4(weight, weight_scale, ctx.group, grad.dtype)
    else:
        dense = dequantize_int8(weight, weight_scale, grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    grads = (grad @ dense, None, None, grad_bias)
    return grads + (None,) if ctx.group else grads


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    return 2 * tokens * x_shape[-1] * w_shape[0]


def _int4_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _linear_flops(x_shape, (w_shape[0],), out_shape=out_shape)


linear_int8_dynamic = define_op(
    "linear_int8_dynamic",
    linear_int8_dynamic_impl,
    fake=_linear_fake,
    decomposition=int8_dynamic_reference,
    backward=_straight_through,
    setup_context=_save_weights,
    flops=_linear_flops,
    exact_outputs=False,
)


# -- int8-static ---------------------------------------------------------------------------------------------
def int8_static_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    act_qparams: torch.Tensor,
    act_smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The decomposition: x (divided per input channel by `act_smooth`, when given) quantized with
    the calibrated per-tensor (scale, zero point) to uint8 (as ONNX QuantizeLinear: round half to
    even, saturate), an integer-valued matmul, rescaled."""
    qp = act_qparams.to(x.dtype)
    act_scale, zero = qp[0], qp[1]
    if act_smooth is not None:
        x = x / act_smooth.to(x.dtype)
    centered = torch.round(x / act_scale).add(zero).clamp(0, 255) - zero  # xq - zero point
    acc = F.linear(centered, weight.to(x.dtype))
    return _add_bias(acc, act_scale * weight_scale.to(x.dtype), bias)


def int8_static_int_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    act_qparams: torch.Tensor,
    act_smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The CUDA kernel: uint8 levels shifted to int8 (xq - 128), `torch._int_mm`, and the zero
    point folded back in through the weight's row sums: Σ(xq - z)w = Σ(xq - 128)w - (z - 128)Σw."""
    act_scale, zero = act_qparams[0], act_qparams[1]
    x2 = x.reshape(-1, x.shape[-1])
    if act_smooth is not None:
        x2 = x2 / act_smooth.to(x.dtype)
    xq = torch.round(x2 / act_scale.to(x.dtype)).add_(zero).clamp_(0, 255).sub_(128).to(torch.int8)
    acc = torch._int_mm(xq, weight.t())
    acc = acc - (zero - 128).to(torch.int32) * weight.sum(1, dtype=torch.int32)
    y = acc.to(x.dtype).mul_((act_scale * weight_scale).to(x.dtype))
    y = y if bias is None else y.add_(bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def int8_static_kernel(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which kernel `linear_int8_static` runs: "int_mm" (CUDA), "onednn" (CPU) or "reference"."""
    if x.is_cuda and weight.dtype == torch.int8 and _int_mm_fits(x, weight):
        return "int_mm"
    return "onednn" if _uses_onednn(x, weight) else "reference"


def linear_int8_static_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    act_qparams: torch.Tensor,
    act_smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    kernel = int8_static_kernel(x, weight)
    if kernel == "int_mm":
        return int8_static_int_mm(x, weight, weight_scale, act_qparams, act_smooth, bias)
    if kernel == "reference":
        return int8_static_reference(x, weight, weight_scale, act_qparams, act_smooth, bias)
    act_scale, zero = act_qparams.tolist()
    # a division then a per-tensor quantizer: torch's per-channel quantizer (one pass in principle)
    # measured 5x slower than both together
    return onednn_linear(x if act_smooth is None else x / act_smooth, act_scale, int(zero), weight, weight_scale, bias)


def _static_fake(x, weight, weight_scale, act_qparams, act_smooth, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _save_static(ctx, inputs, output) -> None:
    x, weight, weight_scale, _, act_smooth, bias = inputs
    ctx.save_for_backward(weight, weight_scale, act_smooth)
    ctx.has_bias = bias is not None


def _static_straight_through(ctx, grad: torch.Tensor):
    """As the other linears, through the effective weight dequant(W) / smooth; the clipping of x is
    passed straight through too."""
    weight, weight_scale, act_smooth = ctx.saved_tensors
    grad_x = grad @ dequantize_int8(weight, weight_scale, grad.dtype)
    if act_smooth is not None:
        grad_x = grad_x / act_smooth.to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_bias


def _static_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _linear_flops(x_shape, w_shape)


linear_int8_static = define_op(
    "linear_int8_static",
    linear_int8_static_impl,
    fake=_static_fake,
    decomposition=int8_static_reference,
    backward=_static_straight_through,
    setup_context=_save_static,
    flops=_static_flops,
    exact_outputs=False,
)


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s = max|x|^α / max|W|^(1-α): x / s has its outlier
    channels tamed, W · s takes them on (per output channel quantization absorbs that well)."""
    x_absmax, w_absmax = x_absmax.float(), w_absmax.float()
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    dead = (x_absmax == 0) | (w_absmax == 0)
    return torch.where(dead, torch.ones_like(s), s).clamp(1e-4, 1e4)


def calibrated_qparams(lo: float, hi: float) -> torch.Tensor:
    """(scale, zero point) as fp32 [2] for uint8 levels covering [min(lo, 0), max(hi, 0)] (zero exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255, torch.finfo(torch.float32).tiny)
    zero = min(max(round(-lo / scale), 0), 255)
    return torch.tensor([scale, float(zero)], dtype=torch.float32)


ACT_SHRINK = tuple(1 - 0.02 * i for i in range(40))
"""Candidate clipping ranges (fractions of the observed [min, max]) searched by `mse_range`."""


def mse_range(sample: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """The [lo', hi'] (each end shrunk by the same fraction of `ACT_SHRINK`) whose uint8 quantization
    of `sample` has the least squared error, clipping included."""
    best, best_err = (lo, hi), None
    for shrink in ACT_SHRINK:
        qp = calibrated_qparams(lo * shrink, hi * shrink)
        scale, zero = qp[0], qp[1]
        deq = (torch.round(sample / scale).add(zero).clamp(0, 255) - zero) * scale
        err = float((deq - sample).pow(2).sum())
        if best_err is None or err < best_err:
            best, best_err = (lo * shrink, hi * shrink), err
    return best


# -- weight-only -------------------------------------------------------------------------------------------
def linear_int8_weight_impl(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ int8ᵀ in x's dtype, scaled per output channel afterwards (one [M,N] pass, not [N,K])."""
    return _add_bias(F.linear(x, weight.to(x.dtype)), weight_scale.to(x.dtype), bias)


def linear_int4_weight_impl(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, group: int
) -> torch.Tensor:
    """Unpack and dequantize the int4 groups, then one dense matmul."""
    out = F.linear(x, dequantize_int4(weight, weight_scale, group, x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


def _int4_fake(x, weight, weight_scale, bias, group):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear_int8_weight = define_op(
    "linear_int8_weight",
    linear_int8_weight_impl,
    fake=_linear_fake,
    decomposition=linear_int8_weight_impl,
    backward=_straight_through,
    setup_context=_save_weights,
    flops=_linear_flops,
)
linear_int4_weight = define_op(
    "linear_int4_weight",
    linear_int4_weight_impl,
    fake=_int4_fake,
    decomposition=linear_int4_weight_impl,
    backward=_straight_through,
    setup_context=_save_weights,
    flops=_int4_flops,
)


# -- embeddings ---------------------------------------------------------------------------------------------
def embedding_int8_impl(weight: torch.Tensor, weight_scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather int8 rows and their scales, dequantize only what was gathered."""
    rows = F.embedding(indices, weight).to(weight_scale.dtype)
    return rows * F.embedding(indices, weight_scale[:, None])


def _embedding_fake(weight, weight_scale, indices):
    return weight_scale.new_empty((*indices.shape, weight.shape[1]))


embedding_int8 = define_op(
    "embedding_int8", embedding_int8_impl, fake=_embedding_fake, decomposition=embedding_int8_impl
)


QUANTIZED_LINEARS = (linear_int8_dynamic, linear_int8_static, linear_int8_weight, linear_int4_weight)


# -- native lowerings ---------------------------------------------------------------------------------------
def _register_onnx_lowering() -> None:
    """int8-dynamic on ONNX Runtime as Div + QuantizeLinear + MatMulInteger (ORT's int8 GEMM) instead
    of its fp32 decomposition, int8-static as QuantizeLinear + MatMulInteger, int4-weight as
    com.microsoft::MatMulNBits. Each a traced onnxscript function (plain Python over `op.*`), so the
    optional bias is a Python `None` test rather than an ONNX optional."""
    try:
        import onnxscript
    except ImportError:  # the onnxruntime target is optional: the decomposition still lowers
        return
    op = onnxscript.opset18
    register_lowering(linear_int8_dynamic, "onnxruntime", _linear_int8_dynamic_onnx(op))
    register_lowering(linear_int8_static, "onnxruntime", _linear_int8_static_onnx(op))
    register_lowering(linear_int4_weight, "onnxruntime", _linear_int4_weight_onnx(op))


def _linear_int8_dynamic_onnx(op):
    """int8-dynamic as Div (per token) + QuantizeLinear (constant scale and zero point) + MatMulInteger,
    over opset `op`. Not DynamicQuantizeLinear: its range over the whole call would make a token's
    output depend on the other tokens (a decode step would not match the full-sequence run)."""
    from onnxscript import FLOAT, INT8

    def linear_int8_dynamic_onnx(x: FLOAT, weight: INT8, weight_scale: FLOAT, bias: FLOAT | None = None) -> FLOAT:
        row = op.Max(
            op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=ROW_EPS)
        )
        act_scale = op.Constant(value_float=ACT_SCALE)
        zero = op.Cast(op.Constant(value_int=ACT_ZERO), to=UINT8_TYPE)
        acc = _matmul_integer_u8(op, op.QuantizeLinear(op.Div(x, row), act_scale, zero), weight, zero)
        y = op.Mul(op.Mul(op.Cast(acc, to=1), op.Mul(act_scale, weight_scale)), row)
        return y if bias is None else op.Add(y, bias)

    return linear_int8_dynamic_onnx


def _matmul_integer_u8(op, xq, weight, zero):
    """MatMulInteger of uint8 xq (zero point `zero`) by int8 weight[N, K]ᵀ. Without exact u8 x s8 dot
    products (HAS_EXACT_INT8_DOT), u8 x u8 around zero point 128: MLAS's u8s8 AVX2 kernel saturates
    (vpmaddubsw), u8u8 does not."""
    if HAS_EXACT_INT8_DOT:
        return op.MatMulInteger(xq, op.Transpose(weight, perm=[1, 0]), zero)
    shifted = op.Add(op.Cast(weight, to=INT64_TYPE), op.Constant(value_int=128))  # folded at load
    weight_u8 = op.Cast(op.Transpose(shifted, perm=[1, 0]), to=UINT8_TYPE)
    return op.MatMulInteger(xq, weight_u8, zero, op.Cast(op.Constant(value_int=128), to=UINT8_TYPE))


def _linear_int8_static_onnx(op):
    """int8-static as QuantizeLinear (calibrated scale and zero point) + MatMulInteger, over opset `op`."""
    from onnxscript import FLOAT, INT8

    def linear_int8_static_onnx(
        x: FLOAT,
        weight: INT8,
        weight_scale: FLOAT,
        act_qparams: FLOAT,
        act_smooth: FLOAT | None = None,
        bias: FLOAT | None = None,
    ) -> FLOAT:
        act_scale = op.Gather(act_qparams, op.Constant(value_int=0))
        zero = op.Cast(op.Gather(act_qparams, op.Constant(value_int=1)), to=UINT8_TYPE)
        # Div + per-tensor QuantizeLinear: a per-axis QuantizeLinear over the smoothing ran 3.5x slower in
        # ORT 1.19 (22 vs 6 ms, one 1024x384x1536 linear, 1 thread)
        xq = op.QuantizeLinear(x if act_smooth is None else op.Div(x, act_smooth), act_scale, zero)
        acc = _matmul_integer_u8(op, xq, weight, zero)
        y = op.Mul(op.Cast(acc, to=1), op.Mul(act_scale, weight_scale))
        return y if bias is None else op.Add(y, bias)

    return linear_int8_static_onnx


def _linear_int4_weight_onnx(op):
    """int4-weight as com.microsoft::MatMulNBits, over opset `op`."""
    import onnxscript
    from onnxscript import FLOAT

    matmul_nbits = onnxscript.values.Op(
        onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema()
    )

    def linear_int4_weight_onnx(x: FLOAT, weight, qparams: FLOAT, bias: FLOAT | None = None, group: int = 128) -> FLOAT:
        """ORT's block-wise int4 GEMM, com.microsoft::MatMulNBits: B is [N, K/group, group/2] (our
        [N, K/2] nibbles regrouped, same nibble order), scales [N·K/group], zero points packed two
        per byte per row. The regrouping is constant-folded into the initializers."""
        n, half_k = (int(d) for d in weight.shape)
        k, blocks = 2 * half_k, 2 * half_k // group
        packed = op.Reshape(weight, op.Constant(value_ints=[n, blocks, group // 2]))
        scales = op.Reshape(
            op.Slice(qparams, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[2])),
            op.Constant(value_ints=[-1]),
        )
        zeros = op.Reshape(
            op.Slice(qparams, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]), op.Constant(value_ints=[2])),
            op.Constant(value_ints=[n, blocks]),
        )
        if blocks % 2:  # a row's zero points fill whole bytes: pad the last nibble
            zeros = op.Pad(zeros, op.Constant(value_ints=[0, 0, 0, 1]), op.Constant(value_float=8.0))
        even = op.Slice(
            zeros,
            op.Constant(value_ints=[0]),
            op.Constant(value_ints=[blocks + 1]),
            op.Constant(value_ints=[1]),
            op.Constant(value_ints=[2]),
        )
        odd = op.Slice(
            zeros,
            op.Constant(value_ints=[1]),
            op.Constant(value_ints=[blocks + 1]),
            op.Constant(value_ints=[1]),
            op.Constant(value_ints=[2]),
        )
        zero_points = op.Cast(
            op.Reshape(op.Add(even, op.Mul(odd, op.Constant(value_float=16.0))), op.Constant(value_ints=[-1])),
            to=UINT8_TYPE,
        )
        y = matmul_nbits(x, packed, scales, zero_points, K=k, N=n, bits=4, block_size=group)
        return y if bias is None else op.Add(y, bias)

    return linear_int4_weight_onnx


def _matmul_nbits_schema():
    """ORT 1.19's com.microsoft::MatMulNBits, as far as we call it (the onnx registry lacks ORT's
    contrib ops, and onnxscript needs a schema to tell inputs from attributes)."""
    import onnx.defs as defs

    schema, param = defs.OpSchema, defs.OpSchema.FormalParameter
    optional = schema.FormalParameterOption.Optional
    ints = schema.AttrType.INT
    return schema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[
            param("A", "T1"),
            param("B", "T2"),
            param("scales", "T1"),
            param("zero_points", "T3", param_option=optional),
        ],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)"], ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
        ],
        attributes=[
            schema.Attribute("K", ints, ""),
            schema.Attribute("N", ints, ""),
            schema.Attribute("bits", ints, ""),
            schema.Attribute("block_size", ints, ""),
        ],
    )


UINT8_TYPE = 2  # onnx.TensorProto.UINT8
INT64_TYPE = 7  # onnx.TensorProto.INT64
defer_lowerings("onnxruntime", _register_onnx_lowering)  # onnxscript loads when the target asks
