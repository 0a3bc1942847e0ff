"""The training loss, shared by the trainer and evaluation: the per-token loss of a micro-batch over
its loss mask (this rank's tokens under context parallelism), and its global token mean."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from vlm_bridge.attention.context import local_tokens
from vlm_bridge.parallel import cpu_group


def loss_forward_step(data_iterator, model):
    """Megatron schedule step: the model's per-token loss and the masked sum over this micro-batch."""
    mb = next(data_iterator)
    per_token = model(**mb.inputs, labels=mb.labels)

    # With context parallelism the model returns this rank's tokens only; so does the mask.
    loss_mask = local_tokens(mb.loss_mask)

    def loss_func(output: torch.Tensor):
        total = (output.float() * loss_mask).sum()
        count = loss_mask.sum().to(torch.int)
        return total, count, {"loss_sum": total.detach().clone(), "tokens": count.detach().clone()}

    return per_token, loss_func


def global_loss_totals(outputs: list[dict]) -> tuple[float, float]:
    """Summed loss and loss-token count over the global batch, known on every rank."""
    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        for out in outputs:
            totals += torch.stack([out["loss_sum"].double().cpu(), out["tokens"].double().cpu()])
    # Everyone learns the loss: sum over DP on the last stage, then over stages (others add 0).
    dist.all_reduce(totals, group=cpu_group())
    totals /= parallel_state.get_tensor_model_parallel_world_size()  # TP ranks repeat the sums
    return float(totals[0]), float(totals[1])
