"""Qwen3-VL weight table (full tensors). On disk (hub and transformers 5): ``model.language_model.*``,
``model.visual.*`` and ``lm_head.weight`` (absent when embeddings are tied)."""

from __future__ import annotations

from vlm_bridge.convert.layout import KeyLayout
from vlm_bridge.convert.ops import ConcatRows, Entry, FuseQKV, PadDim, PadRows, Rename
from vlm_bridge.families.qwen3_vl.config import Qwen3VLSettings

LAYOUTS = [KeyLayout("hub", {})]
V, L = "model.visual.", "model.language_model."


def _linear(m: str, h: str, bias: bool = True) -> list[Entry]:
    out = [Entry(m + ".weight", (h + ".weight",), Rename())]
    return out + ([Entry(m + ".bias", (h + ".bias",), Rename())] if bias else [])


def _ffn(m: str, h: str, size: int, padded: int) -> list[Entry]:
    """A GELU MLP whose width is zero-padded from ``size`` to ``padded`` so that TP divides it."""
    if size == padded:
        return _linear(m + "linear_fc1", h + "linear_fc1") + _linear(m + "linear_fc2", h + "linear_fc2")
    rows, cols = PadDim(size=size, padded=padded), PadDim(size=size, padded=padded, dim=1)
    return [Entry(m + "linear_fc1.weight", (h + "linear_fc1.weight",), rows),
            Entry(m + "linear_fc1.bias", (h + "linear_fc1.bias",), rows),
            Entry(m + "linear_fc2.weight", (h + "linear_fc2.weight",), cols),
            Entry(m + "linear_fc2.bias", (h + "linear_fc2.bias",), Rename())]


def _merger(m: str, h: str) -> list[Entry]:
    return (_linear(m + ".norm", h + ".norm") + _linear(m + ".linear_fc1", h + ".linear_fc1")
            + _linear(m + ".linear_fc2", h + ".linear_fc2"))


def _vision_entries(vision, s: Qwen3VLSettings) -> list[Entry]:
    heads, head_dim = vision.num_attention_heads, vision.kv_channels
    qkv = FuseQKV(heads, heads, head_dim, hf_fused=True)
    out = _linear("vision.patch_embed", V + "patch_embed.proj")
    out.append(Entry("vision.pos_embed.weight", (V + "pos_embed.weight",), Rename()))
    for i in range(vision.num_layers):
        m, h = f"vision.layers.{i}.", f"{V}blocks.{i}."
        out += _linear(m + "input_layernorm", h + "norm1")
        out += [Entry(m + f"self_attention.linear_qkv.{p}", (h + f"attn.qkv.{p}",), qkv)
                for p in ("weight", "bias")]
        out += _linear(m + "self_attention.linear_proj", h + "attn.proj")
        out += _linear(m + "pre_mlp_layernorm", h + "norm2")
        out += _ffn(m + "mlp.", h + "mlp.", s.vision_ffn_size, vision.ffn_hidden_size)
    out += _merger("vision.merger", V + "merger")
    for k in range(len(s.deepstack_visual_indexes)):
        out += _merger(f"vision.deepstack_mergers.{k}", f"{V}deepstack_merger_list.{k}")
    return out


def _language_entries(lang, s: Qwen3VLSettings) -> list[Entry]:
    qkv = FuseQKV(lang.num_attention_heads, lang.num_query_groups, lang.kv_channels)
    vocab = PadRows(s.vocab_size, s.padded_vocab_size)
    lm = "language_model."
    out = [Entry(lm + "embedding.word_embeddings.weight", (L + "embed_tokens.weight",), vocab)]
    for i in range(lang.num_layers):
        m, h = f"{lm}decoder.layers.{i}.", f"{L}layers.{i}."
        attn = h + "self_attn."
        names = [attn + f"{x}_proj.weight" for x in "qkv"]
        out += [
            Entry(m + "input_layernorm.weight", (h + "input_layernorm.weight",), Rename()),
            Entry(m + "self_attention.linear_qkv.weight", tuple(names), qkv),
            Entry(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), Rename()),
            Entry(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), Rename()),
            Entry(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), Rename()),
            Entry(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), Rename()),
        ]
        out += _moe_entries(m, h, lang.num_moe_experts) if lang.num_moe_experts else [
            Entry(m + "mlp.linear_fc1.weight",
                  (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), ConcatRows(2)),
            Entry(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), Rename()),
        ]
        if lang.add_qkv_bias:
            biases = tuple(attn + f"{x}_proj.bias" for x in "qkv")
            out.append(Entry(m + "self_attention.linear_qkv.bias", biases, qkv))
    out.append(Entry(lm + "decoder.final_layernorm.weight", (L + "norm.weight",), Rename()))
    if not s.tie_word_embeddings:
        out.append(Entry(lm + "output_layer.weight", ("lm_head.weight",), vocab))
    return out


def _moe_entries(m: str, h: str, experts: int) -> list[Entry]:
    """Router plus one entry per expert, named per expert; checkpoints that store the experts
    fused as 3-D tensors are split into these names on read and re-fused on write
    (convert/experts.py). Megatron names use the global expert index."""
    out = [Entry(m + "mlp.router.weight", (h + "mlp.gate.weight",), Rename())]
    for e in range(experts):
        me, he = f"{m}mlp.experts.local_experts.{e}.", f"{h}mlp.experts.{e}."
        out += [
            Entry(me + "linear_fc1.weight", (he + "gate_proj.weight", he + "up_proj.weight"),
                  ConcatRows(2)),
            Entry(me + "linear_fc2.weight", (he + "down_proj.weight",), Rename()),
        ]
    return out


def weight_table(language, vision, s: Qwen3VLSettings) -> list[Entry]:
    return _vision_entries(vision, s) + _language_entries(language, s)
