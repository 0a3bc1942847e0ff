"""Multi-tensor gradient norm and scale without a host sync per tensor.

Without apex or Transformer Engine, Megatron-Core 0.16.1 falls back to ``local_multi_tensor_l2_norm``,
which turns every tensor's norm into a Python float (``torch.tensor(list_of_cuda_scalars)``): one
device-to-host sync per parameter, about 600 per step of a 7B model, each draining the GPU queue.
Its ``local_multi_tensor_scale`` launches a multiply and a copy per tensor. The stand-ins below
keep the same signatures (apex's ``multi_tensor_applier`` convention) and run as ``torch._foreach``
kernels: the norms stay on the device until the one ``item()`` that clipping needs.
"""

from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size: int, noop_flag, tensor_lists, per_tensor: bool, *args):
    """The l2 norm over all tensors of ``tensor_lists[0]``, as a 1-element fp32 tensor."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1), None
    # bf16 gradients (train/decoupled_grads.py) are summed in fp32 and their norms kept in fp32
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total.reshape(1), None


def foreach_scale(chunk_size: int, noop_flag, tensor_lists, scale: float) -> None:
    """``dst = src * scale`` for each pair of ``tensor_lists = [src, dst]`` (in place when the two
    lists hold the same tensors, as gradient clipping passes them)."""
    src, dst = tensor_lists
    if not dst:  # every gradient decoupled (train/decoupled_grads.py): nothing held here to scale
        return
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, src if scale == 1.0 else torch._foreach_mul(src, scale))


def use_foreach_multi_tensor_ops() -> None:
    """Swap Megatron's per-tensor fallbacks for the stand-ins (apex or TE kernels stay)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale
