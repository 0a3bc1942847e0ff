"""Qwen2.5-VL weight table (full tensors, hub key layout) and the on-disk layouts we accept.

Hub layout (and what transformers 5 writes): ``model.*`` (language model), ``visual.*``,
``lm_head.weight`` (absent when embeddings are tied). transformers 4.52-4.57 wrote
``model.language_model.*`` and ``model.visual.*`` instead; both are read, and export writes the
layout the checkpoint was imported from.
"""

from __future__ import annotations

from vlm_bridge.convert.layout import KeyLayout
from vlm_bridge.convert.ops import ConcatRows, Entry, FuseQKV, PadDim, PadRows, Rename
from vlm_bridge.families.qwen2_5_vl.config import Qwen25VLSettings

LAYOUTS = [
    KeyLayout("hub", {}),
    KeyLayout(
        "transformers-4.5x",
        {"model.language_model.": "model.", "model.visual.": "visual."},
    ),
]


def _vision_entries(vision, s: Qwen25VLSettings) -> list[Entry]:
    heads, head_dim = vision.num_attention_heads, vision.kv_channels
    qkv = FuseQKV(heads, heads, head_dim, hf_fused=True)
    up, down = ConcatRows(2), Rename()
    if vision.ffn_hidden_size != s.vision_ffn_size:  # zero-padded so that TP divides it
        up = PadDim(parts=2, size=s.vision_ffn_size, padded=vision.ffn_hidden_size)
        down = PadDim(size=s.vision_ffn_size, padded=vision.ffn_hidden_size, dim=1)
    out = [Entry("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), Rename())]
    for i in range(vision.num_layers):
        m, h = f"vision.layers.{i}.", f"visual.blocks.{i}."
        out += [
            Entry(m + "input_layernorm.weight", (h + "norm1.weight",), Rename()),
            Entry(m + "self_attention.linear_qkv.weight", (h + "attn.qkv.weight",), qkv),
            Entry(m + "self_attention.linear_qkv.bias", (h + "attn.qkv.bias",), qkv),
            Entry(m + "self_attention.linear_proj.weight", (h + "attn.proj.weight",), Rename()),
            Entry(m + "self_attention.linear_proj.bias", (h + "attn.proj.bias",), Rename()),
            Entry(m + "pre_mlp_layernorm.weight", (h + "norm2.weight",), Rename()),
            Entry(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), down),
            Entry(m + "mlp.linear_fc2.bias", (h + "mlp.down_proj.bias",), Rename()),
        ]
        for suffix in ("weight", "bias"):
            gate_up = (h + f"mlp.gate_proj.{suffix}", h + f"mlp.up_proj.{suffix}")
            out.append(Entry(m + f"mlp.linear_fc1.{suffix}", gate_up, up))
    out += [
        Entry("vision.merger.norm.weight", ("visual.merger.ln_q.weight",), Rename()),
        Entry("vision.merger.linear_fc1.weight", ("visual.merger.mlp.0.weight",), Rename()),
        Entry("vision.merger.linear_fc1.bias", ("visual.merger.mlp.0.bias",), Rename()),
        Entry("vision.merger.linear_fc2.weight", ("visual.merger.mlp.2.weight",), Rename()),
        Entry("vision.merger.linear_fc2.bias", ("visual.merger.mlp.2.bias",), Rename()),
    ]
    return out


def _language_entries(lang, s: Qwen25VLSettings) -> list[Entry]:
    qkv = FuseQKV(lang.num_attention_heads, lang.num_query_groups, lang.kv_channels)
    vocab = PadRows(s.vocab_size, s.padded_vocab_size)
    lm = "language_model."
    out = [Entry(lm + "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab)]
    for i in range(lang.num_layers):
        m, h = f"{lm}decoder.layers.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        out += [
            Entry(m + "input_layernorm.weight", (h + "input_layernorm.weight",), Rename()),
            Entry(
                m + "self_attention.linear_qkv.weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                qkv,
            ),
            Entry(
                m + "self_attention.linear_qkv.bias",
                (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                qkv,
            ),
            Entry(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), Rename()),
            Entry(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), Rename()),
            Entry(
                m + "mlp.linear_fc1.weight",
                (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                ConcatRows(2),
            ),
            Entry(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), Rename()),
        ]
    out.append(Entry(lm + "decoder.final_layernorm.weight", ("model.norm.weight",), Rename()))
    if not s.tie_word_embeddings:
        out.append(Entry(lm + "output_layer.weight", ("lm_head.weight",), vocab))
    return out


def weight_table(language, vision, s: Qwen25VLSettings) -> list[Entry]:
    """Every Megatron parameter of the full model with the HF tensors it is built from."""
    return _vision_entries(vision, s) + _language_entries(language, s)
