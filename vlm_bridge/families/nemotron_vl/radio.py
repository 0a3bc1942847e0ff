"""The RADIO vision tower and the Nemotron VL projector as TP-sharded Megatron-Core modules.

Mirrors transformers 5.24 ``models/radio`` (C-RADIO) and ``nemotron_h_omni``:

* images arrive as the processor's flattened patches ``[total_patches, C * P * P]`` (channel-major
  per patch) with ``image_grid_hw``; video as ``[videos, tubelets, T * C, H, W]`` tubelets of
  ``T`` frames stacked on the channel axis, cut into patches here and projected by a separate
  ``video_patch_projection``. Both projections are bias-free linears;
* the CPE position table (``max_img_size / patch`` per side) is resized bilinearly with
  ``align_corners=False`` to ``max(h, w)`` squared, in fp32, then cropped to ``h x w``;
* each image gets the cls + register tokens in front (no position), attends only to itself,
  and those prefix tokens are dropped after the last block;
* pixel shuffle 0.5: output token ``(i, j)`` concatenates patches ``(2i, 2j)``, ``(2i, 2j+1)``,
  ``(2i+1, 2j)``, ``(2i+1, 2j+1)``; the projector is RMSNorm (fp32) -> Linear -> squared ReLU ->
  Linear with the 4x-wide hidden split over TP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.attention.mask import AttentionMask
from vlm_bridge.families._common.modules import per_element_sharded_state_dict
from vlm_bridge.families._common.norms import Fp32RMSNorm
from vlm_bridge.families._common.specs import transformer_layer_spec
from vlm_bridge.families.nemotron_vl.config import NemotronVLSettings, squared_relu
from vlm_bridge.parallel import on_host


def _skip_init(weight: torch.Tensor) -> None:
    """Weights always come from a checkpoint."""


class Table(torch.nn.Module):
    """A learned tensor kept under ``.weight`` in its HF shape (position table, prefix tokens), so
    that it is a module the tower's per-child checkpoint keys cover."""

    def __init__(self, *shape: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(*shape, dtype=dtype))


def pixel_shuffle(features: torch.Tensor, rows: int, cols: int, factor: int) -> torch.Tensor:
    """``[rows * cols, c]`` patch features -> ``[(rows/f) * (cols/f), f*f*c]`` (HF's v2 order)."""
    c = features.shape[-1]
    grid = features.reshape(rows // factor, factor, cols // factor, factor, c)
    return grid.permute(0, 2, 1, 3, 4).reshape(-1, factor * factor * c)


class NemotronProjector(MegatronModule):
    """RMSNorm -> Linear (column-parallel) -> squared ReLU -> Linear (row-parallel), no biases."""

    def __init__(self, config: TransformerConfig, s: NemotronVLSettings) -> None:
        super().__init__(config=config)
        width = s.vision_hidden_size * s.downsample**2
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self.norm = Fp32RMSNorm(config, width, s.projector_norm_eps)
        self.linear_fc1 = ColumnParallelLinear(
            width, s.projector_hidden_size, config=config, init_method=_skip_init, bias=False,
            gather_output=False, tp_group=tp_group,
        )
        self.linear_fc2 = RowParallelLinear(
            s.projector_hidden_size, s.hidden_size, config=config, init_method=_skip_init, bias=False,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_fc1(self.norm(x))
        x, _ = self.linear_fc2(squared_relu(x))
        return x


class RadioVisionTower(MegatronModule):
    """C-RADIO + pixel shuffle + projector. ``forward`` takes the processor's image patches and/or
    video tubelets and returns the LM-space features of every image, then every video,
    ``[tokens, text_hidden]``, in input order."""

    sharded_state_dict = per_element_sharded_state_dict

    def __init__(self, config: TransformerConfig, s: NemotronVLSettings) -> None:
        super().__init__(config=config)
        self.s = s
        dtype, hidden = config.params_dtype, config.hidden_size
        patch_dim = s.num_channels * s.patch_size**2
        self.patch_projection = torch.nn.Linear(patch_dim, hidden, bias=False, dtype=dtype)
        self.video_patch_projection = (
            torch.nn.Linear(patch_dim * s.temporal_patch_size, hidden, bias=False, dtype=dtype)
            if s.temporal_patch_size else None
        )
        self.position_embedding = Table(1, s.position_grid**2, hidden, dtype=dtype)
        self.cls_register_token = Table(s.num_prefix_tokens, hidden, dtype=dtype)
        spec = transformer_layer_spec()
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)
        )
        self.projector = NemotronProjector(config, s)

    # ---- patches -------------------------------------------------------------------------
    def positions(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """The CPE table resized to ``max(rows, cols)`` squared and cropped: ``[rows * cols, h]``."""
        g = self.s.position_grid
        table = self.position_embedding.weight.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        side = max(rows, cols)
        table = F.interpolate(table, size=(side, side), mode="bilinear", align_corners=False).to(dtype)
        return table[0, :, :rows, :cols].flatten(1).t()

    def _video_patches(self, videos: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """``[videos, tubelets, T*C, H, W]`` -> per tubelet ``[rows * cols, T*C*P*P]`` (channel-major)."""
        p = self.s.patch_size
        frames = videos.flatten(0, 1)
        n, c, height, width = frames.shape
        rows, cols = height // p, width // p
        patches = frames.reshape(n, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, rows * cols, c * p * p)
        return list(patches), [(rows, cols)] * n

    # ---- the run ---------------------------------------------------------------------------
    def encode(self, embedded: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Projected patches per image -> shuffled, projected LM features per image."""
        dtype = embedded[0].dtype
        prefix = self.cls_register_token.weight.to(dtype)
        pieces, ids = [], []
        for i, (patches, (rows, cols)) in enumerate(zip(embedded, grids)):
            pieces += [prefix, patches + self.positions(rows, cols, dtype)]
            ids.append(torch.full((prefix.shape[0] + patches.shape[0],), i))
        x = torch.cat(pieces)[:, None]  # [tokens, 1, hidden]
        # Every image attends only to itself (one packed row, a segment per image). The ids are
        # made on the host and moved with the mask: its varlen bounds derived from ids on the GPU
        # would make the host wait for every queued kernel.
        mask = AttentionMask(segment_ids=torch.cat(ids)[None], causal=False).to(x.device)
        for layer in self.layers:
            x, _ = layer(x, attention_mask=mask)
        out, start, n_prefix = [], 0, prefix.shape[0]
        for patches, (rows, cols) in zip(embedded, grids):
            feats = x[start + n_prefix:start + n_prefix + patches.shape[0], 0]
            out.append(pixel_shuffle(feats, rows, cols, self.s.downsample))
            start += n_prefix + patches.shape[0]
        return out

    def encode_videos(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """The features of videos alone (``VLMModel.encode_vision``'s callable for them)."""
        return self(pixel_values_videos=pixel_values_videos)

    def forward(self, pixel_values: torch.Tensor | None = None, image_grid_hw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None) -> torch.Tensor:
        embedded, grids = [], []
        dtype = self.patch_projection.weight.dtype
        if pixel_values is not None:
            if image_grid_hw is None:
                raise ValueError("pixel_values without image_grid_hw: the patch grid of each image is needed")
            hw = [tuple(int(v) for v in row) for row in on_host(image_grid_hw).tolist()]
            if sum(r * c for r, c in hw) != pixel_values.shape[0]:
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patches but image_grid_hw "
                                 f"describes {sum(r * c for r, c in hw)}")
            patches = self.patch_projection(pixel_values.to(dtype))
            embedded += list(patches.split([r * c for r, c in hw]))
            grids += hw
        if pixel_values_videos is not None:
            if self.video_patch_projection is None:
                raise ValueError("pixel_values_videos given but this checkpoint has no video patch "
                                 "projection")
            # One tensor for videos of one frame size, or a list of them (micro-batches mixing sizes).
            videos = pixel_values_videos if isinstance(pixel_values_videos, list) else [pixel_values_videos]
            for video in videos:
                tubelets, hw = self._video_patches(video.to(dtype))
                embedded += [self.video_patch_projection(t) for t in tubelets]
                grids += hw
        features = torch.cat(self.encode(embedded, grids))
        return self.projector(features)
