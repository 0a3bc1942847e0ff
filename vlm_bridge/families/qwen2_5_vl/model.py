"""Qwen2.5-VL on Megatron-Core: a TP-sharded vision tower and a GPTModel language model with MRoPE.

Non-obvious transforms (all mirrored from the HF implementation):

* Patch embedding is a Conv3d whose kernel equals its stride, i.e. a Linear over flattened
  ``(C, T, P, P)`` patches; we keep the Conv3d weight shape and apply it as a matmul.
* Window attention: patches are reordered so each 112 px window is contiguous (in 2x2 merge units),
  every block attends within a window except ``fullatt_block_indexes``, which attend within the
  whole image/frame; the merger output is put back in raster order at the end.
* Vision tokens replace the ``<|image_pad|>`` / ``<|video_pad|>`` embeddings in (batch, position)
  order; the language model then uses 3-D MRoPE positions.
* The vision tower lives whole on the first pipeline stage, TP-sharded like the language model.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

from vlm_bridge.attention.core import AttentionMask
from vlm_bridge.families._common.modules import scatter_vision_embeddings
from vlm_bridge.families._common.specs import transformer_layer_spec
from vlm_bridge.families._common.vlm import Embedded, VLMModel
from vlm_bridge.families._qwen.vision import VisionTower, encode_by_item
from vlm_bridge.families.qwen2_5_vl.config import Qwen25VLSettings
from vlm_bridge.parallel import host_to_device, on_host


class Qwen25VisionModel(VisionTower):
    """The Qwen2.5-VL ViT: patch embed, 2D rotary, windowed/full attention blocks, 2x2 merger."""

    def __init__(self, config: TransformerConfig, s: Qwen25VLSettings) -> None:
        super().__init__(config, s, patch_bias=False)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``pixel_values``: ``[patches, C*T*P*P]``; returns ``[patches / merge**2, out_hidden]``."""
        s, merge_unit = self.s, self.s.spatial_merge_size**2
        x = self.embed_patches(pixel_values)
        grid_thw = on_host(grid_thw)  # the index work runs on the host; results travel asynchronously
        freqs = self.rotary(grid_thw, x.device)
        window_index, cu_window = get_vision_window_index(
            grid_thw, s.spatial_merge_size, s.window_size, s.patch_size
        )
        window_index = host_to_device(window_index, x.device)
        n = x.shape[0]

        def by_window(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n // merge_unit, merge_unit, *t.shape[1:])[window_index].reshape(
                n, *t.shape[1:]
            )

        x, freqs = by_window(x)[:, None, :], by_window(freqs)
        full = AttentionMask.from_cu_seqlens(get_vision_cu_seqlens(grid_thw), causal=False).to(x.device)
        windowed = AttentionMask.from_cu_seqlens(cu_window, causal=False).to(x.device)
        for i, layer in enumerate(self.layers):
            mask = full if i in s.fullatt_block_indexes else windowed
            x, _ = layer(x, attention_mask=mask, rotary_pos_emb=freqs)
        merged = self.merger(x[:, 0])
        return merged[torch.argsort(window_index)]


class Qwen25VLModel(VLMModel):
    """Qwen2.5-VL: its ViT on the first stage, a GPT decoder with MRoPE, features scattered in."""

    def language_layer_spec(self):
        return transformer_layer_spec()

    def build_vision(self, config: TransformerConfig) -> Qwen25VisionModel:
        return Qwen25VisionModel(config, self.s)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> Embedded:
        """Text embeddings ``[s, b, h]`` with vision features in place of the placeholders."""
        emb = self.embed_text(input_ids)
        if pixel_values is not None:
            feats = encode_by_item(self, pixel_values, image_grid_thw)
            emb = scatter_vision_embeddings(emb, input_ids, self.s.image_token_id, feats, "images")
        if pixel_values_videos is not None:
            feats = encode_by_item(self, pixel_values_videos, video_grid_thw)
            emb = scatter_vision_embeddings(emb, input_ids, self.s.video_token_id, feats, "videos")
        return Embedded(emb)
