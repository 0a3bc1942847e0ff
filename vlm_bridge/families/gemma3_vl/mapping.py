"""Gemma 3 VL weight table (full tensors, hub names) and the four on-disk layouts we accept.

Canonical names are the hub upload's: ``language_model.model.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``; no ``lm_head`` (embeddings are tied). Layouts seen on disk:

* ``hub``: as uploaded (google/gemma-3-*-it);
* ``transformers-4.5x``: ``save_pretrained`` of 4.52-4.57: ``model.language_model.*``,
  ``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.*``;
* ``transformers-5``: 5.x ``save_pretrained`` reverts its renames except SigLIP's: flat
  ``vision_tower.*`` beside ``language_model.model.*``;
* ``transformers-5-native``: 5.x with ``save_original_format=False``: ``model.*`` throughout
  (``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``).

The layouts nest prefixes (``vision_tower.`` vs ``vision_tower.vision_model.``), so the loader
picks the one under which the table's names match the file's keys exactly.
"""

from __future__ import annotations

from vlm_bridge.convert.layout import KeyLayout
from vlm_bridge.convert.ops import ConcatRows, Entry, FuseQKV, PadRows, Rename, Transpose
from vlm_bridge.families._common.vit_mapping import vit_block_entries
from vlm_bridge.families.gemma3_vl.config import Gemma3VLSettings

LM, VIS, PROJ = "language_model.model.", "vision_tower.vision_model.", "multi_modal_projector."

LAYOUTS = [
    KeyLayout("hub", {}),
    KeyLayout("transformers-4.5x", {"model.language_model.": LM, "model.vision_tower.vision_model.": VIS,
                                    "model.multi_modal_projector.": PROJ}),
    KeyLayout("transformers-5", {"vision_tower.": VIS}),
    KeyLayout("transformers-5-native", {"model.language_model.": LM, "model.vision_tower.": VIS,
                                        "model.multi_modal_projector.": PROJ}),
]


def _vision_entries(vision) -> list[Entry]:
    heads, head_dim = vision.num_attention_heads, vision.kv_channels
    qkv = FuseQKV(heads, heads, head_dim)
    out = [
        Entry("vision.patch_embed.weight", (VIS + "embeddings.patch_embedding.weight",), Rename()),
        Entry("vision.patch_embed.bias", (VIS + "embeddings.patch_embedding.bias",), Rename()),
        Entry("vision.position_embedding.weight", (VIS + "embeddings.position_embedding.weight",), Rename()),
    ]
    names = {"input_layernorm": "layer_norm1", "self_attention.linear_proj": "self_attn.out_proj",
             "pre_mlp_layernorm": "layer_norm2", "mlp.linear_fc1": "mlp.fc1", "mlp.linear_fc2": "mlp.fc2"}
    for i in range(vision.num_layers):
        out += vit_block_entries(f"vision.layers.{i}.", f"{VIS}encoder.layers.{i}.", names,
                                 tuple(f"self_attn.{x}_proj" for x in "qkv"), qkv)
    out += [
        Entry("vision.post_layernorm.weight", (VIS + "post_layernorm.weight",), Rename()),
        Entry("vision.post_layernorm.bias", (VIS + "post_layernorm.bias",), Rename()),
        Entry("vision.projector.norm.weight", (PROJ + "mm_soft_emb_norm.weight",), Rename()),
        # stored [vision_hidden, text_hidden]: the transpose of a Linear weight
        Entry("vision.projector.linear_fc1.weight", (PROJ + "mm_input_projection_weight",), Transpose()),
    ]
    return out


def _language_entries(lang, s: Gemma3VLSettings) -> list[Entry]:
    qkv = FuseQKV(lang.num_attention_heads, lang.num_query_groups, lang.kv_channels)
    lm = "language_model."
    out = [Entry(lm + "embedding.word_embeddings.weight", (LM + "embed_tokens.weight",),
                 PadRows(s.vocab_size, s.padded_vocab_size))]
    for i in range(lang.num_layers):
        m, h = f"{lm}decoder.layers.{i}.", f"{LM}layers.{i}."
        attn = h + "self_attn."
        out += [
            Entry(m + "input_layernorm.weight", (h + "input_layernorm.weight",), Rename()),
            Entry(m + "self_attention.linear_qkv.weight",
                  (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), qkv),
            Entry(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), Rename()),
            Entry(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), Rename()),
            Entry(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), Rename()),
            Entry(m + "post_attention_layernorm.weight", (h + "post_attention_layernorm.weight",), Rename()),
            Entry(m + "pre_mlp_layernorm.weight", (h + "pre_feedforward_layernorm.weight",), Rename()),
            Entry(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                  ConcatRows(2)),
            Entry(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), Rename()),
            Entry(m + "post_feedforward_layernorm.weight", (h + "post_feedforward_layernorm.weight",),
                  Rename()),
        ]
    out.append(Entry(lm + "decoder.final_layernorm.weight", (LM + "norm.weight",), Rename()))
    return out


def weight_table(lang, vision, s: Gemma3VLSettings) -> list[Entry]:
    return _vision_entries(vision) + _language_entries(lang, s)
