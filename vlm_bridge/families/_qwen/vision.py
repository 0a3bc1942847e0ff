"""The Qwen-VL vision tower base: Conv3d patch embedding, Megatron blocks, 2x2 merger, 2D rotary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common.linears import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear
from vlm_bridge.families._common.modules import per_element_sharded_state_dict
from vlm_bridge.parallel import host_to_device, on_host


def _init_noop(weight: torch.Tensor) -> None:
    """Weights always come from a checkpoint; skip random init."""


class PatchMerger(MegatronModule):
    """norm(vision hidden) -> group ``merge**2`` neighbours -> Linear -> GELU -> Linear (TP-sharded).

    fc1 is column-parallel and fc2 row-parallel, so the 4x-wide hidden never exists whole on a rank.
    """

    def __init__(
        self, config: TransformerConfig, context_dim: int, out_dim: int, merge_size: int,
        norm_after_merge: bool = False,
    ) -> None:
        super().__init__(config=config)
        self.hidden = context_dim * merge_size**2
        # Qwen3-VL's DeepStack mergers normalise the merged (4x wider) vector instead.
        self.norm_after_merge = norm_after_merge
        norm_dim = self.hidden if norm_after_merge else context_dim
        self.norm = WrappedTorchNorm(config, norm_dim, eps=config.layernorm_epsilon)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self.linear_fc1 = FusedBiasColumnParallelLinear(
            self.hidden, self.hidden, config=config, init_method=_init_noop, bias=True,
            gather_output=False, tp_group=tp_group,
        )
        self.linear_fc2 = FusedBiasRowParallelLinear(
            self.hidden, out_dim, config=config, init_method=_init_noop, bias=True,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_merge:
            x = self.norm(x.reshape(-1, self.hidden))
        else:
            x = self.norm(x).reshape(-1, self.hidden)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x


class VisionTower(MegatronModule):
    """What every Qwen-VL ViT has: the Conv3d patch embedding (applied as a matmul on the
    processor's flattened patches), Megatron transformer blocks, the 2x2 merger, 2D rotary angles
    and a sharded state dict per ``ModuleList`` element. Families add their positions, masks and
    extra mergers. ``s`` is the family's settings (patch sizes, merge size, rotary theta)."""

    def __init__(self, config: TransformerConfig, s, patch_bias: bool) -> None:
        from megatron.core.transformer.spec_utils import build_module

        from vlm_bridge.families._common.specs import transformer_layer_spec

        super().__init__(config=config)
        self.s = s
        kernel = (s.temporal_patch_size, s.patch_size, s.patch_size)
        self.patch_embed = torch.nn.Conv3d(
            s.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=patch_bias,
            dtype=config.params_dtype,
        )
        spec = transformer_layer_spec()
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)
        )
        self.merger = PatchMerger(config, config.hidden_size, s.out_hidden_size, s.spatial_merge_size)

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[patches, C*T*P*P]`` -> ``[patches, hidden]``: the Conv3d as one matmul."""
        w = self.patch_embed.weight
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1), self.patch_embed.bias)

    def rotary(self, grid_thw: torch.Tensor, device: torch.device) -> torch.Tensor:
        """2D rotary angles of every patch, in the processor's patch order."""
        from transformers.vision_utils import get_vision_position_ids

        positions = host_to_device(get_vision_position_ids(grid_thw, self.s.spatial_merge_size), device)
        return vision_rotary_freqs(positions, self.config.kv_channels, self.s.vision_rope_theta)

    sharded_state_dict = per_element_sharded_state_dict


def vision_rotary_freqs(
    hw_positions: torch.Tensor, head_dim: int, theta: float
) -> torch.Tensor:
    """Axial 2D rotary angles as Megatron's ``rotary_pos_emb``: ``[N, 1, 1, head_dim]``.

    Half the rotary channels encode the row and half the column, each with the frequencies of a
    ``head_dim // 2`` rotary; the ``[h, w]`` block is repeated because Megatron rotates halves.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=hw_positions.device)
                  / spatial)
    )
    freqs = hw_positions[..., None].float() * inv_freq  # [N, 2, spatial/2]
    hw = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    return torch.cat([hw, hw], dim=-1)[:, None, None, :]


def encode_by_item(model, pixels: torch.Tensor, grid_thw: torch.Tensor, outputs: int = 1):
    """A Qwen tower over the processor's flattened patches, item by item so that context-parallel
    ranks can share the items out (``VLMModel.encode_vision``). Under CP a video's temporal patch
    groups are items of their own: the ViT never mixes them (attention, windows and positions are
    per frame group; the merger merges within a frame), so one long video spreads over all ranks."""
    grid_thw = on_host(grid_thw)  # sizes and indices are worked out on the host
    if getattr(model, "_vision_split", None) is not None:
        t = grid_thw[:, 0]
        grid_thw = torch.repeat_interleave(grid_thw, t, dim=0)
        grid_thw[:, 0] = 1
    patches = grid_thw.prod(-1).tolist()
    merged = [n // model.s.spatial_merge_size**2 for n in patches]
    return model.encode_vision(model.vision, [(pixels, patches), (grid_thw, [1] * len(patches))], merged,
                               patches, (model.s.out_hidden_size,), outputs)
