"""bf16 gradients handed to the optimizer as they are, without an fp32 copy of all of them.

With ``optim.grad_reduce_in_fp32=false`` Megatron accumulates gradients in bf16 (2 bytes a
parameter), but its mixed-precision optimizers then copy every gradient to fp32 before the step
(``main_param.grad = main_grad.float()``): 4 more bytes a parameter just when the step runs,
20 GB for 5e9 parameters, more than the bf16 buffer saved. An optimizer that widens the gradient
itself, slice by slice (:class:`..low_memory_adam.AdamWBf16Moments`), does not need the copy.

Here each master parameter gets its bf16 gradient (a view of the DDP buffer) as ``decoupled_grad``
(Megatron's own name for a gradient whose dtype differs from its parameter's), the norm is taken
from it in fp32, and clipping becomes a coefficient the update multiplies in after widening: the
same fp32 arithmetic as Megatron's copy-then-scale, so the step is unchanged, without the copy.
``VLM_BRIDGE_DECOUPLED_GRADS=0`` keeps Megatron's copy (for A/B runs).

The per-token loss's gradient scale (1 / loss tokens of the global batch) is deferred the same
way: Megatron multiplies the whole gradient buffer by it in ``finalize_model_grads``, a pass over
every gradient (14 ms of a 7B step on one H100, for 3.4e9 bf16 gradients) that also rounds each
one to bf16 again. :func:`finalize_model_grads_deferring_token_scale` leaves the buffer unscaled;
the norm is scaled as a number and the update multiplies the scale in after widening, with the
clipping coefficient (fp32, rounded once). ``VLM_BRIDGE_DEFER_TOKEN_SCALE=0`` keeps Megatron's pass.
"""

from __future__ import annotations

import os
import types

import torch

_CLIP_WRAPPED = "_vlm_bridge_decoupled"
_DEFERS = "_vlm_bridge_defers_token_scale"


class _Pending:
    """The token scale the buffers still lack: set by the step's gradient finalisation (1 when
    nothing is deferred), read by the norm and the update of that step."""

    token_scale = 1.0


def enabled() -> bool:
    return os.environ.get("VLM_BRIDGE_DECOUPLED_GRADS", "1") != "0"


def defers_token_scale(optimizer) -> bool:
    """Whether the update of ``optimizer`` applies the token scale (every inner optimizer reads
    decoupled gradients: see :func:`decouple_low_precision_grads`)."""
    return getattr(optimizer, _DEFERS, False)


def decouple_low_precision_grads(optimizer) -> int:
    """Switch every inner optimizer whose torch optimizer reads ``decoupled_grad`` (and that has
    no loss scaler, which unscales ``.grad``) to the copy-free path; returns how many were."""
    switched = 0
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    for inner in inners:
        if not getattr(getattr(inner, "optimizer", None), "READS_DECOUPLED_GRADS", False) \
                or getattr(inner, "grad_scaler", None) is not None \
                or inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue
        inner._copy_model_grads_to_main_grads = types.MethodType(_copy_model_grads_to_main_grads, inner)
        inner.get_main_grads_for_grad_norm = types.MethodType(_main_grads_for_grad_norm, inner)
        switched += 1
    if switched:
        _wrap_clipping()
    setattr(optimizer, _DEFERS, switched == len(inners) > 0
            and os.environ.get("VLM_BRIDGE_DEFER_TOKEN_SCALE", "1") != "0")
    return switched


def finalize_func(optimizer):
    """The gradient finalisation for ``optimizer``'s steps: Megatron's, or the one that defers the
    token scale to the update. Nothing is pending until its first call."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    _Pending.token_scale = 1.0
    if defers_token_scale(optimizer):
        return finalize_model_grads_deferring_token_scale
    return finalize_model_grads


def finalize_model_grads_deferring_token_scale(model: list, num_tokens: torch.Tensor | None = None,
                                               pg_collection=None, force_all_reduce: bool = False) -> None:
    """Megatron's ``finalize_model_grads`` (gradient reductions, the token count's broadcast over
    the pipeline and sum over data and context parallel ranks) without its pass that scales the
    buffers by 1 / tokens: the scale is kept for the step's norm and update instead."""
    from megatron.core import parallel_state
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel.utils import get_pp_last_rank

    _Pending.token_scale = 1.0
    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    if num_tokens is None:
        return
    if pg_collection is not None:
        pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
    else:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
    torch.distributed.all_reduce(num_tokens, group=dp_cp_group)
    tokens = int(num_tokens)  # Megatron's own test of the count waits for it here too
    if tokens > 0:
        _Pending.token_scale = 1.0 / tokens


def main_grad(param: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """The gradient an update uses and the factor still to multiply in: the clipping coefficient
    of a decoupled gradient (Megatron clips ``.grad`` in place) and the deferred token scale."""
    if param.grad is not None:
        return param.grad, _Pending.token_scale
    return (getattr(param, "decoupled_grad", None),
            getattr(param, "decoupled_grad_scale", 1.0) * _Pending.token_scale)


def _set_main_grad(main_param: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.dtype == main_param.dtype:  # what Megatron's .float() gives here: the tensor itself
        main_param.grad, main_param.decoupled_grad = grad.view(main_param.shape), None
    else:
        main_param.grad, main_param.decoupled_grad = None, grad.view(main_param.shape)
    main_param.decoupled_grad_scale = 1.0


def _copy_model_grads_to_main_grads(self) -> None:
    """Megatron's copy of model gradients to the master parameters, minus the fp32 copy."""
    if hasattr(self, "_get_model_param_range_map"):  # distributed optimizer: this rank's shards
        pairs = [*zip(self.model_float16_groups, self.shard_fp32_from_float16_groups, strict=True),
                 *zip(self.model_fp32_groups, self.shard_fp32_groups, strict=True)]
        for model_group, main_group in pairs:
            for model_param, main_param in zip(model_group, main_group, strict=True):
                span = self._get_model_param_range_map(model_param)["param"]
                _set_main_grad(main_param, model_param.main_grad.view(-1)[span.start:span.end])
        return
    for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups, strict=True):
        for model_param, main_param in zip(model_group, main_group, strict=True):
            grad = getattr(model_param, "main_grad", None)
            grad = model_param.grad if grad is None else grad
            if grad is not None:
                _set_main_grad(main_param, grad)
            model_param.grad = None  # the contiguous buffer keeps main_grad
    for model_group in self.fp32_from_fp32_groups:
        for model_param in model_group:
            model_param.grad = model_param.main_grad


def _main_grads_for_grad_norm(self) -> list[torch.Tensor]:
    """Megatron's selection (no shared or tensor-parallel duplicate parameter), decoupled grads too."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import param_is_not_shared

    tp_group = getattr(self, "tp_group", None)
    grads = []
    for param in self.get_parameters():
        grad, _ = main_grad(param)
        if grad is not None and param_is_not_shared(param) and \
                tensor_parallel.param_is_not_tensor_parallel_duplicate(param, tp_group):
            grads.append(grad)
    return grads


def _wrap_clipping() -> None:
    """Megatron clips ``.grad`` in place; a decoupled gradient gets the coefficient instead (the
    chained optimizer's step calls the module function directly, so it is wrapped there). The
    norm, taken from buffers that may still lack the token scale, gets it as a number."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    original = megatron_optimizer.clip_grad_by_total_norm_fp32
    if getattr(original, _CLIP_WRAPPED, False):
        return
    original_norm = megatron_optimizer.get_grad_norm_fp32

    def get_grad_norm_fp32(*args, **kwargs):
        return original_norm(*args, **kwargs) * _Pending.token_scale

    megatron_optimizer.get_grad_norm_fp32 = get_grad_norm_fp32

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if not use_decoupled_grad:
            coefficient = max_norm / (total_norm + 1.0e-6)  # Megatron's, and it scales only below 1
            for param in parameters:
                if param.grad is None and getattr(param, "decoupled_grad", None) is not None:
                    param.decoupled_grad_scale = coefficient if coefficient < 1.0 else 1.0
        return original(parameters, max_norm, total_norm, use_decoupled_grad)

    setattr(clip_grad_by_total_norm_fp32, _CLIP_WRAPPED, True)
    megatron_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
