"""Qwen3-VL (dense) on Megatron-Core: TP-sharded ViT with DeepStack, GPTModel with interleaved MRoPE.

Non-obvious transforms (mirrored from the HF implementation):

* The ViT adds a learned 2-D position table, resampled bilinearly (align_corners) to each image's
  patch grid in 2x2-merge-block order, on top of the 2-D rotary; attention is full within each
  image or video frame.
* DeepStack: the outputs of ViT layers ``deepstack_visual_indexes`` go through their own mergers
  (which normalise after the 2x2 merge) and are added to the LM hidden states at the visual
  positions right after LM layers 0..K-1. ``embed`` returns them as explicit decoder inputs
  (zero-filled ``[s, b, h]`` per level, so text positions stay bit-identical), which the shared
  decoder run adds after those layers. They must sit on the first pipeline stage (config.py).
* MRoPE is interleaved: rotary channel i takes its angle from the t, h or w position by ``i % 3``
  within the h/w sections, unlike Qwen2.5-VL's contiguous sections; Megatron's rotary module is
  replaced by :class:`InterleavedMRoPE`.
* LM attention applies RMSNorm to each query and key head before the rotary (q/k norm).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights

from vlm_bridge.attention.core import AttentionMask
from vlm_bridge.families._common.modules import scatter_vision_embeddings
from vlm_bridge.families._common.specs import transformer_layer_spec
from vlm_bridge.families._common.vlm import Embedded, VLMModel
from vlm_bridge.families._qwen.vision import PatchMerger, VisionTower, encode_by_item
from vlm_bridge.families.qwen3_vl.config import Qwen3VLSettings
from vlm_bridge.parallel import host_to_device, on_host


class InterleavedMRoPE(torch.nn.Module):
    """Drop-in for Megatron's MultimodalRotaryEmbedding with Qwen3-VL's interleaved sections."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section: list[int], cp_group=None):
        """``position_ids [3, b, s]`` -> rotary angles ``[s, b, 1, head_dim]``."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        out = freqs[0].clone()  # t everywhere, then h and w on their interleaved channels
        for axis, offset in ((1, 1), (2, 2)):
            idx = slice(offset, mrope_section[axis] * 3, 3)
            out[..., idx] = freqs[axis][..., idx]
        emb = torch.cat([out, out], dim=-1)  # [b, s, head_dim]
        return emb.transpose(0, 1)[:, :, None, :].contiguous()


class Qwen3VisionModel(VisionTower):
    """Qwen3-VL ViT: patch embed (+bias), learned + rotary positions, LayerNorm/GELU blocks."""

    def __init__(self, config: TransformerConfig, s: Qwen3VLSettings) -> None:
        super().__init__(config, s, patch_bias=True)
        self.pos_embed = torch.nn.Embedding(s.num_position_embeddings, config.hidden_size,
                                            dtype=config.params_dtype)
        self.deepstack_mergers = torch.nn.ModuleList(
            PatchMerger(config, config.hidden_size, s.out_hidden_size, s.spatial_merge_size,
                        norm_after_merge=True)
            for _ in s.deepstack_visual_indexes
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """Returns (merged features, [DeepStack features per injection level])."""
        s = self.s
        x = self.embed_patches(pixel_values)
        grid_thw = on_host(grid_thw)  # the index work runs on the host; results travel asynchronously
        side = int(s.num_position_embeddings**0.5)
        idx, weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=side, mode="bilinear", align_corners=True,
            spatial_merge_size=s.spatial_merge_size,
        )
        idx, weights = host_to_device(idx, x.device), host_to_device(weights, x.device)
        pos = (self.pos_embed(idx) * weights[:, :, None]).sum(1)
        freqs = self.rotary(grid_thw, x.device)
        x = (x + pos.to(x.dtype))[:, None, :]
        mask = AttentionMask.from_cu_seqlens(get_vision_cu_seqlens(grid_thw), causal=False).to(x.device)
        deepstack = []
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, attention_mask=mask, rotary_pos_emb=freqs)
            if i in s.deepstack_visual_indexes:
                merger = self.deepstack_mergers[s.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x[:, 0]))
        return self.merger(x[:, 0]), deepstack


class Qwen3VLModel(VLMModel):
    """ViT (first stage) + GPT decoder with q/k norm, interleaved MRoPE and DeepStack additions."""

    def build_language_model(self, config: TransformerConfig):
        lm = super().build_language_model(config)
        lm.rotary_pos_emb = InterleavedMRoPE(config.kv_channels, self.s.rope_theta)
        return lm

    def language_layer_spec(self):
        return transformer_layer_spec(qk_norm=True, num_experts=self.config.num_moe_experts)

    def build_vision(self, config: TransformerConfig) -> Qwen3VisionModel:
        return Qwen3VisionModel(config, self.s)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None) -> Embedded:
        """Text embeddings with vision features, and the DeepStack additions ``[s, b, h]`` after
        LM layers 0..K-1 (zero at text positions, so those stay bit-identical)."""
        emb = self.embed_text(input_ids)
        levels = [torch.zeros_like(emb) for _ in self.s.deepstack_visual_indexes]
        has_vision = False
        for pixels, grid, token, what in (
            (pixel_values, image_grid_thw, self.s.image_token_id, "images"),
            (pixel_values_videos, video_grid_thw, self.s.video_token_id, "videos"),
        ):
            if pixels is None:
                continue
            has_vision = True
            levels_out = 1 + len(self.s.deepstack_visual_indexes)
            merged, deep = encode_by_item(self, pixels, grid, outputs=levels_out)
            emb = scatter_vision_embeddings(emb, input_ids, token, merged, what)
            levels = [scatter_vision_embeddings(lv, input_ids, token, d, what) for d, lv in zip(deep, levels)]
        return Embedded(emb, dict(enumerate(levels)) if has_vision else {})
