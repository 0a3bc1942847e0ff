"""Vision-side building blocks shared by the families: patch merger, 2D rotary, embedding scatter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig


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
        self.linear_fc1 = ColumnParallelLinear(
            self.hidden, self.hidden, config=config, init_method=_init_noop, bias=True,
            gather_output=False,
        )
        self.linear_fc2 = RowParallelLinear(
            self.hidden, out_dim, config=config, init_method=_init_noop, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_merge:
            x = self.norm(x.reshape(-1, self.hidden))
        else:
            x = self.norm(x).reshape(-1, self.hidden)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x


def vision_tower_sharded_state_dict(
    tower: MegatronModule, prefix: str, sharded_offsets: tuple, metadata: dict | None
) -> dict:
    """Sharded state dict of a tower whose ``layers`` is a ModuleList of TransformerLayers.

    Each layer contributes its own TP-aware entries under ``layers.<i>.``; the other children go
    through Megatron's default handling (replicated unless they are Megatron parallel modules).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import sharded_state_dict_default

    # Plain torch modules (patch embed, norms) are replicated across TP: pass the TP group so each
    # rank gets its own replica id instead of all claiming to be the primary copy.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out: dict = {}
    for name, child in tower.named_children():
        if name == "layers":
            for i, layer in enumerate(child):
                out.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
        else:
            out.update(
                sharded_state_dict_default(
                    child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group
                )
            )
    return out


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


def scatter_vision_embeddings(
    embeddings: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor,
    what: str,
) -> torch.Tensor:
    """Place vision features at the positions of ``token_id`` in ``[s, b, h]`` text embeddings.

    Features are consumed in row-major (batch, position) order, as the HF models do.
    """
    mask = input_ids == token_id  # [b, s]
    count = int(mask.sum())
    if count != features.shape[0]:
        raise ValueError(
            f"{what}: {count} placeholder tokens in input_ids but {features.shape[0]} features"
        )
    # masked_scatter fills in the logical order of its input, so scatter into a [b, s, h] view.
    out = embeddings.transpose(0, 1).masked_scatter(mask[..., None], features.to(embeddings.dtype))
    return out.transpose(0, 1)
