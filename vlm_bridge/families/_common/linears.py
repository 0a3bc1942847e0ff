"""Megatron's parallel linears with the bias added inside the GEMM, as ``torch.nn.Linear`` does.

Megatron adds a linear's bias after the matmul (``matmul(x, w.t()) + b``, or hands it to the next
op with ``skip_bias_add``): in bf16 the product is rounded once, then the sum again. HF models
use ``nn.Linear``, whose GEMM adds the bias in its fp32 epilogue and rounds once. For a ViT (four
biased linears per block) the extra roundings made the Megatron towers' bf16 features measurably
further from fp32 than HF's own bf16 run; ``F.linear`` with the bias removes them and launches one
kernel fewer per linear.

The bias is fused where that is exact for the parallel layout:

* column-parallel: always (each rank holds its own slice of the bias), unless the config fuses the
  bias into the activation instead (``skip_bias_add`` with ``bias_activation_fusion``, a single
  rounding too) or uses sequence parallelism or gradient-accumulation fusion (Megatron's own
  autograd function is needed there);
* row-parallel: at TP=1 only; with TP>1 the bias must be added once, after the partial sums are
  reduced, so Megatron's path is kept.

A fused layer returns no separate bias (``skip_bias_add`` reads False), which Megatron's MLP and
bias-dropout-add accept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
)


class FusedBiasColumnParallelLinear(ColumnParallelLinear):
    """:class:`ColumnParallelLinear` whose bias is added inside the GEMM (see the module doc)."""

    def __init__(self, *args, skip_bias_add: bool = False, **kwargs) -> None:
        config = kwargs["config"]
        fuse = (kwargs.get("bias", True) and not config.sequence_parallel
                and not (skip_bias_add and config.bias_activation_fusion))
        super().__init__(*args, skip_bias_add=skip_bias_add and not fuse, **kwargs)
        self.fuse_bias = fuse

    def _forward_impl(self, input, weight, *args, **kwargs):
        bias = kwargs.get("bias")
        if (bias is None or not self.fuse_bias or args or kwargs.get("sequence_parallel")
                or kwargs.get("gradient_accumulation_fusion") or kwargs.get("grad_output_buffer")):
            return super()._forward_impl(input, weight, *args, **kwargs)
        if kwargs.get("allreduce_dgrad"):  # the input's gradient is summed over TP ranks
            input = copy_to_tensor_model_parallel_region(input, group=kwargs.get("tp_group"))
        return F.linear(input, weight, bias)


class FusedBiasRowParallelLinear(RowParallelLinear):
    """:class:`RowParallelLinear` whose bias is added inside the GEMM at TP=1 (see the module doc)."""

    def __init__(self, *args, skip_bias_add: bool, **kwargs) -> None:
        config = kwargs["config"]
        fuse = (kwargs.get("bias", True) and config.tensor_model_parallel_size == 1
                and not config.sequence_parallel and not config.gradient_accumulation_fusion)
        super().__init__(*args, skip_bias_add=skip_bias_add and not fuse, **kwargs)
        self.fuse_bias = fuse

    def forward(self, input_: torch.Tensor):
        if not self.fuse_bias or self.bias is None or self.explicit_expert_comm:
            return super().forward(input_)
        return F.linear(input_, self.weight, self.bias), None
