"""Transformer fusions for the `onnxruntime` target: an exported ONNX graph's attention, skip layer
norms and bias-GELUs rewritten into ONNX Runtime's contrib ops (`com.microsoft`), in place.

Why: the dynamo exporter writes attention as MatMul/Softmax/Transpose and a linear as MatMul + Add,
which ORT's load-time optimizer only partly fuses (its attention fusion knows the TorchScript
exporter's BERT pattern, not this one). onnxscript's ORT rewriter recognises SDPA, multi-head
attention with its Q/K/V projections, skip layer norms and bias-GELU and rewrites them into
`Attention` (one packed QKV GEMM plus the attention kernel), `MultiHeadAttention`,
`SkipLayerNormalization` and `BiasGelu`. Only fusions whose ops ORT 1.19's CPU kernels run are
applied (`ORT_FUSIONS`), one onnxscript rule is tightened (`_mha_fusion`), and the result is adapted
to 1.19 (its attention bias needs one row per head). Same fp32 math; the target check compares the
result with the torch program as for any lowering.

Run on the onnxscript optimizer's canonical graph (targets/onnxruntime_backend.py does, after export).
"""

from __future__ import annotations

import functools

from .onnx_export import quiet_exporter

# onnxscript's ORT fusions (onnxscript.rewriter.ort_fusions), in the order its `fuse_xformers`
# applies them, limited to what ORT 1.19's CPU kernels run. Left out: GroupQueryAttention and
# RotaryEmbedding/cos-sin caches (the fused forms follow newer ORT releases' op definitions), and
# the RMS-norm fusions (not yet checked against ORT 1.19's kernels).
ORT_FUSIONS = (
    "erf_gelu",
    "skip_layer_normalization",
    "sdpa",
    "mha1",
    "mha2",
    "mha_scale",
    "mha_bias",
    "attention",
    "gelu",
    "bias_gelu",
    "sdpa_via_mha",
)


def _fusion_rules() -> dict:
    from onnxscript.rewriter.ort_fusions import (
        attention,
        bias_gelu,
        erfgelu,
        gelu,
        mha_bias,
        mha_scale,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
    )

    return {
        "erf_gelu": erfgelu.fuse_erfgelu,
        "skip_layer_normalization": skip_normalization.fuse_skip_layer_normalization,
        "sdpa": functools.partial(sdpa.fuse_sdpa, apply_shape_inference=True),  # new nodes need shapes
        "mha1": _mha_fusion(has_past_present=True),
        "mha2": _mha_fusion(has_past_present=False),
        "mha_scale": mha_scale.fuse_mha_scale,
        "mha_bias": mha_bias.fuse_mha_bias,
        "attention": attention.fuse_attention,
        "gelu": gelu.fuse_gelu,
        "bias_gelu": bias_gelu.fuse_bias_gelu,
        "sdpa_via_mha": sdpa_via_mha.replace_sdpa_by_mha,
    }


def _mha_fusion(has_past_present: bool):
    """onnxscript's MultiHeadAttention fusion (`mha.fuse_mha1`/`fuse_mha2`), refusing a match whose
    closing Reshape is not to (B, S, D).

    Why: GPT-2's Conv1D flattens the merged heads straight to (B*S, D) for a Gemm; the exporter
    folds both reshapes into one, onnxscript's check does not look at that Reshape's target, and
    the fused node's (B, S, D) output then reaches the 2-D-only Gemm (ORT refuses the model)."""
    from onnxscript.rewriter import _fusion_utils, pattern
    from onnxscript.rewriter.ort_fusions import mha

    class MultiHeadAttentionTo3D(mha.MultiHeadAttention):
        def check(self, context, attention_reshaped=None, **bindings):
            result = super().check(context, attention_reshaped=attention_reshaped, **bindings)
            shape = attention_reshaped.shape if attention_reshaped is not None else None
            if result and (shape is None or shape.rank() != 3):
                return pattern.MatchResult().fail("attention output is not reshaped to (B, S, D)", attention_reshaped)
            return result

    rules = [
        MultiHeadAttentionTo3D.rule(
            f"MHA{'_Rotary' if rotary else ''}{'_Past' if has_past_present else ''}"
            f"{'_CrossAttention' if cross else ''}",
            is_rotary=rotary,
            has_past_present=has_past_present,
            is_cross_attention=cross,
        )
        for rotary in (False, True)
        for cross in ((False,) if has_past_present else (False, True))
    ]
    return _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet(rules))


def fuse_for_onnxruntime(model) -> dict[str, int]:
    """Rewrite transformer subgraphs of an exported `onnx_ir.Model` into ORT contrib ops, in place;
    returns how often each fusion of `ORT_FUSIONS` fired (only those that did).

    Why: ORT's load-time optimizer fuses attention only in the TorchScript exporter's old BERT
    pattern, so the dynamo export runs attention as separate MatMul/Softmax/Transpose kernels and
    every linear as MatMul + Add. The fused ops run each attention as one kernel with one packed
    QKV GEMM, and fold biases into the LayerNorm/GELU kernels."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import shape_optimization
    from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

    with quiet_exporter():
        # torchlib writes a linear on 3-D input as Reshape -> Gemm -> Reshape; the fusions match the
        # MatMul + Add form (and ORT turns a 2-D MatMul + Add back into Gemm on load)
        rewrite(model, [gemm_to_matmul_add_rule])
        # the fusions check shapes: infer them, and fold the exporter's shape arithmetic first
        common_passes.ShapeInferencePass()(model)
        shape_optimization.rules.apply_to_model(model)
        optimize(model)
        rules = _fusion_rules()
        counts = {name: rules[name](model) for name in ORT_FUSIONS}
        optimize(model)  # inlines the fusions' intermediate functions that no later fusion took
    counts["attention_bias_per_head"] = _attention_bias_per_head(model)
    return {name: n for name, n in counts.items() if n}


_BIAS_INPUT = {"Attention": 5, "MultiHeadAttention": 5}  # the attention bias ("relative_position_bias")


def _attention_bias_per_head(model) -> int:
    """Broadcast every attention bias of a fused Attention/MultiHeadAttention node to one row per
    batch and head; returns how many nodes needed it.

    Why: the fusions pass a (B, 1, S, L) additive mask or a (1, H, S, L) position bias (T5's)
    through as the attention bias, which newer ORT releases broadcast; ORT 1.19's CPU kernels
    refuse a single head at run time ("dimension 1 should be same as number of heads") and read a
    single batch row wrongly for every other row (no error, wrong outputs). One Expand per distinct
    bias, shared by the layers, to (batch of the node's query, heads, 1, 1)."""
    import onnx_ir as ir

    expanded: dict[int, ir.Value] = {}
    count = 0
    for node in list(model.graph):
        index = _BIAS_INPUT.get(node.op_type)
        if node.domain != "com.microsoft" or index is None or len(node.inputs) <= index:
            continue
        bias, query = node.inputs[index], node.inputs[0]
        heads = node.attributes.get_int("num_heads", 0)
        if bias is None or query is None or not heads:
            continue
        shape, batch = bias.shape, query.shape[0] if query.shape is not None else None
        if shape is not None and len(shape) == 4 and shape[1] == heads and batch is not None and shape[0] == batch:
            continue
        if id(bias) not in expanded:  # the first node using `bias` comes after its and the query's producers
            expanded[id(bias)] = _expand_bias(model, node, bias, query, heads)
        node.replace_input_with(index, expanded[id(bias)])
        count += 1
    return count


def _expand_bias(model, node, bias, query, heads: int):
    """Expand(bias, [batch of `query`, heads, 1, 1]), inserted before `node`; returns its output."""
    import numpy as np
    import onnx_ir as ir

    rest = ir.Value(name=f"{bias.name}_heads", const_value=ir.tensor(np.array([heads, 1, 1], np.int64)))
    model.graph.register_initializer(rest)
    batch = ir.node("Shape", [query], attributes={"start": 0, "end": 1}, name=f"{bias.name}_batch")
    target = ir.node("Concat", [batch.outputs[0], rest], attributes={"axis": 0}, name=f"{bias.name}_shape")
    expand = ir.node("Expand", [bias, target.outputs[0]], name=f"{bias.name}_per_head")
    model.graph.insert_before(node, [batch, target, expand])
    return expand.outputs[0]
