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
    """Sharded state dict of a tower with ``ModuleList`` children (ViT layers, DeepStack mergers).

    A plain ``ModuleList`` has no ``sharded_state_dict``, so Megatron would save its TP-sharded
    weights as if replicated; each element contributes its own entries under ``<name>.<i>.``.
    Other plain torch children (patch embed, position table) are replicated across TP.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import sharded_state_dict_default

    # Pass the TP group so replicated tensors get per-rank replica ids instead of all claiming to
    # be the primary copy.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out: dict = {}

    def add(module, key):
        out.update(sharded_state_dict_default(module, key, sharded_offsets, metadata, tp_group=tp_group))

    for name, child in tower.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i, element in enumerate(child):
                add(element, f"{prefix}{name}.{i}.")
        else:
            add(child, f"{prefix}{name}.")
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
