"""Every transformers family the coverage matrix covers, as a tiny random-init model.

`build(arch, attn)` returns `(model.eval(), example_inputs)`, like `tests/hf_models.py`: 2 layers,
hidden 64, 4 heads, vocabulary 128. Decoders are initialised widely (`initializer_range` 0.2) so
that greedy tokens depend on the whole prompt: at the default 0.02 a tiny random decoder repeats
the last prompt token and a broken KV cache goes unseen. Encoders get a padded batch of two
(a data-dependent mask); the encoder-decoders (T5, BART and their relatives) get decoder inputs too.
"""

from __future__ import annotations

import torch

VOCAB = 128
SEQ = 16
HIDDEN = 64

# the special ids of the seq2seq families whose defaults lie outside the tiny vocabulary (Marian's
# pad 58100) or are missing (mBART's decoder start: a language code)
SPECIAL_IDS = {"pad_token_id": 1, "eos_token_id": 2, "bos_token_id": 0, "decoder_start_token_id": 0}

# arch -> (kind, extra config keys). kind: "decoder" (causal LM, generates), "encoder", "seq2seq",
# "vision". Families whose config spells a field differently get it in `extra`.
ARCHS: dict[str, tuple[str, dict]] = {
    "gpt2": ("decoder", {}),
    "gpt_neox": ("decoder", {"rotary_pct": 0.5}),
    "gptj": ("decoder", {"rotary_dim": 8}),
    "llama": ("decoder", {"num_key_value_heads": 2}),
    "mistral": ("decoder", {"num_key_value_heads": 2, "sliding_window": 8}),
    "mixtral": ("decoder", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("decoder", {"num_key_value_heads": 2}),
    "qwen2_moe": (
        "decoder",
        {
            "num_key_value_heads": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
        },
    ),
    "qwen3": ("decoder", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma": ("decoder", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma2": ("decoder", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8}),
    "gemma3_text": ("decoder", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8}),
    "phi": ("decoder", {}),
    "phi3": ("decoder", {"num_key_value_heads": 2, "pad_token_id": 0}),
    "opt": ("decoder", {"ffn_dim": 128, "word_embed_proj_dim": HIDDEN}),
    "falcon": ("decoder", {"new_decoder_architecture": False, "multi_query": True}),
    "bloom": ("decoder", {}),
    "mpt": ("decoder", {}),
    "olmo": ("decoder", {"num_key_value_heads": 2}),
    "bert": ("encoder", {}),
    "roberta": ("encoder", {"pad_token_id": 1}),
    "distilbert": ("encoder", {}),
    "albert": ("encoder", {"embedding_size": 32}),
    "deberta_v2": (
        "encoder",
        {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "max_relative_positions": 32},
    ),
    "vit": ("vision", {"image_size": 32, "patch_size": 8, "num_channels": 3}),
    "t5": ("seq2seq", {}),
    "bart": ("seq2seq", {}),
    "mt5": ("seq2seq", {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, **SPECIAL_IDS}),
    "mbart": ("seq2seq", SPECIAL_IDS),
    "pegasus": ("seq2seq", SPECIAL_IDS),
    "marian": ("seq2seq", SPECIAL_IDS),
    "blenderbot-small": ("seq2seq", SPECIAL_IDS),
}
T5_LIKE = {"t5", "mt5"}
BART_LIKE = {"bart", "mbart", "pegasus", "marian", "blenderbot-small"}

DECODERS = [a for a, (kind, _) in ARCHS.items() if kind == "decoder"]
MODEL_TYPE = {"deberta_v2": "deberta-v2"}  # transformers' model_type where it differs from the arch id
EAGER_ONLY = {"gemma2", "bloom", "mpt", "deberta_v2"}  # transformers has no sdpa attention for these


def attention_implementations(arch: str) -> list[str]:
    """The attention implementations transformers offers for `arch` (eager always)."""
    return ["eager"] if arch in EAGER_ONLY else ["eager", "sdpa"]


def _common(arch: str, attn: str) -> dict:
    """Tiny sizes under the names every config accepts (attribute maps cover gpt2's n_embd etc.)."""
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    kind = ARCHS[arch][0]
    if kind == "decoder":
        kw["initializer_range"] = 0.2
        kw["bos_token_id"] = kw["eos_token_id"] = VOCAB - 1
        kw["tie_word_embeddings"] = True
    if arch in T5_LIKE:
        kw.update(d_model=HIDDEN, d_ff=128, d_kv=16, num_layers=2, num_heads=4, decoder_start_token_id=0)
    if arch in BART_LIKE:
        kw.update(
            init_std=0.2,  # as the decoders': greedy tokens that depend on the prompt
            d_model=HIDDEN,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
        )
    if arch == "mpt":
        kw.update(d_model=HIDDEN, n_heads=4, n_layers=2, max_seq_len=64, expansion_ratio=2)
    if arch == "distilbert":
        kw.update(dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=128)
    return kw


def config(arch: str, attn: str = "eager"):
    from transformers import AutoConfig

    kw = {**_common(arch, attn), **ARCHS[arch][1]}
    return AutoConfig.for_model(MODEL_TYPE.get(arch, arch), **kw)


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB - 1, (batch, seq), generator=torch.Generator().manual_seed(seed))


def build(arch: str, attn: str = "eager", seq: int = SEQ):
    """(model.eval(), example inputs) for `arch` in ARCHS, random weights from seed 0."""
    import transformers as tf

    kind = ARCHS[arch][0]
    cfg = config(arch, attn)
    torch.manual_seed(0)
    if kind == "decoder":
        return tf.AutoModelForCausalLM.from_config(cfg).eval(), {"input_ids": _ids(1, seq)}
    if kind == "vision":
        pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
        return tf.AutoModel.from_config(cfg, add_pooling_layer=False).eval(), {"pixel_values": pixels}
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[1, seq // 2 :] = 0
    if kind == "encoder":
        model = tf.AutoModel.from_config(cfg).eval()
        return model, {"input_ids": _ids(2, seq), "attention_mask": mask}
    model = tf.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    return model, {"input_ids": _ids(2, seq), "attention_mask": mask, "decoder_input_ids": _ids(2, seq // 2, seed=1)}
