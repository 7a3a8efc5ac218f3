"""The quantized operators that the `quantize` pass inserts, with their CPU kernels.

    optpipe.linear_int8_dynamic(x, weight[N,K] int8, weight_scale[N], bias?)      int8 x int8 matmul
    optpipe.linear_int8_weight(x, weight[N,K] int8, weight_scale[N], bias?)       weight-only int8
    optpipe.linear_int4_weight(x, weight[N,K/2] uint8, qparams[N,K/g,2], bias?, group)
    optpipe.embedding_int8(weight[V,D] int8, weight_scale[V], indices)           int8 rows, per-row scale

Weights: int8 symmetric per output channel (`w ≈ q · scale[n]`, q in [-127, 127]); int4
asymmetric per group of `group` input channels (`w ≈ (u - zero[n, g]) · scale[n, g]`, g = k // group,
u in [0, 15], two per byte, the even k in the low nibble; scale and zero stored as qparams[n, g, :]).

int8-dynamic activations (per token): each token row is divided by its own max |x| (so every row
spans [-1, 1]), then the whole normalized tensor is quantized the way ONNX's DynamicQuantizeLinear
does it (uint8, asymmetric, scale = (max(0, hi) - min(0, lo)) / 255, zero point = round(-lo/scale)),
multiplied by the int8 weight with int32 accumulation, and rescaled by activation scale · row max ·
weight scale. The normalization makes one per-tensor quantizer behave per token, which is what lets
the fast kernels (oneDNN's dynamic quantized linear — AMX/VNNI int8 on x86 — and ORT's
DynamicQuantizeLinear + MatMulInteger) serve a per-token scheme; measured on this CPU (1 thread,
1024x384x1536): fp32 linear 25 ms, oneDNN int8 2.7 ms + 1.3 ms of normalization, `torch._int_mm`
14 ms + quantize/dequantize 40 ms, `aten._weight_int8pack_mm` 800 ms (no fast path here).

Kernels: `linear_int8_dynamic` runs `torch.ops.quantized.linear_dynamic` on weights prepacked once
for oneDNN (cached per weight tensor, so the saved program stores plain int8 buffers only); other
devices/dtypes, or a torch without oneDNN, run the decomposition. The weight-only ops dequantize
on the fly in plain torch (their point is memory, not CPU speed: torch's int4/int8 packed CPU
kernels were 30-100x slower than fp32 here). Every op's decomposition is plain ATen (no amax, no
bit shifts: TVM's importer lacks them) and is what ONNX Runtime and TVM lower; for ONNX Runtime,
`linear_int8_dynamic` has a native lowering to DynamicQuantizeLinear + MatMulInteger.

Autograd: the activations and the bias get gradients (straight through the dequantized weight), so
a quantized model can still be fine-tuned around its frozen int8/int4 weights (adapters, biases).
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from optpipe.ops import define_op, register_lowering

ROW_EPS = 1e-12
"""Floor of a token's max |x| (an all-zero row stays zero instead of dividing by zero)."""
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
    u = torch.stack([low, high], dim=-1).reshape(n, qparams.shape[1], group).to(dtype)   # [N, K/g, g]
    qp = qparams.to(dtype)
    return ((u - qp[..., 1:]) * qp[..., :1]).reshape(n, -1)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype) * scale.to(dtype)[:, None]


def _add_bias(y: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y * scale (+ bias), one fused pass where there is a bias."""
    return y * scale if bias is None else torch.addcmul(bias.to(y.dtype), y, scale)


# -- int8-dynamic ----------------------------------------------------------------------------------------
def _row_max(x: torch.Tensor) -> torch.Tensor:
    # max over |x| rather than amax: TVM's importer takes aten.max.dim, not aten.amax
    return x.abs().max(dim=-1, keepdim=True).values.clamp(min=ROW_EPS)


def int8_dynamic_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The decomposition: per-token normalization, DynamicQuantizeLinear-style uint8 activations,
    an integer-valued matmul in x's dtype (exact up to fp32 rounding of the int32 sums)."""
    row = _row_max(x)
    xn = x / row
    lo = xn.min().clamp(max=0)
    hi = xn.max().clamp(min=0)
    act_scale = ((hi - lo) / 255).clamp(min=torch.finfo(x.dtype).tiny)
    zero = torch.round(-lo / act_scale).clamp(0, 255)
    centered = torch.round(xn / act_scale).add(zero).clamp(0, 255) - zero     # xq - zero point
    acc = F.linear(centered, weight.to(x.dtype))
    return _add_bias(acc * (act_scale * row), weight_scale.to(x.dtype), bias)


class _PrepackCache:
    """oneDNN-prepacked weights per int8 weight tensor, dropped when the tensor dies and rebuilt
    when it is modified in place (its version counter moves)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, tuple, object]] = {}
        self._lock = threading.Lock()

    def get(self, weight: torch.Tensor, scale: torch.Tensor):
        key = id(weight)
        state = (weight._version, scale._version, scale.data_ptr(), weight.data_ptr())
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == state:
            return entry[2]
        packed = _prepack(weight, scale)
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
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():  # quantized tensor constructors are deprecated, the kernels are not
        warnings.simplefilter("ignore")
        try:
            torch.backends.quantized.engine = "onednn"
            qweight = torch._make_per_channel_quantized_tensor(
                weight, scale.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qweight, None)
        finally:
            torch.backends.quantized.engine = previous


PREPACKED = _PrepackCache()
HAS_ONEDNN = "onednn" in torch.backends.quantized.supported_engines


def _uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.int8


def linear_int8_dynamic_impl(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                             bias: Optional[torch.Tensor]) -> torch.Tensor:
    if not _uses_onednn(x, weight):
        return int8_dynamic_reference(x, weight, weight_scale, bias)
    # max |x| per row from two reductions: x.abs() would allocate an x-sized temporary per call
    row = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_(min=ROW_EPS)
    # the packed weight carries the per-channel scales; the op quantizes x/row per tensor (uint8)
    y = torch.ops.quantized.linear_dynamic((x / row).contiguous(), PREPACKED.get(weight, weight_scale), False)
    # in place: a fresh [M, N] output per call costs page faults that outweigh the arithmetic
    y.mul_(row)
    return y if bias is None else y.add_(bias)


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


linear_int8_dynamic = define_op("linear_int8_dynamic", linear_int8_dynamic_impl, fake=_linear_fake,
                                decomposition=int8_dynamic_reference, backward=_straight_through,
                                setup_context=_save_weights, flops=_linear_flops, exact_outputs=False)


# -- weight-only -------------------------------------------------------------------------------------------
def linear_int8_weight_impl(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ int8ᵀ in x's dtype, scaled per output channel afterwards (one [M,N] pass, not [N,K])."""
    return _add_bias(F.linear(x, weight.to(x.dtype)), weight_scale.to(x.dtype), bias)


def linear_int4_weight_impl(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: Optional[torch.Tensor], group: int) -> torch.Tensor:
    """Unpack and dequantize the int4 groups, then one dense matmul."""
    out = F.linear(x, dequantize_int4(weight, weight_scale, group, x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


def _int4_fake(x, weight, weight_scale, bias, group):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear_int8_weight = define_op("linear_int8_weight", linear_int8_weight_impl, fake=_linear_fake,
                               decomposition=linear_int8_weight_impl, backward=_straight_through,
                               setup_context=_save_weights, flops=_linear_flops)
linear_int4_weight = define_op("linear_int4_weight", linear_int4_weight_impl, fake=_int4_fake,
                               decomposition=linear_int4_weight_impl, backward=_straight_through,
                               setup_context=_save_weights, flops=_int4_flops)


# -- embeddings ---------------------------------------------------------------------------------------------
def embedding_int8_impl(weight: torch.Tensor, weight_scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather int8 rows and their scales, dequantize only what was gathered."""
    rows = F.embedding(indices, weight).to(weight_scale.dtype)
    return rows * F.embedding(indices, weight_scale[:, None])


def _embedding_fake(weight, weight_scale, indices):
    return weight_scale.new_empty((*indices.shape, weight.shape[1]))


embedding_int8 = define_op("embedding_int8", embedding_int8_impl, fake=_embedding_fake,
                           decomposition=embedding_int8_impl)


QUANTIZED_LINEARS = (linear_int8_dynamic, linear_int8_weight, linear_int4_weight)


# -- native lowerings ---------------------------------------------------------------------------------------
def _register_onnx_lowering() -> None:
    """int8-dynamic on ONNX Runtime as DynamicQuantizeLinear + MatMulInteger (ORT's u8s8 int8 GEMM)
    instead of its fp32 decomposition. A traced onnxscript function (plain Python over `op.*`), so the
    optional bias is a Python `None` test rather than an ONNX optional."""
    try:
        import onnxscript
        from onnxscript import FLOAT, INT8
    except ImportError:  # the onnxruntime target is optional: the decomposition still lowers
        return
    op = onnxscript.opset18

    def linear_int8_dynamic_onnx(x: FLOAT, weight: INT8, weight_scale: FLOAT,
                                 bias: Optional[FLOAT] = None) -> FLOAT:
        row = op.Max(op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1),
                     op.Constant(value_float=ROW_EPS))
        xq, act_scale, zero = op.DynamicQuantizeLinear(op.Div(x, row))
        acc = op.MatMulInteger(xq, op.Transpose(weight, perm=[1, 0]), zero)
        y = op.Mul(op.Mul(op.Cast(acc, to=1), op.Mul(row, act_scale)), weight_scale)
        return y if bias is None else op.Add(y, bias)

    register_lowering(linear_int8_dynamic, "onnxruntime", linear_int8_dynamic_onnx)


_register_onnx_lowering()
