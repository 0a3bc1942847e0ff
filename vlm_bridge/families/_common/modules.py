"""Module helpers the families share: feature scatter, per-element checkpoint keys, and the
``[b, s] <-> [s, b]`` swap that keeps matmul inputs row-major."""

from __future__ import annotations

import torch

from vlm_bridge.parallel import host_to_device, on_host


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


def _row_major_swap(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).clone(memory_format=torch.contiguous_format)


class _SwapFirstDims(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return _row_major_swap(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _row_major_swap(grad)


def swap_first_dims(t: torch.Tensor) -> torch.Tensor:
    """``t.transpose(0, 1)`` as a fresh row-major tensor, and its gradient as one too.

    ``.contiguous()`` is not enough: with one row (``b == 1``) a transposed ``[s, 1, h]`` view counts
    as contiguous and keeps its stride of ``s * h`` on the size-1 dim. ``torch.matmul`` then refuses
    to fold it into one 2-D GEMM where nothing needs a gradient (a frozen Megatron linear's forward
    without grad, and its backward's ``grad_output @ weight``), and runs a batched matmul over the
    ``s`` positions with the weight broadcast: on a GPU that took 45 of a 53 s LoRA step at 12B.
    """
    return _SwapFirstDims.apply(t)


def scatter_vision_embeddings(
    embeddings: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor,
    what: str,
) -> torch.Tensor:
    """Place vision features at the positions of ``token_id`` in ``[s, b, h]`` text embeddings.

    Features are consumed in row-major (batch, position) order, as the HF models do. The positions
    come from the host original of ``input_ids`` and the features go in by index: counting a device
    mask (forward) or ``masked_scatter``'s backward (``masked_select``) would make the host wait
    for the GPU in every micro-batch. The result is one fresh row-major ``[s, b, h]`` tensor.
    """
    b, s = input_ids.shape
    batch, position = torch.nonzero(on_host(input_ids) == token_id, as_tuple=True)  # row-major order
    if batch.numel() != features.shape[0]:
        raise ValueError(
            f"{what}: {batch.numel()} placeholder tokens in input_ids but {features.shape[0]} features"
        )
    rows = embeddings.reshape(s * b, -1)  # row position * b + batch of [s, b, h]
    index = host_to_device(position * b + batch, rows.device)
    return rows.index_copy(0, index, features.to(rows.dtype)).view(s, b, -1)
