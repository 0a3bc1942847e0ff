"""Forward passes through Megatron-Core's pipeline schedules (any PP size, one code path)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from vlm_bridge.parallel import cpu_group, device, host_to_device


def on_device(inputs: dict, where: torch.device | None = None) -> dict:
    """Model inputs on this rank's device (or ``where``): tensors, the structural attention mask,
    and lists of tensors (media items of different sizes)."""
    target = where if where is not None else device()

    def move(value):
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, torch.Tensor):  # pixels through pinned memory: the GPU keeps working
            return host_to_device(value, target)
        return value.to(target) if hasattr(value, "to") else value

    return {key: move(value) for key, value in inputs.items()}


def pipeline_forward_logits(model: torch.nn.Module, kwargs: dict) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, vocab]`` on the last stage, ``None`` on the others."""
    b, s = kwargs["input_ids"].shape

    def forward_step(data_iterator, model_chunk):
        output = model_chunk(**next(data_iterator), runtime_gather_output=True)

        def collect(output_tensor, non_loss_data: bool = False):
            return output_tensor

        return output, collect

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([kwargs]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
            collect_non_loss_data=True,
        )
    return outputs[0] if parallel_state.is_pipeline_last_stage() else None


def last_stage_rank() -> int:
    """Global rank of TP rank 0 on the last pipeline stage (where logits are produced)."""
    # Rank 0's pipeline group is the one whose last member holds TP rank 0 of the last stage.
    holder = [parallel_state.get_pipeline_model_parallel_last_rank()]
    dist.broadcast_object_list(holder, src=0, group=cpu_group())
    return holder[0]


def to_rank0(t: torch.Tensor | None, src: int) -> torch.Tensor | None:
    """Move a tensor held on ``src`` to rank 0 (same object when src is 0)."""
    obj = [t if dist.get_rank() == src else None]
    if src == 0:
        return obj[0].cpu() if dist.get_rank() == 0 and obj[0] is not None else None
    if dist.get_rank() == src:
        obj = [t.cpu() if t is not None else None]
        dist.send_object_list(obj, dst=0, group=cpu_group())
    elif dist.get_rank() == 0:
        dist.recv_object_list(obj, src=src, group=cpu_group())
        return obj[0]
    return None
