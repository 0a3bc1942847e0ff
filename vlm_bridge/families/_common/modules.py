"""Module helpers every family's vision side needs: feature scatter, per-element checkpoint keys."""

from __future__ import annotations

import torch


def per_element_sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                                   metadata=None) -> dict:
    """Checkpoint keys per ``ModuleList`` element (ViT layers, extra mergers), as a method.

    A plain ``ModuleList`` has no ``sharded_state_dict``, so Megatron would save its TP-sharded
    weights as if replicated; each element contributes its own entries under ``<name>.<i>.``.
    Other plain torch children (patch embed, position table) are replicated across TP.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import sharded_state_dict_default

    # Pass the TP group so replicated tensors get per-rank replica ids instead of all claiming
    # to be the primary copy.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out: dict = {}

    def add(module, key):
        out.update(sharded_state_dict_default(module, key, sharded_offsets, metadata, tp_group=tp_group))

    for name, child in self.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i, element in enumerate(child):
                add(element, f"{prefix}{name}.{i}.")
        else:
            add(child, f"{prefix}{name}.")
    return out


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
    # Contiguous [s, b, h]: a transposed view would make every linear of the decoder (whose
    # elementwise ops keep strides) run as a batched matmul over positions with its weight
    # broadcast, when more than one row is batched.
    return out.transpose(0, 1).contiguous()
