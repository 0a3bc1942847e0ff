"""Nemotron VL weight table (full tensors) and the on-disk key layouts we read and write back.

Canonical names are those of transformers 5.24's ``NemotronH_Omni_Reasoning_V3`` in memory (what
``save_pretrained(save_original_format=False)`` writes, and what HF PEFT adapters name):
``language_model.model.*`` / ``language_model.lm_head``, ``vision_model.embeddings.*`` /
``vision_model.encoder.layer.*`` (separate q/k/v), ``multi_modal_projector.*``. Layouts on disk:

* ``native``: those names;
* ``v2``: the original ``NemotronH_Nano_VL_V2`` hub names, which a default ``save_pretrained`` of
  the omni class also writes (it reverts its load-time renames): ``language_model.backbone.*``,
  ``vision_model.radio_model.model.{patch_generator,blocks}.*`` with one fused ``attn.qkv``
  (rows ``[q; k; v]``) and ``attn.proj``, and the projector as ``mlp1.{0,1,3}``. Not a prefix
  rename, so this layout rewrites table entries.

The Mamba ``in_proj`` rows ``[z, x, B, C, dt]`` and conv channels ``[x, B, C]`` are stored fused,
as Megatron keeps them; each part is split over TP on its own (:class:`~vlm_bridge.convert.ops.Parts`).
"""

from __future__ import annotations

import re
from dataclasses import replace

from vlm_bridge.convert.layout import KeyLayout
from vlm_bridge.convert.ops import Entry, FuseQKV, PadRows, Parts, Rename
from vlm_bridge.families._common.vit_mapping import vit_block_entries
from vlm_bridge.families.nemotron_vl.config import ATTENTION, MAMBA, MLP, MOE, NemotronVLSettings

LM, VIS, PROJ = "language_model.", "vision_model.", "multi_modal_projector."
RADIO = VIS + "radio_model.model."

# canonical -> v2 names (applied in order, first match per rule)
_V2_RENAMES = [
    (r"^language_model\.model\.", "language_model.backbone."),
    (r"^vision_model\.embeddings\.patch_projection\.", RADIO + "patch_generator.embedder."),
    (r"^vision_model\.embeddings\.video_patch_projection\.", RADIO + "patch_generator.video_embedder."),
    (r"^vision_model\.embeddings\.position_embedding$", RADIO + "patch_generator.pos_embed"),
    (r"^vision_model\.embeddings\.cls_register_token$", RADIO + "patch_generator.cls_token.token"),
    (r"^vision_model\.encoder\.layer\.", RADIO + "blocks."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
]


def to_v2_name(name: str) -> str:
    for pattern, repl in _V2_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def to_v2(entry: Entry) -> Entry:
    """A canonical entry as the V2 layout stores it (RADIO's q/k/v fused into ``attn.qkv``)."""
    op = entry.op
    if isinstance(op, FuseQKV) and entry.hf[0].startswith(VIS):
        fused = to_v2_name(entry.hf[0]).replace(".attention.q_proj.", ".attn.qkv.")
        return replace(entry, hf=(fused,), op=FuseQKV(op.heads, op.groups, op.head_dim, hf_fused=True))
    return replace(entry, hf=tuple(to_v2_name(n) for n in entry.hf))


LAYOUTS = [KeyLayout("v2", rewrite=to_v2), KeyLayout("native")]


def _mamba_entries(m: str, h: str, s: NemotronVLSettings) -> list[Entry]:
    conv = Parts(tuple(s.mamba.conv_sizes()))
    out = [
        Entry(m + "norm.weight", (h + "norm.weight",), Rename()),
        Entry(m + "mixer.in_proj.weight", (h + "mixer.in_proj.weight",),
              Parts(tuple(s.mamba.in_proj_sizes()))),
        Entry(m + "mixer.conv1d.weight", (h + "mixer.conv1d.weight",), conv),
    ]
    if s.mamba.conv_bias:
        out.append(Entry(m + "mixer.conv1d.bias", (h + "mixer.conv1d.bias",), conv))
    out += [Entry(m + f"mixer.{p}", (h + f"mixer.{p}",), Rename()) for p in ("dt_bias", "A_log", "D")]
    out += [
        Entry(m + "mixer.norm.weight", (h + "mixer.norm.weight",), Rename()),
        Entry(m + "mixer.out_proj.weight", (h + "mixer.out_proj.weight",), Rename()),
    ]
    return out


def _moe_entries(m: str, h: str, lang) -> list[Entry]:
    """Router (its weight and expert bias kept in fp32, as HF keeps them), experts named one by one
    (fused checkpoints are split on read and re-fused on write, convert/experts.py; Megatron names
    use the global expert index) and the shared expert."""
    out = [
        Entry(m + "pre_mlp_layernorm.weight", (h + "norm.weight",), Rename()),
        Entry(m + "mlp.router.weight", (h + "mixer.gate.weight",), Rename(), fp32=True),
        Entry(m + "mlp.router.expert_bias", (h + "mixer.gate.e_score_correction_bias",), Rename(),
              fp32=True),
    ]
    for e in range(lang.num_moe_experts):
        me, he = f"{m}mlp.experts.local_experts.{e}.", f"{h}mixer.experts.{e}."
        out += [Entry(me + "linear_fc1.weight", (he + "up_proj.weight",), Rename()),
                Entry(me + "linear_fc2.weight", (he + "down_proj.weight",), Rename())]
    if lang.moe_shared_expert_intermediate_size:
        shared, hs = m + "mlp.shared_experts.", h + "mixer.shared_experts."
        out += [Entry(shared + "linear_fc1.weight", (hs + "up_proj.weight",), Rename()),
                Entry(shared + "linear_fc2.weight", (hs + "down_proj.weight",), Rename())]
    return out


def _language_entries(lang, s: NemotronVLSettings) -> list[Entry]:
    lm, hf = "language_model.", LM + "model."
    pad = PadRows(s.vocab_size, s.padded_vocab_size)
    qkv = FuseQKV(lang.num_attention_heads, lang.num_query_groups, lang.kv_channels)
    out = [Entry(lm + "embedding.word_embeddings.weight", (hf + "embeddings.weight",), pad)]
    for i, kind in enumerate(s.layer_types):
        m, h = f"{lm}decoder.layers.{i}.", f"{hf}layers.{i}."
        if kind == MAMBA:
            out += _mamba_entries(m, h, s)
        elif kind == ATTENTION:
            out += [
                Entry(m + "input_layernorm.weight", (h + "norm.weight",), Rename()),
                Entry(m + "self_attention.linear_qkv.weight",
                      tuple(h + f"mixer.{x}_proj.weight" for x in "qkv"), qkv),
                Entry(m + "self_attention.linear_proj.weight", (h + "mixer.o_proj.weight",), Rename()),
            ]
        elif kind == MLP:
            out += [
                Entry(m + "pre_mlp_layernorm.weight", (h + "norm.weight",), Rename()),
                Entry(m + "mlp.linear_fc1.weight", (h + "mixer.up_proj.weight",), Rename()),
                Entry(m + "mlp.linear_fc2.weight", (h + "mixer.down_proj.weight",), Rename()),
            ]
        elif kind == MOE:
            out += _moe_entries(m, h, lang)
    out += [
        Entry(lm + "decoder.final_layernorm.weight", (hf + "norm_f.weight",), Rename()),
        Entry(lm + "output_layer.weight", (LM + "lm_head.weight",), pad),
    ]
    return out


def _vision_entries(vision, s: NemotronVLSettings) -> list[Entry]:
    emb = VIS + "embeddings."
    out = [Entry("vision.patch_projection.weight", (emb + "patch_projection.weight",), Rename())]
    if s.temporal_patch_size:
        out.append(Entry("vision.video_patch_projection.weight", (emb + "video_patch_projection.weight",),
                         Rename()))
    out += [
        Entry("vision.position_embedding.weight", (emb + "position_embedding",), Rename()),
        Entry("vision.cls_register_token.weight", (emb + "cls_register_token",), Rename()),
    ]
    qkv = FuseQKV(vision.num_attention_heads, vision.num_attention_heads, vision.kv_channels)
    names = {"input_layernorm": "norm1", "self_attention.linear_proj": "attention.o_proj",
             "pre_mlp_layernorm": "norm2", "mlp.linear_fc1": "mlp.fc1", "mlp.linear_fc2": "mlp.fc2"}
    for i in range(vision.num_layers):
        out += vit_block_entries(f"vision.layers.{i}.", f"{VIS}encoder.layer.{i}.", names,
                                 tuple(f"attention.{x}_proj" for x in "qkv"), qkv, vision.add_qkv_bias)
    out += [
        Entry("vision.projector.norm.weight", (PROJ + "layer_norm.weight",), Rename()),
        Entry("vision.projector.linear_fc1.weight", (PROJ + "linear_1.weight",), Rename()),
        Entry("vision.projector.linear_fc2.weight", (PROJ + "linear_2.weight",), Rename()),
    ]
    return out


def weight_table(lang, vision, s: NemotronVLSettings) -> list[Entry]:
    return _vision_entries(vision, s) + _language_entries(lang, s)
