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

Weight gradients in half precision (``optim.grad_reduce_in_fp32=false``) are accumulated by the
weight-gradient GEMM itself (``main_grad += grad_out^T @ input``, cuBLAS with beta = 1) where
Megatron would make each micro-batch's gradient in a new tensor and add it to ``main_grad`` in a
second kernel: per micro-batch that saves writing and re-reading a gradient the size of every
weight, and the sum is rounded once instead of twice. Megatron's own switch for this
(``gradient_accumulation_fusion``) needs Apex. ``VLM_BRIDGE_WGRAD_ACCUMULATE=0`` keeps the add.
With fp32 gradient buffers the add stays: a bf16 x bf16 -> fp32 accumulating GEMM measured slower
than the bf16 GEMM plus the add.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
)


def accumulates_in_gemm(weight: torch.Tensor) -> bool:
    """True where ``weight``'s gradient goes straight into a half-precision Megatron ``main_grad``
    of its own dtype (see the module doc)."""
    main_grad = getattr(weight, "main_grad", None)
    return (main_grad is not None and weight.requires_grad and main_grad.dtype == weight.dtype
            and weight.dtype in (torch.bfloat16, torch.float16) and hasattr(weight, "grad_added_to_main_grad")
            and os.environ.get("VLM_BRIDGE_WGRAD_ACCUMULATE", "1") != "0")


class _LinearAccumulatingWeightGradient(torch.autograd.Function):
    """``F.linear`` whose backward adds the weight gradient into ``weight.main_grad`` in the GEMM."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        # The parameter itself, not a saved copy of it: under recomputation saved tensors come
        # back as new tensor objects, without the parameter's main_grad.
        ctx.weight, ctx.has_bias = weight, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,), weight = ctx.saved_tensors, ctx.weight
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        weight.main_grad.addmm_(rows.t(), x.reshape(-1, x.shape[-1]))
        # Megatron's DDP hook skips a gradient marked as added, but it only runs (and marks the
        # parameter ready for reduction) when a gradient arrives: hand it an uninitialised one.
        weight.grad_added_to_main_grad = True
        grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, torch.empty_like(weight), grad_bias


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if accumulates_in_gemm(weight):
        return _LinearAccumulatingWeightGradient.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _plain_call(args: tuple, kwargs: dict) -> bool:
    """A ``_forward_impl`` call with nothing but an optional TP all-reduce of the input gradient."""
    return not (args or kwargs.get("sequence_parallel") or kwargs.get("gradient_accumulation_fusion")
                or kwargs.get("grad_output_buffer"))


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
        ours = bias is not None and self.fuse_bias or bias is None and accumulates_in_gemm(weight)
        if not ours or not _plain_call(args, kwargs):
            return super()._forward_impl(input, weight, *args, **kwargs)
        if kwargs.get("allreduce_dgrad"):  # the input's gradient is summed over TP ranks
            input = copy_to_tensor_model_parallel_region(input, group=kwargs.get("tp_group"))
        return _linear(input, weight, bias)


def accumulate_weight_gradient_in_gemm(layer: ColumnParallelLinear) -> None:
    """Make a bias-free :class:`ColumnParallelLinear` that Megatron built itself (the untied
    output layer, 0.5 GB of gradient a micro-batch at a 152k x 3584 vocabulary) accumulate its
    weight gradient in the GEMM as the layers built from our specs do. Only for a weight no other
    op uses: a tied one also gets the embedding's gradient, which autograd sums with the
    placeholder the accumulating backward returns."""
    if type(layer) is not ColumnParallelLinear or layer.bias is not None:
        return
    # The class is swapped, not the layer rebuilt: Megatron made and initialised its weight.
    layer.__class__ = FusedBiasColumnParallelLinear
    layer.fuse_bias = False


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
        return _linear(input_, self.weight, self.bias), None

    def _forward_impl(self, input, weight, *args, **kwargs):
        # Megatron's forward calls this for the matmul alone (bias None, no input-gradient reduce).
        if kwargs.get("bias") is None and accumulates_in_gemm(weight) and _plain_call(args, kwargs):
            return _linear(input, weight, None)
        return super()._forward_impl(input, weight, *args, **kwargs)
